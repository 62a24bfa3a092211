"""Issue 14: the places where the op could give a wrong answer without an error, each pinned by a test that
failed on the code before the fix: double backward, thread-count determinism, the no-[B, B, T] iAT claim,
64-bit offsets, zero sizes with values and gradients, torch.compile(dynamic=True), autocast."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_attn_at
import python_ref
from _helpers import (  # noqa: F401  (backend is a fixture)
    KINDS,
    backend,
    cotangents,
    fused_pool,
    make_inputs,
    pool_with_grads,
    require_backend,
)

# ---------------------------------------------------------------------------------------------------------
# Double backward: a real second derivative, equal to the reference's (which is plain autograd)


def _second_order(pool, inputs, kind):
    """d/d(h, scores) of |dL/dh|^2 + |dL/dscores|^2 with L = <dc, context> + <da, attention>^2."""
    h, scores = inputs.leaves()
    out = pool(h, scores, inputs.mask, **inputs.kwargs(kind))
    dc, da = cotangents(inputs)
    loss = (out.context * dc).sum() + ((out.attention * da) ** 2).sum()
    grad_h, grad_scores = torch.autograd.grad(loss, (h, scores), create_graph=True)
    penalty = (grad_h ** 2).sum() + (grad_scores ** 2).sum()
    return torch.autograd.grad(penalty, (h, scores))


@pytest.mark.parametrize("mask_pattern", ("padding", "empty_row"))
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_matches_reference(backend, kind, mask_pattern):
    """Before the fix the cpu backend returned a second-order dh of exactly 0 (the backward kernel has no
    derivative) where the reference's is non-zero."""
    inputs = make_inputs(3, 6, 4, mask_pattern, seed=5, dtype=torch.float64)
    got = _second_order(fused_pool(backend), inputs, kind)
    expected = _second_order(python_ref.attention_pool, inputs, kind)
    assert float(expected[0].abs().max()) > 1e-3 and float(expected[1].abs().max()) > 1e-3
    for name, g, e in zip(("d2/dh", "d2/dscores"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"{backend} {kind} {name}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_gradgradcheck(backend, kind):
    """torch.autograd.gradgradcheck in float64. iAT's r moves with the scores (yet is a constant for autograd,
    SPEC), so for iAT only h is checked numerically; the comparison above covers its scores."""
    inputs = make_inputs(2, 5, 3, "padding", seed=3, dtype=torch.float64)
    h, scores = inputs.leaves()
    pool = fused_pool(backend)
    fast = backend == "triton"  # every interpreted call costs milliseconds
    if kind == "iat":
        assert torch.autograd.gradgradcheck(
            lambda h: tuple(pool(h, inputs.scores, inputs.mask, **inputs.kwargs(kind))), (h,), fast_mode=fast)
        return
    assert torch.autograd.gradgradcheck(
        lambda h, s: tuple(pool(h, s, inputs.mask, **inputs.kwargs(kind))), (h, scores), fast_mode=fast)


# ---------------------------------------------------------------------------------------------------------
# Determinism across thread counts, at shapes whose rows the CPU kernel splits into feature chunks


@pytest.mark.parametrize("shape", [(1, 1031, 256), (3, 300, 256), (1, 700, 200)])
@pytest.mark.filterwarnings("ignore:iAT perturbation with a batch of one:UserWarning")  # B = 1: r = 0, said once
def test_cpu_results_are_bitwise_identical_across_thread_counts_and_runs(shape):
    """20 runs cycling through 1, 2 and 3 threads give bit-identical outputs and gradients. Before the fix the
    row split followed the thread count, and grad_scores at B=1, T=300, H=256 moved by ~1e-7 between 1 and 2
    threads."""
    require_backend("cpu")
    inputs = make_inputs(*shape, "padding", seed=9)
    threads = torch.get_num_threads()
    try:
        for kind in KINDS:
            torch.set_num_threads(1)
            first = pool_with_grads(fused_pool("cpu"), inputs, kind)
            for run in range(20):
                torch.set_num_threads(1 + run % 3)
                assert torch.get_num_threads() == 1 + run % 3
                again = pool_with_grads(fused_pool("cpu"), inputs, kind)
                for name, tensor in again.items():
                    assert torch.equal(tensor, first[name]), (
                        f"kind={kind} run {run + 1} ({1 + run % 3} threads): {name} differs from 1 thread")
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# "iAT fused in O(B^2 T) without a [B, B, T] tensor": peak memory of a real run


_PEAK_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, fused_attn_at
    B, T, H = 512, 1024, 4
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g).requires_grad_()
    scores = torch.randn(B, T, generator=g).requires_grad_()
    grad = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    fused_attn_at.perturbation("iat", scores.detach()[:2], mask[:2], grad=grad[:2], backend=sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = fused_attn_at.attention_pool(h, scores, mask, perturbation="iat", grad=grad, backend=sys.argv[1])
    (out.context.sum() + out.attention.sum()).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": after - before}))
""")


def _peak_growth(backend_name: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, backend_name], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth"]


def test_iat_never_allocates_a_batch_by_batch_by_length_tensor():
    """At B=512, T=1024 one float32 [B, B, T] tensor is 1 GiB. The fused iAT fwd+bwd grows the peak resident
    memory by less than a quarter of that (h, scores and outputs are ~10 MiB); the reference, which does build
    the [B, B, T] differences, grows it by more than a whole one: the measure can tell the two apart."""
    require_backend("cpu")
    one_tensor = 512 * 512 * 1024 * 4
    fused = _peak_growth("cpu")
    print(f"peak RSS growth: fused iAT {fused / 2**20:.1f} MiB; one [B, B, T] tensor is {one_tensor / 2**20:.0f} MiB")
    assert fused < one_tensor / 4
    reference = _peak_growth("reference")
    print(f"peak RSS growth: reference iAT {reference / 2**20:.1f} MiB")
    assert reference > one_tensor


# ---------------------------------------------------------------------------------------------------------
# 64-bit offsets past 2^31 elements, without touching that much memory


def test_cpu_kernel_reads_and_writes_past_2_to_the_31_elements():
    """h's batch stride is 2^31 + 64 elements: row 1 starts 8 GiB into a buffer that is never touched except at
    the two rows (torch.empty maps it lazily, so no memory is used). Values and gradients must equal those of
    the same numbers in a compact tensor; 32-bit offsets would read row 1 from row 0's region (or fault)."""
    require_backend("cpu")
    B, T, H = 2, 33, 64
    stride = 2 ** 31 + 64
    base = torch.empty(stride + T * H, dtype=torch.float32)
    h_far = base.as_strided((B, T, H), (stride, H, 1))
    inputs = make_inputs(B, T, H, "padding", seed=4)
    h_far.copy_(inputs.h)
    assert h_far.storage_offset() == 0 and h_far.stride(0) > 2 ** 31
    for kind in ("at", "iat"):
        h1 = h_far.detach().requires_grad_()
        scores1 = inputs.scores.clone().requires_grad_()
        out = fused_attn_at.attention_pool(h1, scores1, inputs.mask, backend="cpu", **inputs.kwargs(kind))
        dc, da = cotangents(inputs)
        grads = torch.autograd.grad((out.context * dc).sum() + (out.attention * da).sum(), (h1, scores1))
        expected = pool_with_grads(fused_pool("cpu"), inputs, kind)
        for name, got in (("context", out.context), ("attention", out.attention), ("grad_h", grads[0]),
                          ("grad_scores", grads[1])):
            assert torch.equal(got.detach(), expected[name]), f"{kind}: {name} differs past 2^31 elements"


# ---------------------------------------------------------------------------------------------------------
# Zero sizes: values and gradients, not only shapes


@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 0, 3), (2, 4, 0)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_zero_sizes_values_and_gradients(backend_name, kind, shape):
    if backend_name != "reference":
        require_backend(backend_name)
    inputs = make_inputs(*shape, "none", seed=2, dtype=torch.float64)
    with torch.autograd.set_detect_anomaly(False):
        got = pool_with_grads(fused_pool(backend_name), inputs, kind)
    B, T, H = shape
    expected_shapes = dict(context=(B, H), attention=(B, T), grad_h=(B, T, H), grad_scores=(B, T))
    for name, tensor in got.items():
        assert tuple(tensor.shape) == expected_shapes[name], name
        assert torch.isfinite(tensor).all(), name
    # nothing to attend to (T = 0) is a zero context; with H = 0 the attention is still the softmax
    if T == 0:
        assert torch.equal(got["context"], torch.zeros(B, H, dtype=torch.float64))
    if H == 0 and B > 0:
        if kind == "iat":
            r = python_ref.perturbation("iat", inputs.scores, None, grad=inputs.grad)
        elif kind is not None:
            r = python_ref.perturbation(kind, inputs.scores, None, **inputs.perturbation_kwargs(kind))
        else:
            r = torch.zeros_like(inputs.scores)
        torch.testing.assert_close(got["attention"], torch.softmax(inputs.scores + r, -1), rtol=1e-12, atol=1e-14)
        assert float(got["grad_scores"].abs().max()) > 0.0  # the attention's own gradient still flows


# ---------------------------------------------------------------------------------------------------------
# torch.compile(dynamic=True): new B and T without recompiling


def test_compile_dynamic_shapes_cpu_backend_no_recompile():
    require_backend("cpu")
    import torch._dynamo

    torch._dynamo.reset()
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    def pooled(h, scores, mask, grad):
        out = fused_attn_at.attention_pool(h, scores, mask, perturbation="at", grad=grad, backend="cpu")
        return out.context, out.attention

    compiled = torch.compile(pooled, fullgraph=True, dynamic=True, backend=counting_backend)
    for B, T in [(2, 5), (3, 9), (5, 17), (4, 31)]:  # not 1: torch.compile specialises sizes 0 and 1
        inputs = make_inputs(B, T, 6, "padding", seed=B + T, dtype=torch.float64)
        got = pool_with_grads(lambda h, s, m, **kw: fused_attn_at.AttentionPoolOutput(*compiled(h, s, m, kw["grad"])),
                              inputs, "at")
        expected = pool_with_grads(python_ref.attention_pool, inputs, "at")
        for name, tensor in got.items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{B}x{T} {name}: {m}")
    assert len(frames) == 1, f"compiled {len(frames)} times for 4 shapes with dynamic=True"

    inductor = torch.compile(pooled, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for B, T in [(2, 5), (3, 9), (4, 12)]:
            inputs = make_inputs(B, T, 6, "empty_row", seed=B, dtype=torch.float64)
            context, attention = inductor(inputs.h, inputs.scores, inputs.mask, inputs.grad)
            expected = python_ref.attention_pool(inputs.h, inputs.scores, inputs.mask, perturbation="at",
                                                 grad=inputs.grad)
            torch.testing.assert_close(context, expected.context, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Autocast: mixed dtypes under torch.autocast run in the widest input dtype instead of raising


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_autocast_bfloat16_mixed_dtypes(backend_name):
    """Under torch.autocast("cpu", bfloat16) a Linear's bfloat16 output meets float32 scores; before the fix
    that raised TypeError (scores must have the dtype of h)."""
    if backend_name != "reference":
        require_backend(backend_name)
    inputs = make_inputs(3, 11, 8, "padding", seed=1)
    proj = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = proj(inputs.h)
        assert h.dtype == torch.bfloat16
        scores = inputs.scores.clone().requires_grad_()
        out = fused_attn_at.attention_pool(h, scores, inputs.mask, perturbation="at", grad=inputs.grad,
                                           backend=backend_name)
    assert out.context.dtype == torch.float32 and out.attention.dtype == torch.float32
    expected = python_ref.attention_pool(h.float(), scores, inputs.mask, perturbation="at", grad=inputs.grad)
    torch.testing.assert_close(out.context, expected.context, rtol=1e-5, atol=1e-6)
    out.context.sum().backward()
    assert scores.grad is not None and proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


# ---------------------------------------------------------------------------------------------------------
# Warnings point at the user's call, however deep the dispatch (custom op, autograd function, backend) went


@pytest.mark.parametrize("op", ["attention_pool", "perturbed_attention"])
@pytest.mark.parametrize("backend_name", ["cpu", "triton", "reference"])
def test_iat_batch_of_one_warning_points_at_the_caller(op, backend_name):
    if backend_name != "reference":
        require_backend(backend_name)
    gen = torch.Generator().manual_seed(0)
    if op == "attention_pool":
        h, scores, grad = (torch.randn(*s, generator=gen) for s in ((1, 5, 3), (1, 5), (1, 5)))
        call = lambda: fused_attn_at.attention_pool(h, scores, None, perturbation="iat", grad=grad,  # noqa: E731
                                                     backend=backend_name)
    else:
        q, grad = torch.randn(1, 2, 5, 4, generator=gen), torch.randn(1, 2, 5, 5, generator=gen)
        call = lambda: fused_attn_at.perturbed_attention(q, q, q, perturbation="iat", grad=grad,  # noqa: E731
                                                         backend=backend_name)
    with pytest.warns(UserWarning, match="iAT perturbation with a batch of one") as caught:
        call()
    files = {os.path.abspath(w.filename) for w in caught if "batch of one" in str(w.message)}
    assert files == {os.path.abspath(__file__)}, f"the warning points at {files}, not at the calling test"
