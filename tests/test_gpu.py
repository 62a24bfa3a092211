"""GPU tests of the fused CUDA and Triton backends (skipped without a CUDA GPU, with the reason printed), and CPU
tests of the GPU check tooling (benchmarks/gpu_check.py: arguments, plan, report writing).

On a GPU machine benchmarks/gpu_check.sh builds the package against the installed CUDA torch and runs this file.
Inputs are drawn on the CPU (tests/_helpers.py) and moved to the GPU inside the pooled call, so the reference
(python_ref, in the inputs' dtype and in float64) runs on the CPU from the very same values.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys
import warnings

import pytest
import torch

import fused_attn_at
import python_ref
from _helpers import (
    KINDS,
    Inputs,
    assert_within_rule,
    assert_within_ulp_rule,
    cotangents,
    low_precision_references,
    make_inputs,
    pool_with_grads,
    require_backend,
)

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                                    "run benchmarks/gpu_check.sh on a GPU machine")
GPU_BACKENDS = ("cuda", "triton")


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request) -> str:
    """Each GPU backend; a GPU machine without it fails (require_backend), it does not skip."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    require_backend(request.param, "cuda")
    return request.param


def _cuda(x):
    return None if x is None else x.to("cuda")


def pool_on_gpu(backend: str):
    """fused_attn_at.attention_pool on `backend` with every input moved to the GPU and the outputs moved back;
    autograd flows through the moves, so gradients land on the CPU leaves."""
    def pool(h, scores, mask=None, *, grad=None, noise=None, **kwargs):
        out = fused_attn_at.attention_pool(_cuda(h), _cuda(scores), _cuda(mask), grad=_cuda(grad), noise=_cuda(noise),
                                           backend=backend, **kwargs)
        return python_ref.AttentionPoolOutput(out.context.cpu(), out.attention.cpu())
    return pool


def check_on_gpu(backend: str, inputs: Inputs, kind, eps=1.0, used=("context", "attention"), what=""):
    """The tolerance rules of tests/_helpers.py for a GPU backend: float32 against twice the reference's own
    float32 error; float16/bfloat16 the ulp rule (the float32 reference rounded to the dtype plus 2 ulps, row by
    row), which a kernel accumulating in the low dtype fails at long rows."""
    actual = pool_with_grads(pool_on_gpu(backend), inputs, kind, eps, used)
    if inputs.h.dtype in (torch.float16, torch.bfloat16):
        reference64, reference32 = low_precision_references(inputs, kind, eps, used)
        assert_within_ulp_rule(actual, reference64, reference32, inputs.h.dtype, what=what or f"{backend} kind={kind}")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iAT with a batch of one
        reference_low = pool_with_grads(python_ref.attention_pool, inputs, kind, eps, used)
        reference64 = pool_with_grads(python_ref.attention_pool, inputs.to(torch.float64), kind, eps, used)
    assert_within_rule(actual, reference64, reference_low, what=what or f"{backend} kind={kind}")


# float32: every perturbation with and without a mask; float16/bfloat16: the three kernel paths (none, the
# inline AT/RP normalisation, iAT's given r) with a fully masked row. (Each new variant costs a JIT compile on a
# fresh machine: the matrix is sized for gpu_check.sh's time budget.)
MATCH_CASES = ([(torch.float32, kind, mask) for kind in KINDS for mask in ("none", "empty_row")]
               + [(dtype, kind, "empty_row") for dtype in (torch.float16, torch.bfloat16)
                  for kind in (None, "at", "iat")])


@needs_gpu
@pytest.mark.parametrize("dtype, kind, mask_pattern", MATCH_CASES,
                         ids=[f"{str(d).split('.')[-1]}-{k}-{m}" for d, k, m in MATCH_CASES])
def test_matches_reference(gpu_backend, dtype, kind, mask_pattern):
    inputs = make_inputs(6, 300, 96, mask_pattern, seed=41, dtype=dtype)
    check_on_gpu(gpu_backend, inputs, kind, eps=0.8, what=f"{gpu_backend} {dtype} kind={kind} {mask_pattern}")


@needs_gpu
@pytest.mark.parametrize("kind", ("at", "iat"))
def test_realistic_grid(gpu_backend, kind):
    """B = 64 rows split over many programs (H slices in the forward, position chunks in the backward)."""
    inputs = make_inputs(64, 1031, 256, "padding", seed=42)
    check_on_gpu(gpu_backend, inputs, kind, what=f"{gpu_backend} B=64 T=1031 H=256 kind={kind}")


@needs_gpu
def test_long_rows(gpu_backend):
    inputs = make_inputs(4, 8192, 64, "padding", seed=43, score_scale=6.0)
    for kind in ("at", "iat"):
        check_on_gpu(gpu_backend, inputs, kind, what=f"{gpu_backend} T=8192 kind={kind}")


def _layout(name: str, base: Inputs) -> Inputs:
    if name == "transposed":
        def tr(x):
            return x.transpose(0, 1).contiguous().transpose(0, 1)
        return Inputs(base.h.transpose(1, 2).contiguous().transpose(1, 2), tr(base.scores), tr(base.mask),
                      tr(base.grad), tr(base.noise))
    if name == "sliced":
        return Inputs(base.h[:, ::2, ::2], base.scores[:, ::2], base.mask[:, ::2], base.grad[:, ::2],
                      base.noise[:, ::2])
    if name == "odd_hidden":
        return dataclasses.replace(base, h=base.h[:, :, :37])
    raise ValueError(name)


@needs_gpu
@pytest.mark.parametrize("layout", ("transposed", "sliced", "odd_hidden"))
def test_views(gpu_backend, layout):
    """Layouts the 16-byte vector paths cannot take (the strides travel to the kernels, nothing is copied)."""
    inputs = _layout(layout, make_inputs(5, 130, 64, "padding", seed=44))
    for kind in ("at", "iat"):
        check_on_gpu(gpu_backend, inputs, kind, what=f"{gpu_backend} {layout} kind={kind}")


@needs_gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(gpu_backend, kind):
    inputs = make_inputs(3, 9, 5, "empty_row", seed=45, dtype=torch.float64)
    h = inputs.h.cuda().requires_grad_()
    scores = inputs.scores.cuda().requires_grad_()
    mask, grad, noise = inputs.mask.cuda(), inputs.grad.cuda(), inputs.noise.cuda()
    extra = dict(perturbation=kind, grad=grad if kind in ("at", "iat") else None, noise=noise if kind == "rp" else None)

    def pool(h, scores):
        return tuple(fused_attn_at.attention_pool(h, scores, mask, backend=gpu_backend, **extra))

    if kind != "iat":
        assert torch.autograd.gradcheck(pool, (h, scores))
        return
    # iAT's r is built from the scores but is a constant (SPEC): gradcheck h alone, and compare the analytic
    # gradients with the reference's autograd through masked_softmax(s + r), r held fixed.
    assert torch.autograd.gradcheck(lambda h: pool(h, scores.detach()), (h,))
    r = python_ref.iat_perturbation(scores.detach(), grad, mask)
    assert r.abs().sum() > 0
    context, attention = pool(h, scores)
    h_ref, scores_ref = h.detach().clone().requires_grad_(), scores.detach().clone().requires_grad_()
    attention_ref = python_ref.masked_softmax(scores_ref + r, mask)
    context_ref = torch.bmm(attention_ref[:, None, :], h_ref).squeeze(1)
    dc, da = (c.cuda() for c in cotangents(inputs))
    grads = torch.autograd.grad((context * dc).sum() + (attention * da).sum(), (h, scores))
    grads_ref = torch.autograd.grad((context_ref * dc).sum() + (attention_ref * da).sum(), (h_ref, scores_ref))
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@needs_gpu
def test_backward_is_bitwise_deterministic(gpu_backend):
    """Fixed-order reductions, no atomics: 10 forward+backward runs are bit-identical."""
    inputs = make_inputs(64, 1024, 256, "padding", seed=46)
    h, scores = inputs.h.cuda().requires_grad_(), inputs.scores.cuda().requires_grad_()
    mask, grad = inputs.mask.cuda(), inputs.grad.cuda()
    dc, da = (c.cuda() for c in cotangents(inputs))
    first = None
    for _ in range(10):
        out = fused_attn_at.attention_pool(h, scores, mask, perturbation="iat", grad=grad, backend=gpu_backend)
        result = (out.context, out.attention) + torch.autograd.grad(
            (out.context * dc).sum() + (out.attention * da).sum(), (h, scores))
        if first is None:
            first = result
            assert result[3].abs().sum() > 0
        else:
            for name, a, b in zip(("context", "attention", "grad_h", "grad_scores"), result, first):
                assert torch.equal(a, b), name


@needs_gpu
@pytest.mark.parametrize("kind", (0, 1, 2))
def test_opcheck(gpu_backend, kind):
    """Schema, fake (meta) implementation, autograd registration and torch.compile (AOT dispatch) of the ops."""
    inputs = make_inputs(3, 10, 4, "padding", seed=49, dtype=torch.float64)
    h, scores = inputs.h.cuda().requires_grad_(), inputs.scores.cuda().requires_grad_()
    mask, direction = inputs.mask.cuda(), inputs.grad.cuda() if kind else None
    ops = torch.ops.fused_attn_at if gpu_backend == "cuda" else torch.ops.fused_attn_at_triton
    torch.library.opcheck(ops.attention_pool_fwd, (h, scores, mask, direction, kind, 0.5))
    if kind:
        torch.library.opcheck(ops.perturbation, (scores.detach(), mask, direction, kind, 0.5))


@needs_gpu
def test_sixty_four_bit_offsets(gpu_backend):
    """h with more than 2**31 elements (bfloat16, ~4.4 GB): the last row still reads and writes the right
    places, forward and backward."""
    free, _total = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs 40 GiB of free GPU memory for a >2**31-element h, {free / 2**30:.0f} GiB free")
    B, T, H = 2, 2**20 + 3, 1040
    assert B * T * H > 2**31
    generator = torch.Generator(device="cuda").manual_seed(50)
    h = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
    scores = torch.randn(B, T, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
    grad = torch.randn(B, T, device="cuda", dtype=torch.bfloat16, generator=generator)
    out = fused_attn_at.attention_pool(h, scores, None, perturbation="at", grad=grad, eps=0.5, backend=gpu_backend)
    dc = torch.randn(B, H, device="cuda", dtype=torch.bfloat16, generator=generator)
    grad_h, grad_scores = torch.autograd.grad((out.context * dc).sum(), (h, scores))
    row = B - 1
    with torch.no_grad():
        s = scores[row].float() + 0.5 * grad[row].float() / grad[row].float().norm()
        a = torch.softmax(s, dim=0)  # [T]
        context = a @ h[row].float()  # [H]
        da = h[row].float() @ dc[row].float()  # [T]
        dscores = a * (da - (a * da).sum())
    torch.testing.assert_close(out.attention[row].float(), a, rtol=2e-2, atol=1e-9)
    torch.testing.assert_close(out.context[row].float(), context, rtol=2e-2, atol=2e-2 * float(context.abs().max()))
    torch.testing.assert_close(grad_h[row, -1].float(), a[-1] * dc[row].float(), rtol=2e-2, atol=1e-9)
    torch.testing.assert_close(grad_scores[row].float(), dscores, rtol=2e-2, atol=2e-2 * float(dscores.abs().max()))


@needs_gpu
def test_triton_double_backward_matches_reference():
    """create_graph=True through the Triton backend on the GPU: first and second order gradients against
    python_ref's autograd on the CPU (float64, padding and a fully masked row)."""
    require_backend("triton", "cuda")
    inputs = make_inputs(4, 9, 5, "empty_row", seed=51, dtype=torch.float64)

    def second_order(pool):
        h, scores = inputs.leaves()
        out = pool(h, scores, inputs.mask, perturbation="at", grad=inputs.grad, eps=0.8)
        dc, da = cotangents(inputs)
        first = torch.autograd.grad((out.context * dc).sum() + (out.attention * da).sum(), (h, scores),
                                    create_graph=True)
        second = torch.autograd.grad(first[0].square().sum() + first[1].square().sum(), (h, scores))
        return [x.detach() for x in first] + list(second)

    for got, expected in zip(second_order(pool_on_gpu("triton")), second_order(python_ref.attention_pool)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


_NONFINITE_SCRIPT = """
import sys, torch, fused_attn_at
compiled = sys.argv[1] == "compile"
h = torch.randn(3, 10, 4, device="cuda")
scores = torch.randn(3, 10, device="cuda")
scores[1, 0] = float("nan")
def pool(h, scores):
    return fused_attn_at.attention_pool(h, scores, None, backend="triton").context
fn = torch.compile(pool, fullgraph=True) if compiled else pool
try:
    fn(h, scores)
    torch.cuda.synchronize()
except Exception as exc:
    print("RAISED", type(exc).__name__, exc)
    sys.exit(3)
print("NO ERROR")
"""


@needs_gpu
@pytest.mark.parametrize("mode", ("eager", "compile"))
def test_triton_nonfinite_scores_fail_on_the_gpu(mode):
    """NaN at a real position: the kernels' flag reaches torch._assert_async (device-side, no host sync), so the
    error surfaces at the next synchronisation, eager and compiled alike. A subprocess: a device-side assertion
    leaves the CUDA context unusable."""
    import subprocess

    require_backend("triton", "cuda")
    proc = subprocess.run([sys.executable, "-c", _NONFINITE_SCRIPT, mode], capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert "NO ERROR" not in output and proc.returncode != 0, output[-3000:]


@needs_gpu
def test_self_attention_seeds_from_a_cuda_generator():
    """RP's noise draws its kernel seed from the call's generator, a CUDA one included; the dropout mask's seed
    comes from the global CPU generator (as torch's dropout draws from the global state): the same states give
    the same output, another state of either another one."""
    require_backend("triton", "cuda")
    q, k, v = (torch.randn(2, 2, 40, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
               for i in range(3))

    def call(seed, global_seed=0):
        torch.manual_seed(global_seed)
        return fused_attn_at.perturbed_attention(q, k, v, perturbation="rp", dropout_p=0.2, backend="triton",
                                                 generator=torch.Generator("cuda").manual_seed(seed))

    assert torch.equal(call(1), call(1)) and not torch.equal(call(1), call(2))
    assert not torch.equal(call(1), call(1, global_seed=1))


@needs_gpu
def test_triton_launches_on_the_tensors_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the Triton launches run on cuda:1 (right results, and the
    current device is left as it was)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    require_backend("triton", "cuda")
    inputs = make_inputs(4, 50, 16, "padding", seed=52)
    device = torch.device("cuda", 1)

    def pool(h, scores, mask=None, *, grad=None, noise=None, **kwargs):
        def move(x):
            return None if x is None else x.to(device)
        out = fused_attn_at.attention_pool(move(h), move(scores), move(mask), grad=move(grad), noise=move(noise),
                                           backend="triton", **kwargs)
        assert out.context.device == device
        return python_ref.AttentionPoolOutput(out.context.cpu(), out.attention.cpu())

    with torch.cuda.device(0):
        for kind in ("at", "iat"):
            actual = pool_with_grads(pool, inputs, kind)
            reference_low = pool_with_grads(python_ref.attention_pool, inputs, kind)
            reference64 = pool_with_grads(python_ref.attention_pool, inputs.to(torch.float64), kind)
            assert_within_rule(actual, reference64, reference_low, what=f"triton on cuda:1 kind={kind}")
            r = fused_attn_at.perturbation(kind, inputs.scores.to(device), inputs.mask.to(device),
                                           grad=inputs.grad.to(device), backend="triton")
            torch.testing.assert_close(r.cpu(), python_ref.perturbation(kind, inputs.scores, inputs.mask,
                                                                        grad=inputs.grad))
        assert torch.cuda.current_device() == 0


@needs_gpu
def test_dispatch_prefers_cuda_then_triton():
    require_backend("cuda", "cuda")
    device = torch.device("cuda")
    assert fused_attn_at.resolve_backend(None, device) == "cuda"
    assert {"cuda", "triton"} <= set(fused_attn_at.available_backends(device))


# torch.compile last: cold inductor compiles are the slowest tests on a fresh machine.


@needs_gpu
def test_torch_compile_matches_eager(gpu_backend):
    inputs = make_inputs(8, 200, 64, "padding", seed=47)
    h, scores = inputs.h.cuda().requires_grad_(), inputs.scores.cuda().requires_grad_()
    mask, grad = inputs.mask.cuda(), inputs.grad.cuda()

    def step(h, scores):
        out = fused_attn_at.attention_pool(h, scores, mask, perturbation="at", grad=grad, backend=gpu_backend)
        return (out.context.square().sum() + out.attention.square().sum()), out.context

    torch._dynamo.reset()
    compiled = torch.compile(step)
    loss_eager, context_eager = step(h, scores)
    grads_eager = torch.autograd.grad(loss_eager, (h, scores))
    loss_compiled, context_compiled = compiled(h, scores)
    grads_compiled = torch.autograd.grad(loss_compiled, (h, scores))
    torch.testing.assert_close(context_compiled, context_eager)
    for got, expected in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, expected)


@needs_gpu
def test_triton_op_compiles_without_graph_breaks():
    require_backend("triton", "cuda")
    inputs = make_inputs(4, 100, 32, "padding", seed=48)
    h, scores = inputs.h.cuda().requires_grad_(), inputs.scores.cuda().requires_grad_()
    mask, grad = inputs.mask.cuda(), inputs.grad.cuda()
    op = torch.ops.fused_attn_at_triton.attention_pool_fwd

    def fn(h, scores):
        context, attention = op(h, scores, mask, grad, 2, 1.0)
        return context.sum() + attention.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    expected = torch.autograd.grad(fn(h, scores), (h, scores))
    got = torch.autograd.grad(compiled(h, scores), (h, scores))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# The GPU check tooling, on the CPU

def _gpu_check_module():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _gpu_check_module()


def test_gpu_check_arguments(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path), "--lengths", "64,8192", "--hiddens", "256",
                                 "--backends", "cuda,eager", "--passes", "fwd", "--budget-s", "100"])
    assert args.lengths == (64, 8192) and args.hiddens == (256,) and args.backends == ("cuda", "eager")
    defaults = gpu_check.parse_args([])
    assert defaults.batch == 64 and defaults.lengths == (64, 256, 1024, 4096, 8192) and defaults.hiddens == (256, 512)
    assert defaults.backends == ("cuda", "triton", "eager", "compile") and defaults.passes == ("fwd", "bwd", "fwdbwd")
    for bad in (["--lengths", "64,x"], ["--lengths", "0"], ["--backends", "cuda,tpu"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_gpu_check_plan(gpu_check):
    rows = gpu_check.plan_rows(gpu_check.parse_args([]))
    main = [r for r in rows if not r.extra]
    assert len(main) == 10 and {(r.T, r.H) for r in main} == {(t, h) for t in (64, 256, 1024, 4096, 8192)
                                                               for h in (256, 512)}
    assert [r.T for r in main[:2]] == [8192, 8192], "the goal rows (largest T) come first"
    extras = [r for r in rows if r.extra]
    assert {(r.dtype, r.kind) for r in extras} == {("bfloat16", "at"), ("float32", "iat"), ("float32", "none")}
    assert not [r for r in gpu_check.plan_rows(gpu_check.parse_args(["--no-extras"])) if r.extra]


def _fake_report(gpu_check, tmp_path):
    """A tiny hand-made result: one timed fused row, its eager twin, a skipped and a failed case."""
    junit = tmp_path / "tests.xml"
    junit.write_text('<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1" time="2.5">'
                     '<testcase classname="tests.test_gpu" name="test_a"/>'
                     '<testcase classname="tests.test_gpu" name="test_b"><failure message="boom"/></testcase>'
                     '<testcase classname="tests.test_gpu" name="test_c"><skipped/></testcase>'
                     '</testsuite></testsuites>')
    base = dict(dtype="float32", kind="at", B=64, T=4096, H=256, extra=False, mode="fwd")
    cases = [dict(base, backend="eager", ms=4.0, bytes=4.0e9, gbps=1000.0, copy_fraction=0.25),
             dict(base, backend="cuda", ms=1.0, bytes=4.0e9, gbps=4000.0, copy_fraction=0.8,
                  max_rel_err_vs_eager=1e-7, check_ok=True),
             dict(base, backend="triton", ms=2.0, bytes=4.0e9, gbps=2000.0, copy_fraction=0.4,
                  max_rel_err_vs_eager=1.0, check_ok=False),
             dict(base, backend="compile", skipped="time budget spent"),
             dict(base, backend="eager", mode="bwd", error="OutOfMemoryError: CUDA out of memory")]
    gpu_check.add_speedups(cases)
    return dict(meta=dict(device="cuda", device_name="NVIDIA H200", copy_mib=1024, copy_gbps=5000.0, read_gbps=4000.0,
                          torch="2.11.0", triton="3.6.0", cuda="13.0", commit="abc1234"),
                budget_s=300.0, elapsed_s=42.0, backends=["cuda", "triton", "eager", "compile"],
                passes=["fwd", "bwd"], cases=cases, goals=gpu_check.goal_summary(cases),
                build=dict(status="ok", seconds=61.0), tests=gpu_check.parse_junit(junit),
                triton_sweep=[dict(mode="fwd", T=8192, H=256, block_t=128, block_h=32, num_warps=4, ms=0.5,
                                   gbps=4500.0, copy_fraction=0.9),
                              dict(mode="bwd", T=8192, H=256, block_t=128, block_h=32, num_warps=4,
                                   skipped="time budget spent")])


def test_gpu_check_report_files(gpu_check, tmp_path):
    report = _fake_report(gpu_check, tmp_path)
    assert report["tests"]["passed"] == 1 and report["tests"]["failed"] == ["tests.test_gpu::test_b"]
    assert report["cases"][1]["speedup_vs_eager"] == pytest.approx(4.0)
    assert report["goals"]["cuda"]["bandwidth_met"] and report["goals"]["cuda"]["speedup_met"]
    assert not report["goals"]["triton"]["bandwidth_met"] and not report["goals"]["triton"]["speedup_met"]
    json_path, md_path = gpu_check.write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["cases"][1]["gbps"] == 4000.0
    text = md_path.read_text()
    assert "# GPU check: NVIDIA H200" in text
    assert "- build: ok (61 s)" in text
    assert "- GPU tests: 1 passed, 1 failed, 1 skipped (2 s): tests.test_gpu::test_b" in text
    assert "| fwd | 4096 | 256 | 1.000 | 2.000 (!) | 4.000 | skip | 4000 (80%) | 2000 (40%) | 4.0 | 2.0 |" in text
    assert "| bwd | 4096 | 256 |  |  | error |  |" in text
    assert "- cuda: worst 80% of copy (met), worst 4.0x eager (met) over 1 cases; 4.0x to 4.0x eager over every T" \
        in text
    assert "- triton: worst 40% of copy (NOT met), worst 2.0x eager (NOT met) over 1 cases" in text
    assert "OutOfMemoryError" in text and "differs from eager by 1.00e+00 (!)" in text
    assert "| fwd | 8192 | 256 | 128 | 32 | 4 | 0.500 | 4500 (90%) |" in text
    assert "| bwd | 8192 | 256 | 128 | 32 | 4 | time budget spent |  |" in text


def test_gpu_check_runs_on_cpu(gpu_check, tmp_path):
    """The whole benchmark path (inputs, sanity check, timers, bytes, report) on the CPU with the eager backend."""
    junit = tmp_path / "missing.xml"
    code = gpu_check.main(["--device", "cpu", "--backends", "eager", "--lengths", "8,16", "--hiddens", "4",
                           "--batch", "2", "--no-extras", "--copy-mib", "4", "--rep-ms", "2", "--warmup-ms", "1",
                           "--out", str(tmp_path), "--junit", str(junit)])
    assert code == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    timed = [c for c in report["cases"] if "ms" in c]
    assert len(timed) == 2 * 3 and all(c["ms"] > 0 and c["gbps"] > 0 for c in timed)
    assert {c["mode"] for c in timed} == {"fwd", "bwd", "fwdbwd"}
    assert report["tests"] == {"missing": str(junit)}
    assert "| fwdbwd | 16 | 4 |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_exits_non_zero_when_a_check_fails(gpu_check, tmp_path, monkeypatch):
    """A fused backend that differs from eager (here "cpu", made wrong by a monkeypatch) is a failed run: exit 1,
    the report still written and the case marked (!). A backend that raises fails the run the same way."""
    import fused_attn_at as package

    real = package.attention_pool

    def wrong(h, scores, mask=None, **kwargs):
        out = real(h, scores, mask, **kwargs)
        return python_ref.AttentionPoolOutput(out.context * 1.5, out.attention)

    argv = ["--device", "cpu", "--backends", "eager,cpu", "--lengths", "8", "--hiddens", "4", "--batch", "2",
            "--no-extras", "--passes", "fwd", "--copy-mib", "4", "--rep-ms", "2", "--warmup-ms", "1"]
    monkeypatch.setattr(package, "attention_pool", wrong)
    assert gpu_check.main(argv + ["--out", str(tmp_path / "wrong")]) == 1
    report = json.loads((tmp_path / "wrong" / "gpu_check.json").read_text())
    assert [c["check_ok"] for c in report["cases"] if c["backend"] == "cpu"] == [False]
    assert gpu_check.failures(report) and "differs from eager" in gpu_check.failures(report)[0]

    def crash(*args, **kwargs):
        raise RuntimeError("kernel crashed")

    monkeypatch.setattr(package, "attention_pool", crash)
    assert gpu_check.main(argv + ["--out", str(tmp_path / "crash")]) == 1
    monkeypatch.setattr(package, "attention_pool", real)
    assert gpu_check.main(argv + ["--out", str(tmp_path / "ok")]) == 0


def test_gpu_check_self_attention_rows_on_cpu(gpu_check, tmp_path, monkeypatch):
    """The self-attention rows (check vs SDPA and the reference, timings, report) with the cpu backend on tiny
    shapes; a backend that differs from SDPA fails the run."""
    import fused_attn_at as package

    # the cpu kernels where built (their dropout is checked against the reference fed their mask)
    sa_backend = "cpu" if package.self_attention.why_unavailable("cpu", torch.device("cpu")) is None else "reference"
    argv = ["--device", "cpu", "--backends", "eager", "--lengths", "8", "--hiddens", "4", "--batch", "2",
            "--no-extras", "--passes", "fwd", "--copy-mib", "4", "--rep-ms", "2", "--warmup-ms", "1",
            "--sa-lengths", "16,24", "--sa-backend", sa_backend, "--sa-batch", "1", "--sa-heads", "2",
            "--sa-dim", "8", "--sa-dtype", "float32"]
    assert gpu_check.parse_args(["--device", "cpu"]).sa_lengths == ()
    assert gpu_check.parse_args([]).sa_lengths == gpu_check.SA_LENGTHS_GPU
    assert gpu_check.main(argv + ["--out", str(tmp_path / "ok")]) == 0
    sa = json.loads((tmp_path / "ok" / "gpu_check.json").read_text())["self_attention"]
    expected = {"none_vs_sdpa", "at_vs_reference"} | (
        {"dropout_vs_reference", "iat_vs_reference"} if sa_backend == "cpu" else set())
    assert sa["check"]["check_ok"] and set(sa["check"]["errors"]) == expected
    timed = [c for c in sa["cases"] if "ms" in c]
    assert {(c["name"], c["T"], c["mode"]) for c in timed} == {
        (n, T, m) for n in ("sdpa", "fused", "fused_at") for T in (16, 24) for m in ("fwd", "fwdbwd")}
    assert "## Self-attention" in (tmp_path / "ok" / "gpu_check.md").read_text()
    real = package.perturbed_attention
    monkeypatch.setattr(package, "perturbed_attention", lambda *a, **kw: real(*a, **kw) * 1.01)
    assert gpu_check.main(argv + ["--out", str(tmp_path / "wrong")]) == 1


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU machine gpu_check.sh is what runs this file: no nested run")
def test_gpu_check_sh_runs_on_cpu(tmp_path):
    """The shell script's plumbing (toolkit and arch detection, test run, junit -> report, exit status) with the
    build skipped, a tiny inner test selection and the benchmark on the CPU."""
    import os
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("bash not found")
    repo = pathlib.Path(__file__).resolve().parents[1]
    package_root = str(pathlib.Path(fused_attn_at.__file__).resolve().parents[1])
    env = dict(os.environ, GPU_CHECK_SKIP_BUILD="1", PYTHON=sys.executable, GPU_CHECK_BUDGET_S="200",
               GPU_CHECK_PYTEST_ARGS="-k test_gpu_check_arguments",
               GPU_CHECK_BENCH_ARGS="--device cpu --backends eager --lengths 8 --hiddens 4 --batch 2 --no-extras "
                                    "--copy-mib 4 --rep-ms 2 --warmup-ms 1",
               PYTHONPATH=os.pathsep.join([package_root] + [
                   p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != "."]))
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["build"]["status"] == "skipped (GPU_CHECK_SKIP_BUILD=1)"
    assert report["tests"]["passed"] == 1 and report["tests"]["failed"] == []
    assert len([c for c in report["cases"] if "ms" in c]) == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "bench.log", "gpu_check.json", "gpu_check.md", "tests.log", "tests.xml"]
    assert "# GPU check:" in proc.stdout
