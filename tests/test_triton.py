"""The Triton backend's own paths, under the interpreter on CPU (conftest.py sets TRITON_INTERPRET=1 without a GPU).

The shared matrix (test_attention_pool.py, test_perturbation.py) runs the Triton backend at its default launch
parameters, where the small test shapes fit one block. Here small blocks are forced so that every loop runs
several times: over T blocks (online softmax across blocks), over H blocks, over blocks of other rows j (iAT),
and rows split over several programs (H in the forward, T in the backward). Also: float64 gradcheck through
those loops, float16/bfloat16, views, the torch.library registration, and the compile of every kernel for a
Hopper GPU (sm_90) without one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
import warnings

import pytest
import torch

import fused_attn_at
import python_ref
from _helpers import (
    KINDS,
    Inputs,
    check_against_reference,
    check_low_precision_against_reference,
    check_perturbation_against_reference,
    cotangents,
    fused_pool,
    low_precision_references,
    make_inputs,
    pool_cases,
    pool_with_grads,
    require_backend,
    ulp_rule_violations,
)
from fused_attn_at.ops import triton_attention_pool as tri
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(autouse=True)
def _triton_backend():
    require_backend("triton")


# T = 37 is three T blocks of 16 (the last one partial), H = 10 three H blocks of 4 shared by two programs
# (one of them loops over two), B = 5 three blocks of 2 other rows for iAT.
SMALL_BLOCKS = dict(block_t=16, block_h=4, block_j=2, split=2)


@pytest.mark.parametrize("mask_pattern", ("none", "padding", "empty_row"))
@pytest.mark.parametrize("kind", KINDS)
def test_block_loops_match_reference(kind, mask_pattern):
    inputs = make_inputs(5, 37, 10, mask_pattern, seed=21)
    with tri.launch_overrides(**SMALL_BLOCKS):
        check_against_reference("triton", inputs, kind, eps=0.7, what=f"small blocks kind={kind} {mask_pattern}")
        if kind is not None:
            check_perturbation_against_reference("triton", inputs, kind, eps=0.7,
                                                 what=f"small blocks perturbation {kind} {mask_pattern}")


@pytest.mark.parametrize("kind", ("at", "iat"))
def test_long_rows(kind):
    """T = 515 is 17 blocks of 32: the online softmax runs over many blocks, with scores spread widely so
    that the running max moves."""
    inputs = make_inputs(3, 515, 6, "padding", seed=22, score_scale=8.0)
    with tri.launch_overrides(block_t=32, block_h=8, block_j=2):
        check_against_reference("triton", inputs, kind, what=f"T=515 kind={kind}")


def _transposed(inputs: Inputs) -> Inputs:
    """The same values as views: h from a [B, H, T] tensor, the [B, T] tensors from [T, B] ones."""
    def tr(x):
        return None if x is None else x.transpose(0, 1).contiguous().transpose(0, 1)
    return Inputs(inputs.h.transpose(1, 2).contiguous().transpose(1, 2), tr(inputs.scores), tr(inputs.mask),
                  tr(inputs.grad), tr(inputs.noise))


@pytest.mark.parametrize("kind", KINDS)
def test_transposed_views_with_block_loops(kind):
    inputs = _transposed(make_inputs(4, 21, 9, "padding", seed=23))
    assert not (inputs.h.is_contiguous() or inputs.scores.is_contiguous() or inputs.mask.is_contiguous())
    with tri.launch_overrides(**SMALL_BLOCKS):
        check_against_reference("triton", inputs, kind, what=f"transposed kind={kind}")


@pytest.mark.parametrize("kind", ("at", "iat"))  # "rp" runs the code of "at"; None is covered by both
def test_float64_gradcheck_through_block_loops(kind):
    inputs = make_inputs(3, 9, 5, "empty_row", seed=24, dtype=torch.float64)
    h, scores = inputs.leaves()
    pool = fused_pool("triton")
    with tri.launch_overrides(block_t=4, block_h=2, block_j=2, split=2):
        if kind != "iat":
            def fn(h, scores):
                return tuple(pool(h, scores, inputs.mask, **inputs.kwargs(kind)))
            assert torch.autograd.gradcheck(fn, (h, scores), fast_mode=True)
            return
        # iAT's r depends on the scores but is a constant for autograd (SPEC): gradcheck h alone, and check
        # the gradient wrt the scores against the reference's autograd through masked_softmax(s + r), r fixed.
        def fn_h(h):
            return tuple(pool(h, inputs.scores, inputs.mask, **inputs.kwargs("iat")))
        assert torch.autograd.gradcheck(fn_h, (h,), fast_mode=True)
        out = pool(h, scores, inputs.mask, **inputs.kwargs("iat"))
        dc, da = cotangents(inputs)
        grads = torch.autograd.grad((out.context * dc).sum() + (out.attention * da).sum(), (h, scores))
    r = python_ref.iat_perturbation(inputs.scores, inputs.grad, inputs.mask)
    assert r.abs().sum() > 0  # a perturbation that does something
    h_ref, scores_ref = inputs.leaves()
    attention_ref = python_ref.masked_softmax(scores_ref + r, inputs.mask)
    context_ref = torch.bmm(attention_ref[:, None, :], h_ref).squeeze(1)
    torch.testing.assert_close(out.attention, attention_ref, rtol=1e-10, atol=1e-12)
    grads_ref = torch.autograd.grad((context_ref * dc).sum() + (attention_ref * da).sum(), (h_ref, scores_ref))
    for name, got, expected in zip(("grad_h", "grad_scores"), grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_low_precision(dtype):
    """float16/bfloat16 in and out, float32 inside: within the ulp rule (tests/_helpers.py: the float32 reference
    rounded to the dtype plus 2 ulps, row by row). (The interpreter truncates float32 -> bfloat16; the kernels
    round to nearest even as a GPU does.)"""
    for kind in (None, "at", "iat"):
        inputs = make_inputs(4, 37, 16, "empty_row", seed=25, dtype=dtype)
        with tri.launch_overrides(block_t=16, block_h=8):
            check_low_precision_against_reference("triton", inputs, kind, what=f"{dtype} kind={kind}")


def test_split_rows_are_deterministic():
    """Rows split over programs still reduce in a fixed order: two runs are bit-identical."""
    inputs = make_inputs(3, 40, 12, "padding", seed=26)
    with tri.launch_overrides(block_t=8, block_h=4, split=3):
        first = pool_with_grads(fused_pool("triton"), inputs, "at")
        again = pool_with_grads(fused_pool("triton"), inputs, "at")
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name


def test_batch_of_one_iat_with_split_rows():
    inputs = make_inputs(1, 20, 6, "none", seed=27)
    with tri.launch_overrides(**SMALL_BLOCKS), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = fused_attn_at.perturbation("iat", inputs.scores, inputs.mask, grad=inputs.grad, backend="triton")
    assert torch.equal(r, torch.zeros_like(r))
    assert any("batch of one" in str(w.message) for w in caught)


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")  # no torch.compile on the interpreter


@pytest.mark.parametrize("kind", (0, 1, 2))
def test_opcheck(kind):
    """torch.library registration: schema, autograd and fake (meta) implementation agree with the kernels."""
    inputs = make_inputs(3, 10, 4, "padding", seed=28, dtype=torch.float64)
    h, scores = inputs.leaves()
    direction = inputs.grad if kind else None
    torch.library.opcheck(torch.ops.fused_attn_at_triton.attention_pool_fwd,
                          (h, scores, inputs.mask, direction, kind, 0.5), test_utils=OPCHECK_UTILS)
    if kind:
        torch.library.opcheck(torch.ops.fused_attn_at_triton.perturbation,
                              (inputs.scores, inputs.mask, inputs.grad, kind, 0.5), test_utils=OPCHECK_UTILS)


def test_launch_overrides_are_checked():
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        with tri.launch_overrides(block_t=12):
            pass
    with pytest.raises(ValueError, match="unknown parameter 'blok_t'"):
        with tri.launch_overrides(blok_t=16):
            pass
    with tri.launch_overrides(block_t=16):
        assert tri._launch_params(2, 100, 8, torch.float32, torch.device("cpu"))["block_t"] == 16
    assert tri._launch_params(2, 100, 8, torch.float32, torch.device("cpu"))["block_t"] == 64


# ---------------------------------------------------------------------------------------------------------
# Compiling for a Hopper GPU without one (Triton bundles ptxas)

# (kernel, dtype, constexpr overrides); the forward with the inline AT/RP normalisation and with a given r (iAT).
HOPPER_BUILDS = (
    ("_fwd_kernel", "float32", {}), ("_fwd_kernel", "float32", {"PERTURB": 2}), ("_fwd_kernel", "bfloat16", {}),
    ("_fwd_kernel", "float64", {}), ("_bwd_dh_da_kernel", "float32", {}), ("_bwd_dh_da_kernel", "bfloat16", {}),
    ("_bwd_dh_da_kernel", "float64", {}), ("_bwd_dscores_kernel", "float32", {}),
    ("_iat_coeff_kernel", "float32", {}), ("_perturbation_kernel", "float32", {"KIND": 1}),
    ("_perturbation_kernel", "float32", {"KIND": 2}),
    # the pair ops (issue 17): both softmaxes and contexts in one forward, the pair backward, dh not written
    ("_fwd_kernel", "float32", {"PAIR": True}), ("_fwd_kernel", "bfloat16", {"PAIR": True, "PERTURB": 2}),
    ("_bwd_dh_da_kernel", "float32", {"PAIR": True}), ("_bwd_dh_da_kernel", "bfloat16", {"PAIR": True}),
    ("_bwd_dh_da_kernel", "float32", {"STORE_DH": False}), ("_bwd_dscores_kernel", "float32", {"PAIR": True}),
)

_COMPILE_SCRIPT = """
import json, re, sys, time, torch
from fused_attn_at.ops import triton_attention_pool as tri
results = []
for name, dtype, constexprs in json.loads(sys.argv[1]):
    start = time.perf_counter()
    compiled = tri.compile_for_gpu(name, getattr(torch, dtype), arch=90, **constexprs)
    ptx = compiled.asm["ptx"]
    results.append(dict(name=name, dtype=dtype, constexprs=constexprs, seconds=time.perf_counter() - start,
                        target_sm90=".target sm_90" in ptx, cubin_bytes=len(compiled.asm["cubin"]),
                        vector_loads=len(re.findall(r"ld\\.global[^\\n]*\\.v[24]\\.", ptx)),
                        vector_stores=len(re.findall(r"st\\.global[^\\n]*\\.v[24]\\.", ptx))))
print(json.dumps(results))
"""


def test_kernels_compile_for_hopper():
    """Every kernel compiles to PTX and a cubin for sm_90; the loads of h (forward, backward) and the stores of
    dh are 16-byte vector accesses for contiguous inputs. Runs in a subprocess: the JIT must not be interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    package_root = str(pathlib.Path(fused_attn_at.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(HOPPER_BUILDS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"compiled {len(results)} kernels for sm_90 in {time.perf_counter() - start:.1f} s")
    assert len(results) == len(HOPPER_BUILDS)
    for result in results:
        what = f"{result['name']} {result['dtype']} {result['constexprs']}"
        assert result["target_sm90"] and result["cubin_bytes"] > 0, what
        if result["name"] in ("_fwd_kernel", "_bwd_dh_da_kernel"):
            assert result["vector_loads"] > 0, f"{what}: no vector loads of h"
        if result["name"] == "_bwd_dh_da_kernel" and result["constexprs"].get("STORE_DH", True):
            assert result["vector_stores"] > 0, f"{what}: no vector stores of dh"
        if result["name"] == "_bwd_dh_da_kernel" and not result["constexprs"].get("STORE_DH", True):
            assert result["vector_stores"] == 0, f"{what}: stores dh [B, T, H] without STORE_DH"


def test_float64_eps_is_not_rounded_to_float32():
    """Triton passes Python floats as float32: eps = 0.7 must still reach float64 kernels unrounded."""
    inputs = make_inputs(3, 20, 4, "padding", seed=29, dtype=torch.float64)
    for kind in ("at", "iat"):
        r = fused_attn_at.perturbation(kind, inputs.scores, inputs.mask, grad=inputs.grad, eps=0.7, backend="triton")
        expected = python_ref.perturbation(kind, inputs.scores, inputs.mask, grad=inputs.grad, eps=0.7)
        torch.testing.assert_close(r, expected, rtol=1e-13, atol=1e-15)
        out = fused_attn_at.attention_pool(inputs.h, inputs.scores, inputs.mask, perturbation=kind, grad=inputs.grad,
                                           eps=0.7, backend="triton")
        reference = python_ref.attention_pool(inputs.h, inputs.scores, inputs.mask, perturbation=kind,
                                              grad=inputs.grad, eps=0.7)
        torch.testing.assert_close(out.attention, reference.attention, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# Double backward (issue 14, item 1): with create_graph=True the backward is the composite of differentiable
# torch ops (fused_attn_at/ops/_composite.py) over the saved attention, an output of the op.

def _second_order(pool, inputs: Inputs, kind, seed: int = 7):
    """First-order gradients (recorded) and the gradients of <v, first-order> wrt (h, scores)."""
    h, scores = inputs.leaves()
    out = pool(h, scores, inputs.mask, **inputs.kwargs(kind, 0.8))
    dc, da = cotangents(inputs)
    first = torch.autograd.grad((out.context * dc).sum() + (out.attention * da).sum(), (h, scores), create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    v_h, v_s = (torch.randn(x.shape, generator=generator, dtype=x.dtype) for x in first)
    second = torch.autograd.grad((first[0] * v_h).sum() + (first[1] * v_s).sum(), (h, scores), allow_unused=True)
    second = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(second, (h, scores)))
    return tuple(x.detach() for x in first), second


@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_gradgradcheck(kind):
    """gradgradcheck in float64 with padding and a fully masked row, r held fixed (grad/noise are constants;
    iAT's r is rebuilt from the scores, so there only h varies: the scores' second order is checked against
    the reference below)."""
    inputs = make_inputs(3, 6, 4, "empty_row", seed=31, dtype=torch.float64)
    h, scores = inputs.leaves()
    pool = fused_pool("triton")
    kwargs = inputs.kwargs(kind, 0.8)
    # Default launch parameters (one block per row): gradgradcheck runs the forward many times.
    if kind == "iat":
        assert torch.autograd.gradgradcheck(
            lambda h: tuple(pool(h, inputs.scores, inputs.mask, **kwargs)), (h,), fast_mode=True)
    else:
        assert torch.autograd.gradgradcheck(
            lambda h, scores: tuple(pool(h, scores, inputs.mask, **kwargs)), (h, scores), fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_matches_reference(kind):
    """First and second order gradients against python_ref's autograd (plain PyTorch) at rtol 1e-10; the fully
    masked row's are exactly 0."""
    inputs = make_inputs(4, 9, 5, "empty_row", seed=32, dtype=torch.float64)
    with tri.launch_overrides(block_t=4, block_h=2, split=2):
        got = _second_order(fused_pool("triton"), inputs, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _second_order(python_ref.attention_pool, inputs, kind)
    names = ("grad_h", "grad_scores", "grad_h of <v, grads>", "grad_scores of <v, grads>")
    for name, a, b in zip(names, got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"kind={kind} {name}: {m}")
        assert torch.equal(a[0], torch.zeros_like(a[0])), f"{name}: the fully masked row is not 0"
    assert got[1][1].abs().sum() > 0 and got[1][0].abs().sum() > 0  # not vacuous


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_recorded_backward_matches_the_kernel_backward(dtype):
    """create_graph=True takes the composite (float32 inside for bfloat16), plain backward the kernels: the same
    first-order gradients."""
    inputs = make_inputs(3, 21, 6, "padding", seed=33, dtype=dtype)
    dc, da = cotangents(inputs)
    grads = {}
    for create_graph in (False, True):
        h, scores = inputs.leaves()
        out = fused_attn_at.attention_pool(h, scores, inputs.mask, perturbation="at", grad=inputs.grad,
                                           backend="triton")
        grads[create_graph] = torch.autograd.grad((out.context * dc).sum() + (out.attention * da).sum(), (h, scores),
                                                  create_graph=create_graph)
        assert all(g.dtype == dtype for g in grads[create_graph])
    assert grads[True][1].requires_grad and not grads[False][1].requires_grad
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# NaN/inf at real positions, caught by the kernels (issue 14, item 2)

NONFINITE_CASES = (("scores", None), ("scores", "iat"), ("grad", "at"), ("grad", "iat"), ("noise", "rp"))


def _poisoned(inputs: Inputs, which: str, value: float, padded: bool) -> Inputs:
    """`inputs` with `value` in tensor `which` at a real position (row 1, position 0), or at every padded one."""
    x = getattr(inputs, which).clone()
    if padded:
        x = x.masked_fill(~inputs.mask, value)
    else:
        assert inputs.mask[1, 0]
        x[1, 0] = value
    return dataclasses.replace(inputs, **{which: x})


# Triton's interpreter runs the kernel in numpy, which warns on the inf arithmetic before the kernel's own flag
# turns into the ValueError asserted here; on a GPU there is no such warning.
@pytest.mark.filterwarnings("ignore:invalid value encountered in:RuntimeWarning")
@pytest.mark.parametrize("value", (float("nan"), float("inf")))
@pytest.mark.parametrize("which, kind", NONFINITE_CASES)
def test_nonfinite_real_value_raises(which, kind, value):
    """ValueError naming the argument, from attention_pool and perturbation; the check is the kernels' own
    (fused_attn_at.functional no longer runs one for this backend)."""
    from fused_attn_at import functional

    assert "triton" in functional._KERNEL_CHECKS_VALUES
    inputs = _poisoned(make_inputs(3, 10, 4, "padding", seed=34), which, value, padded=False)
    message = f"{which} holds NaN or inf at real \\(unmasked\\) positions"
    with tri.launch_overrides(block_t=4, split=2):
        with pytest.raises(ValueError, match=message):
            fused_attn_at.attention_pool(inputs.h, inputs.scores, inputs.mask, backend="triton", **inputs.kwargs(kind))
        if kind is not None:
            with pytest.raises(ValueError, match=message):
                fused_attn_at.perturbation(kind, inputs.scores, inputs.mask, backend="triton",
                                           **inputs.perturbation_kwargs(kind))


@pytest.mark.parametrize("kind", (0, 1, 2))
# Triton's interpreter computes the NaN/inf the op then rejects in numpy, which warns about it
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_ops_check_the_values_they_read(kind):
    """The ops themselves (no Python check before them) reject NaN in the scores and in the direction."""
    inputs = make_inputs(3, 10, 4, "padding", seed=35)
    ops = torch.ops.fused_attn_at_triton
    bad_scores = _poisoned(inputs, "scores", float("nan"), padded=False).scores
    with pytest.raises(ValueError, match="scores holds NaN or inf"):
        ops.attention_pool_fwd(inputs.h, bad_scores, inputs.mask, inputs.grad if kind else None, kind, 1.0)
    if kind:
        bad_grad = _poisoned(inputs, "grad", float("inf"), padded=False).grad
        with pytest.raises(ValueError, match="direction holds NaN or inf"):
            ops.attention_pool_fwd(inputs.h, inputs.scores, inputs.mask, bad_grad, kind, 1.0)
        with pytest.raises(ValueError, match="scores holds NaN or inf"):
            ops.perturbation(bad_scores, inputs.mask, inputs.grad, kind, 1.0)
        with pytest.raises(ValueError, match="direction holds NaN or inf"):
            ops.perturbation(inputs.scores, inputs.mask, bad_grad, kind, 1.0)


@pytest.mark.parametrize("which, kind", NONFINITE_CASES)
def test_nonfinite_padded_values_are_accepted(which, kind):
    inputs = make_inputs(3, 10, 4, "padding", seed=36)
    clean = pool_with_grads(fused_pool("triton"), inputs, kind)
    dirty = pool_with_grads(fused_pool("triton"), _poisoned(inputs, which, float("nan"), padded=True), kind)
    for name, tensor in clean.items():
        assert torch.equal(tensor, dirty[name]), name


def _compiled_pool(kind, **compile_kwargs):
    def step(h, scores, mask, grad, noise):
        out = fused_attn_at.attention_pool(h, scores, mask, perturbation=kind, grad=grad, noise=noise,
                                           backend="triton")
        return out.context, out.attention
    return torch.compile(step, backend="aot_eager", fullgraph=True, **compile_kwargs)


@pytest.mark.parametrize("which, kind", (("scores", "at"), ("grad", "iat"), ("noise", "rp")))
def test_nonfinite_under_torch_compile(which, kind):
    """torch.compile(fullgraph=True) rejects what eager rejects (the Python check is skipped while compiling:
    the kernels' flags are what catch it) and accepts NaN at padded positions, with eager's result.
    backend="aot_eager": under the interpreter the op is opaque to the compiler (see _define_op); on a GPU
    the flags reach torch._assert_async in the traced graph (tests/test_gpu.py)."""
    torch._dynamo.reset()
    inputs = make_inputs(3, 10, 4, "padding", seed=37)
    compiled = _compiled_pool(kind)
    bad = _poisoned(inputs, which, float("nan"), padded=False)
    with pytest.raises((ValueError, RuntimeError), match="holds NaN or inf at real \\(unmasked\\) positions"):
        compiled(bad.h, bad.scores, bad.mask, bad.kwargs(kind)["grad"], bad.kwargs(kind)["noise"])
    padded = _poisoned(inputs, which, float("nan"), padded=True)
    got = compiled(padded.h, padded.scores, padded.mask, padded.kwargs(kind)["grad"], padded.kwargs(kind)["noise"])
    expected = fused_attn_at.attention_pool(inputs.h, inputs.scores, inputs.mask, backend="triton",
                                            **inputs.kwargs(kind))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# torch.compile with dynamic shapes (issue 14, item 9)

@pytest.mark.parametrize("kind", ("at", "iat"))
def test_torch_compile_dynamic_shapes_do_not_recompile(kind):
    """dynamic=True: three (B, T) in turn compile once (a compile counter sees no new graph after the first
    call), forward and backward matching eager. backend="aot_eager" (AOTAutograd's traced forward and backward,
    run eagerly): Inductor also runs under the interpreter, where the op is opaque to it (see _define_op), but
    costs seconds of C++ compiles per graph on a CPU, and its cache (keyed on the graph that calls the op, not
    on the op's code) can hand back a stale graph after the op changes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(h, scores, mask, grad):
        out = fused_attn_at.attention_pool(h, scores, mask, perturbation=kind, grad=grad, backend="triton")
        return out.context, out.attention

    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    graphs = []
    for batch, length in ((3, 7), (4, 11), (6, 5)):
        inputs = make_inputs(batch, length, 4, "padding", seed=38 + batch)
        dc, da = cotangents(inputs)
        results = []
        for fn in (compiled, step):
            h, scores = inputs.leaves()
            context, attention = fn(h, scores, inputs.mask, inputs.grad)
            grads = torch.autograd.grad((context * dc).sum() + (attention * da).sum(), (h, scores))
            results.append((context, attention) + grads)
        graphs.append(counter.frame_count)
        for name, a, b in zip(("context", "attention", "grad_h", "grad_scores"), *results):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"B={batch} T={length} {name}: {m}")
    assert graphs[0] >= 1 and graphs == graphs[:1] * 3, f"graphs compiled after each shape: {graphs}"


# ---------------------------------------------------------------------------------------------------------
# Zero sizes (issue 14, item 10): values and gradients, not just shapes

@pytest.mark.parametrize("backend_name", ("triton", "reference"))
@pytest.mark.parametrize("shape", ((0, 5, 3), (3, 0, 4), (3, 5, 0), (0, 0, 0)), ids=str)
def test_zero_sizes_match_reference(backend_name, shape):
    batch, length, hidden = shape
    generator = torch.Generator().manual_seed(39)
    base = make_inputs(max(batch, 1), max(length, 1), max(hidden, 1), "none", seed=39)
    inputs = Inputs(base.h[:batch, :length, :hidden].contiguous(), base.scores[:batch, :length].contiguous(),
                    torch.rand(batch, length, generator=generator) < 0.7, base.grad[:batch, :length].contiguous(),
                    base.noise[:batch, :length].contiguous())
    for kind in KINDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = pool_with_grads(fused_pool(backend_name), inputs, kind)
            expected = pool_with_grads(python_ref.attention_pool, inputs, kind)
            if kind is not None:
                r = fused_attn_at.perturbation(kind, inputs.scores, inputs.mask, backend=backend_name,
                                               **inputs.perturbation_kwargs(kind))
                r_ref = python_ref.perturbation(kind, inputs.scores, inputs.mask, **inputs.perturbation_kwargs(kind))
                torch.testing.assert_close(r, r_ref, rtol=1e-6, atol=1e-7)
        for name, tensor in expected.items():
            assert got[name].shape == tensor.shape, name
            torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"{shape} kind={kind} {name}: {m}")
        if hidden == 0 and batch * length:  # the attention and its gradient still carry values
            assert expected["attention"].abs().sum() > 0 and expected["grad_scores"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# The launches run on the tensors' device (issue 14, item 13)

def test_launches_enter_the_tensors_device(monkeypatch):
    """Every launch (forward, backward, perturbation) goes through _device_guard with the inputs' device;
    for a CUDA device that is torch.cuda.device(device), not the current device (2 GPUs: tests/test_gpu.py)."""
    entered = []
    real_guard = tri._device_guard

    def spy(device):
        entered.append(device)
        return real_guard(device)

    monkeypatch.setattr(tri, "_device_guard", spy)
    inputs = make_inputs(3, 6, 4, "padding", seed=40)
    pool_with_grads(fused_pool("triton"), inputs, "iat")
    fused_attn_at.perturbation("at", inputs.scores, inputs.mask, grad=inputs.grad, backend="triton")
    assert entered == [torch.device("cpu")] * 3  # forward, backward, perturbation
    assert isinstance(real_guard(torch.device("cpu")), contextlib.nullcontext)
    guard = real_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


# ---------------------------------------------------------------------------------------------------------
# Hypothesis over the block loops (issue 14, item 8): small launch parameters drawn too, so that the
# multi-block paths (online softmax across T blocks, H blocks, rows split over programs, iAT's blocks of other
# rows) are fuzzed, not only the single-block one of the default parameters at small shapes.

LAUNCHES = st.fixed_dictionaries(dict(block_t=st.sampled_from((4, 8, 16)), block_h=st.sampled_from((2, 4, 8)),
                                      block_j=st.sampled_from((1, 2, 4)), split=st.integers(1, 3)))
# Examples per property, sized for about a minute for the two of them under the interpreter on one core
# (B <= 6, T <= 40 and H <= 12 still span up to 10 T blocks, 6 H blocks and 6 blocks of other rows).
BLOCK_EXAMPLES = {"pool": 20, "perturbation": 20}


@st.composite
def block_cases(draw):
    """pool_cases (B <= 6, T <= 40, H <= 12) with launch parameters drawn too."""
    inputs, kind, eps = draw(pool_cases(max_batch=6, max_length=40, max_hidden=12))
    return inputs, kind, eps, draw(LAUNCHES)


@settings(max_examples=BLOCK_EXAMPLES["pool"], deadline=None, derandomize=True, database=None)
@given(case=block_cases())
def test_block_loops_property(case):
    inputs, kind, eps, launch = case
    with tri.launch_overrides(**launch), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iAT with B = 1
        check_against_reference("triton", inputs, kind, eps,
                                what=f"B,T,H={tuple(inputs.h.shape)} kind={kind} eps={eps} {launch}")


@settings(max_examples=BLOCK_EXAMPLES["perturbation"], deadline=None, derandomize=True, database=None)
@given(case=block_cases())
def test_block_loops_perturbation_property(case):
    inputs, kind, eps, launch = case
    kind = kind or "iat"
    with tri.launch_overrides(**launch), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_perturbation_against_reference("triton", inputs, kind, eps,
                                             what=f"B,T={tuple(inputs.scores.shape)} {kind} eps={eps} {launch}")


# ---------------------------------------------------------------------------------------------------------
# The ulp rule of float16/bfloat16 has teeth (issue 14, item 7)

def _accumulating_in(dtype, h, scores, mask, lanes: int):
    """(context, attention) of a forward shaped like the Triton kernel (`lanes` positions at a time, one running
    sum per lane) whose accumulators are held in `dtype`: each lane's sum is rounded to `dtype` after every add."""
    B, T, H = h.shape
    valid = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    s = scores.float().masked_fill(~valid, float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(valid.any(-1, keepdim=True), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    pad = (-T) % lanes
    e_blocks = torch.nn.functional.pad(e, (0, pad)).reshape(B, -1, lanes)
    lane_sum = torch.zeros(B, lanes, dtype=dtype)
    for k in range(e_blocks.shape[1]):
        lane_sum = (lane_sum.float() + e_blocks[:, k]).to(dtype)
    a = e / lane_sum.float().sum(-1, keepdim=True).clamp_min(1e-30)
    a_blocks = torch.nn.functional.pad(a, (0, pad)).reshape(B, -1, lanes)
    h_blocks = torch.nn.functional.pad(h.float(), (0, 0, 0, pad)).reshape(B, -1, lanes, H)
    acc = torch.zeros(B, lanes, H, dtype=dtype)
    for k in range(a_blocks.shape[1]):
        acc = (acc.float() + a_blocks[:, k, :, None] * h_blocks[:, k]).to(dtype)
    return acc.float().sum(1).to(dtype), a.to(dtype)


def test_ulp_rule_rejects_low_precision_accumulation():
    """At long rows the rule tells float32 accumulation (the kernels) from bfloat16 accumulation: a forward that
    accumulates in bfloat16 (one lane, or 16 lanes at T = 4096) fails it, and so does python_ref computed entirely
    in bfloat16 (its gradient wrt h), while the Triton kernels pass at the same shape."""
    dtype = torch.bfloat16
    inputs = make_inputs(3, 4096, 8, "empty_row", seed=41, dtype=dtype)
    reference64, reference32 = low_precision_references(inputs, None)
    for lanes in (1, 16):
        context, attention = _accumulating_in(dtype, inputs.h, inputs.scores, inputs.mask, lanes)
        rows, worst = ulp_rule_violations(context, reference64["context"], reference32["context"], dtype)
        assert rows > 0 and worst > 1.5, f"{lanes} lanes: bfloat16 accumulation of the context passed ({worst:.3g})"
        rows, worst = ulp_rule_violations(attention, reference64["attention"], reference32["attention"], dtype)
        assert rows > 0, f"{lanes} lanes: bfloat16 accumulation of the softmax sum passed ({worst:.3g})"
    all_low = pool_with_grads(python_ref.attention_pool, inputs, None)
    assert ulp_rule_violations(all_low["grad_h"], reference64["grad_h"], reference32["grad_h"], dtype)[0] > 0
    short = dataclasses.replace(inputs, h=inputs.h[:, :1024], scores=inputs.scores[:, :1024],
                                mask=inputs.mask[:, :1024], grad=inputs.grad[:, :1024], noise=inputs.noise[:, :1024])
    check_low_precision_against_reference("triton", short, None, what="triton bfloat16 T=1024")
