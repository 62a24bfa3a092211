"""fused_attn_at.attention_pool on the fused backends against the reference (python_ref): float64 gradcheck,
float32 forward/backward on odd shapes and strides under the tolerance rule, masking edge cases, determinism,
and hypothesis property tests."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings

import fused_attn_at
import python_ref
from _helpers import (  # noqa: F401  (backend is a fixture)
    pool_cases,
    FUSED_BACKENDS,
    KINDS,
    MASK_PATTERNS,
    Inputs,
    backend,
    check_against_reference,
    cotangents,
    fill_padding,
    fused_pool,
    make_inputs,
    pool_with_grads,
    require_backend,
)

# ---------------------------------------------------------------------------------------------------------
# float64 gradcheck: every backend x perturbation x mask pattern, for h and scores


def _gradcheck(backend: str, fn, inputs) -> None:
    # Under the Triton interpreter every call costs milliseconds: fast_mode checks random projections of the
    # Jacobian instead of all of its entries.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=(backend == "triton"))


@pytest.mark.parametrize("mask_pattern", MASK_PATTERNS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(backend, kind, mask_pattern):
    inputs = make_inputs(3, 5, 4, mask_pattern, seed=11, dtype=torch.float64)
    h, scores = inputs.leaves()
    pool = fused_pool(backend)

    if kind != "iat":
        def fn(h, scores):
            return tuple(pool(h, scores, inputs.mask, **inputs.kwargs(kind)))
        _gradcheck(backend, fn, (h, scores))
        return

    # iAT's r is computed from the scores yet is a constant for autograd (SPEC), so a numerical derivative
    # wrt the scores would move r: gradcheck h alone (r does not depend on h) ...
    def fn_h(h):
        return tuple(pool(h, inputs.scores, inputs.mask, **inputs.kwargs("iat")))
    _gradcheck(backend, fn_h, (h,))

    # ... and compare the analytic gradients wrt the scores with the reference's autograd through
    # masked_softmax(s + r.detach()), r held fixed.
    out = pool(h, scores, inputs.mask, **inputs.kwargs("iat"))
    r = python_ref.iat_perturbation(inputs.scores, inputs.grad, inputs.mask).detach()
    h_ref, scores_ref = inputs.leaves()
    attention_ref = python_ref.masked_softmax(scores_ref + r, inputs.mask)
    context_ref = torch.bmm(attention_ref[:, None, :], h_ref).squeeze(1)
    torch.testing.assert_close(out.attention, attention_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.context, context_ref, rtol=1e-10, atol=1e-12)
    dc, da = cotangents(inputs)
    grads = torch.autograd.grad((out.context * dc).sum() + (out.attention * da).sum(), (h, scores))
    grads_ref = torch.autograd.grad((context_ref * dc).sum() + (attention_ref * da).sum(), (h_ref, scores_ref))
    for name, got, expected in zip(("grad_h", "grad_scores"), grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# float32 forward and backward against the reference, tolerance rule

ODD_LENGTHS = (1, 7, 63, 127, 1031)
ODD_HIDDEN = (1, 3, 256)
# Under the Triton interpreter a call costs 0.1-0.5 s even at small shapes (T = 1031 takes seconds): a few
# shapes cover its masking (T and H not multiples of a block, one position, wide H). Several blocks per row
# under small forced block sizes are the Triton tests' business (tests/test_triton*.py).
TRITON_SHAPES = ((3, 1, 1), (3, 7, 3), (2, 127, 256))


def _shape_cases():
    cases = [pytest.param("cpu", 3, t, h, id=f"cpu-B3-T{t}-H{h}") for t in ODD_LENGTHS for h in ODD_HIDDEN]
    cases += [pytest.param("triton", b, t, h, id=f"triton-B{b}-T{t}-H{h}") for b, t, h in TRITON_SHAPES]
    return cases


@pytest.mark.parametrize("mask_pattern", ("none", "empty_row"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend_name, batch, length, hidden", _shape_cases())
def test_odd_shapes_match_reference(backend_name, batch, length, hidden, kind, mask_pattern):
    require_backend(backend_name)
    inputs = make_inputs(batch, length, hidden, mask_pattern, seed=length * 1000 + hidden)
    check_against_reference(backend_name, inputs, kind, eps=1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_one(backend, kind):
    """B = 1; iAT then has no score differences: r = 0 and exactly one warning says so."""
    inputs = make_inputs(1, 9, 5, "padding", seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fused_pool(backend)(inputs.h, inputs.scores, inputs.mask, **inputs.kwargs(kind))
        r = None if kind is None else fused_attn_at.perturbation(
            kind, inputs.scores, inputs.mask, backend=backend, **inputs.perturbation_kwargs(kind))
    about_batch = [w for w in caught if "batch" in str(w.message).lower()]
    if kind == "iat":
        assert len(about_batch) == 2, [str(w.message) for w in caught]  # one per call
        assert torch.equal(r, torch.zeros_like(r))
        unperturbed = fused_pool(backend)(inputs.h, inputs.scores, inputs.mask)
        torch.testing.assert_close(out.attention, unperturbed.attention, rtol=0, atol=0)
    else:
        assert about_batch == [], [str(w.message) for w in caught]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference warns too
        check_against_reference(backend, inputs, kind)


def _strided(layout: str, batch: int, length: int, hidden: int, seed: int) -> Inputs:
    """Inputs that are views with unusual strides: "transposed" (h from a [B, H, T] tensor, scores and mask
    from [T, B] ones), "sliced" (every other position of a longer sequence, every other channel),
    "expanded" (one example broadcast over the batch: stride 0)."""
    base = make_inputs(batch, 2 * length, 2 * hidden, "scattered", seed=seed)
    if layout == "transposed":
        def tr(x):
            return x.transpose(0, 1).contiguous().transpose(0, 1)
        h = base.h.transpose(1, 2).contiguous().transpose(1, 2)
        return Inputs(h, tr(base.scores), tr(base.mask), tr(base.grad), tr(base.noise))
    if layout == "sliced":
        def sl(x):
            return x[:, ::2]
        return Inputs(base.h[:, ::2, ::2], sl(base.scores), sl(base.mask), sl(base.grad), sl(base.noise))
    if layout == "expanded":
        def ex(x):
            return x[:1].expand(batch, *x.shape[1:])
        # h is shared (stride 0) while the scores differ, so iAT still has nonzero differences
        return dataclasses.replace(base, h=ex(base.h))
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ("transposed", "sliced", "expanded"))
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs(backend, layout, kind):
    inputs = _strided(layout, 4, 13, 6, seed=5)
    assert not inputs.h.is_contiguous()
    if layout != "expanded":
        assert not (inputs.scores.is_contiguous() or inputs.mask.is_contiguous() or inputs.grad.is_contiguous())
    check_against_reference(backend, inputs, kind, what=f"{backend} {layout} kind={kind}")


@pytest.mark.parametrize("used", (("context",), ("attention",), ("context", "attention")))
@pytest.mark.parametrize("kind", (None, "at", "iat"))
def test_gradient_through_each_output(backend, kind, used):
    """Gradients flow from context, from attention (grad_attention), and from both."""
    inputs = make_inputs(3, 10, 4, "empty_row", seed=8)
    check_against_reference(backend, inputs, kind, used=used, what=f"{backend} kind={kind} loss on {used}")


@pytest.mark.parametrize("isa", ("best", "default"))
@pytest.mark.parametrize("hidden", (8, 9, 15, 16, 17, 31, 33, 65))
def test_cpu_vector_tails(monkeypatch, isa, hidden):
    """H and T around the vector widths (4/8 lanes, unrolled by 2) on both instruction sets of the C++
    kernel ("default" is the portable build, forced with FUSED_ATTN_AT_CPU_ISA)."""
    require_backend("cpu")
    if isa == "default":
        monkeypatch.setenv("FUSED_ATTN_AT_CPU_ISA", "default")
    for length in (8, 9, 17, 33):
        inputs = make_inputs(3, length, hidden, "scattered", seed=hidden * 100 + length)
        for kind in ("at", "iat"):
            check_against_reference("cpu", inputs, kind, what=f"{isa} T={length} H={hidden} kind={kind}")


def test_requires_grad_combinations(backend):
    """Only h, only scores, or neither requiring grad."""
    inputs = make_inputs(2, 6, 3, "padding", seed=4)
    pool = fused_pool(backend)
    expected = python_ref.attention_pool(inputs.h, inputs.scores, inputs.mask)
    out = pool(inputs.h, inputs.scores, inputs.mask)
    assert out.context.grad_fn is None and out.attention.grad_fn is None
    torch.testing.assert_close(out.context, expected.context)
    for which in ("h", "scores"):
        h = inputs.h.clone().requires_grad_(which == "h")
        scores = inputs.scores.clone().requires_grad_(which == "scores")
        leaf = h if which == "h" else scores
        got, = torch.autograd.grad(pool(h, scores, inputs.mask).context.sum(), leaf)
        h_ref = inputs.h.clone().requires_grad_(which == "h")
        scores_ref = inputs.scores.clone().requires_grad_(which == "scores")
        leaf_ref = h_ref if which == "h" else scores_ref
        want, = torch.autograd.grad(python_ref.attention_pool(h_ref, scores_ref, inputs.mask).context.sum(), leaf_ref)
        torch.testing.assert_close(got, want, msg=lambda m: f"gradient wrt {which}: {m}")


# ---------------------------------------------------------------------------------------------------------
# Masking edge cases


def _shape_for(backend: str) -> tuple[int, int, int]:
    return (5, 40, 16) if backend == "cpu" else (4, 11, 5)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_values_are_never_read(backend, kind):
    """nan, inf or any finite value at padded positions of scores/grad/noise give bit-identical results,
    and zero gradient at the padded scores."""
    inputs = make_inputs(*_shape_for(backend), "empty_row", seed=6)
    results = [pool_with_grads(fused_pool(backend), fill_padding(inputs, value), kind)
               for value in (0.0, float("nan"), float("inf"), -float("inf"), 1e30)]
    for result in results[1:]:
        for name, tensor in result.items():
            assert torch.equal(tensor, results[0][name]), name
    pad = ~inputs.mask
    assert torch.equal(results[0]["grad_scores"][pad], torch.zeros(int(pad.sum())))
    assert torch.equal(results[0]["attention"][pad], torch.zeros(int(pad.sum())))


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_rows_give_zeros(backend, kind):
    """Fully masked rows: attention, context and their gradients are exactly 0, nothing is NaN, the other
    rows are unaffected. Large upstream gradients make any 0 * inf slip visible."""
    batch, length, hidden = _shape_for(backend)
    inputs = make_inputs(batch, length, hidden, "padding", seed=7)
    mask = inputs.mask.clone()
    mask[0] = False
    mask[2] = False
    inputs = dataclasses.replace(inputs, mask=mask)
    h, scores = inputs.leaves()
    out = fused_pool(backend)(h, scores, mask, **inputs.kwargs(kind))
    dc, da = cotangents(inputs)
    grad_h, grad_scores = torch.autograd.grad(
        (out.context * dc * 1e6).sum() + (out.attention * da * 1e6).sum(), (h, scores))
    for name, tensor in dict(context=out.context, attention=out.attention, grad_h=grad_h,
                             grad_scores=grad_scores).items():
        assert torch.isfinite(tensor).all(), f"{name} is not finite"
        assert torch.equal(tensor[[0, 2]], torch.zeros_like(tensor[[0, 2]])), f"{name} of masked rows is not 0"
    assert (out.attention[1].sum() - 1).abs() < 1e-5  # a real row still sums to 1

    everything_masked = torch.zeros_like(mask)
    out = fused_pool(backend)(h, scores, everything_masked, **inputs.kwargs(kind))
    grad_h, grad_scores = torch.autograd.grad(out.context.sum() + out.attention.sum(), (h, scores))
    for tensor in (out.context, out.attention, grad_h, grad_scores):
        assert torch.equal(tensor, torch.zeros_like(tensor))


# ---------------------------------------------------------------------------------------------------------
# Determinism


def test_backward_is_bitwise_deterministic(backend):
    """20 repeated runs give bit-identical outputs and gradients. On the C++ kernel each run is a fresh
    forward+backward (threads split rows differently run to run only if the kernel is wrong). Under the
    Triton interpreter programs run one after another, so scheduling cannot vary: one forward and 20
    backwards keep its (slow) share small."""
    if backend == "cpu":
        inputs = make_inputs(16, 300, 64, "padding", seed=9)
        for kind in KINDS:
            first = pool_with_grads(fused_pool(backend), inputs, kind)
            for run in range(19):
                again = pool_with_grads(fused_pool(backend), inputs, kind)
                for name, tensor in again.items():
                    assert torch.equal(tensor, first[name]), f"kind={kind} run {run + 2}: {name} differs"
        return
    inputs = make_inputs(3, 8, 4, "padding", seed=9)
    h, scores = inputs.leaves()
    out = fused_pool(backend)(h, scores, inputs.mask, **inputs.kwargs("iat"))
    dc, da = cotangents(inputs)
    loss = (out.context * dc).sum() + (out.attention * da).sum()
    first = torch.autograd.grad(loss, (h, scores), retain_graph=True)
    for run in range(19):
        again = torch.autograd.grad(loss, (h, scores), retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(again, first)), f"run {run + 2} differs"


@pytest.mark.parametrize("kind", KINDS)
def test_second_backward_with_retain_graph(backend, kind):
    inputs = make_inputs(3, 12, 5, "empty_row", seed=10)
    h, scores = inputs.leaves()
    out = fused_pool(backend)(h, scores, inputs.mask, **inputs.kwargs(kind))
    dc, da = cotangents(inputs)
    loss = (out.context * dc).sum() + (out.attention * da).sum()
    loss.backward(retain_graph=True)
    first = h.grad.clone(), scores.grad.clone()
    h.grad, scores.grad = None, None
    loss.backward()
    assert torch.equal(h.grad, first[0]) and torch.equal(scores.grad, first[1])
    assert h.grad.abs().sum() > 0 and scores.grad.abs().sum() > 0  # not vacuous


# ---------------------------------------------------------------------------------------------------------
# Property tests (hypothesis) against the reference

# Per backend example counts, bounded so the file stays fast (the interpreter is slow).
EXAMPLES = {"cpu": 60, "triton": 10}


@pytest.mark.parametrize("backend_name", FUSED_BACKENDS)
def test_matches_reference_property(backend_name):
    require_backend(backend_name)

    @settings(max_examples=EXAMPLES[backend_name], deadline=None, derandomize=True, database=None)
    @given(case=pool_cases())
    def check(case):
        inputs, kind, eps = case
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # iAT with B = 1
            check_against_reference(backend_name, inputs, kind, eps,
                                    what=f"{backend_name} B,T,H={tuple(inputs.h.shape)} kind={kind} eps={eps}")

    check()
