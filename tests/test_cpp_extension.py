"""The C++ extension fused_attn_at._C itself: its ops pass torch.library.opcheck (schema, fake tensors,
autograd registration, AOT dispatch), compile under torch.compile(fullgraph=True), are what the automatic
dispatch picks for CPU tensors, reject bad input with messages that name the argument when called directly,
handle every input layout, and hold float16/bfloat16 to the reference. (The broad backend-vs-reference
matrix is tests/test_attention_pool.py.)

These tests FAIL when the extension is missing, unless FUSED_ATTN_AT_NO_EXT=1 says it was not built on
purpose (then they skip, with that reason printed by -ra)."""
from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

import fused_attn_at
import python_ref
from _helpers import (check_low_precision_against_reference, cpu_kernel_paths, make_inputs,
                      padded_float64_inputs, relative_error)
from fused_attn_at.ops import cpp

NO_EXT = os.environ.get("FUSED_ATTN_AT_NO_EXT", "0").lower() not in ("", "0", "false", "no")
if NO_EXT:
    pytestmark = pytest.mark.skip(
        reason="FUSED_ATTN_AT_NO_EXT=1: the C++ extension was deliberately not built, so its tests do not run"
    )

KIND_CODE = {None: 0, "at": 1, "rp": 1, "iat": 2}


@pytest.fixture(autouse=True)
def extension():
    """Every test here needs the compiled CPU kernels: their absence is a failure, not a skip."""
    if not cpp.CPU_AVAILABLE:
        pytest.fail(f"the C++ extension fused_attn_at._C is not usable: {cpp.UNAVAILABLE_REASON}", pytrace=False)
    return torch.ops.fused_attn_at


def test_extension_registers_the_ops_for_cpu():
    assert cpp.CPU_AVAILABLE
    assert cpp.CUDA_AVAILABLE == torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_attn_at::attention_pool_fwd", "CUDA")
    assert cpp.cpu_isa() in ("avx2", "default")
    for op in ("attention_pool_fwd", "attention_pool_bwd", "perturbation"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn_at::{op}", "CPU"), op


# ---------------------------------------------------------------------------------------------------------
# torch.library.opcheck

def _fwd_args(inputs, kind: str | None, requires_grad: bool = True):
    h, scores = inputs.leaves() if requires_grad else (inputs.h, inputs.scores)
    direction = None if kind is None else (inputs.noise if kind == "rp" else inputs.grad)
    return (h, scores, inputs.mask, direction, KIND_CODE[kind], 0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", ["none", "empty_row"])
@pytest.mark.parametrize("kind", [None, "at", "iat"])
def test_opcheck_attention_pool_fwd(extension, dtype, mask, kind):
    inputs = make_inputs(3, 6, 5, mask, seed=3, dtype=dtype)
    torch.library.opcheck(extension.attention_pool_fwd, _fwd_args(inputs, kind))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", ["none", "empty_row"])
@pytest.mark.parametrize("with_grad_attention", [False, True])
def test_opcheck_attention_pool_bwd(extension, dtype, mask, with_grad_attention):
    inputs = make_inputs(3, 6, 5, mask, seed=4, dtype=dtype)
    attention = python_ref.masked_softmax(inputs.scores, inputs.mask)
    grad_context = torch.randn(3, 5, dtype=dtype)
    grad_attention = torch.randn(3, 6, dtype=dtype) if with_grad_attention else None
    torch.library.opcheck(extension.attention_pool_bwd, (grad_context, grad_attention, inputs.h, attention))
    # h as a transposed view: grad_h keeps h's layout in the kernel and in the fake alike
    h_t = inputs.h.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(extension.attention_pool_bwd, (grad_context, grad_attention, h_t, attention))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", ["none", "empty_row"])
@pytest.mark.parametrize("kind", ["at", "iat"])
def test_opcheck_perturbation(extension, dtype, mask, kind):
    inputs = make_inputs(4, 6, 1, mask, seed=5, dtype=dtype)
    torch.library.opcheck(extension.perturbation, (inputs.scores, inputs.mask, inputs.grad, KIND_CODE[kind], 0.5))


# ---------------------------------------------------------------------------------------------------------
# torch.compile

def test_compile_fullgraph_matches_eager():
    inputs = make_inputs(4, 9, 6, "empty_row", seed=6, dtype=torch.float64)

    def pooled(h, scores, mask, grad):
        out = fused_attn_at.attention_pool(h, scores, mask, perturbation="at", grad=grad, eps=0.5, backend="cpu")
        return out.context, out.attention

    compiled = torch.compile(pooled, fullgraph=True, dynamic=False)
    results = []
    for fn in (pooled, compiled):
        h, scores = inputs.leaves()
        context, attention = fn(h, scores, inputs.mask, inputs.grad)
        loss = (context * torch.linspace(-1, 1, 6, dtype=torch.float64)).sum() + (attention ** 2).sum()
        results.append((context, attention, *torch.autograd.grad(loss, (h, scores))))
    for name, got, expected in zip(("context", "attention", "grad_h", "grad_scores"), results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


def test_compile_backend_op_fullgraph():
    """The backend-module call (the registered op with its fake and autograd) traces without a graph break."""
    inputs = make_inputs(3, 8, 5, "padding", seed=7, dtype=torch.float64)

    def pooled(h, scores, mask, grad):
        return cpp.attention_pool(h, scores, mask, grad, 2, 1.0)

    compiled = torch.compile(pooled, fullgraph=True, dynamic=False)
    outs = []
    for fn in (pooled, compiled):
        h, scores = inputs.leaves()
        context, attention = fn(h, scores, inputs.mask, inputs.grad)
        outs.append((context, attention, *torch.autograd.grad(context.sum() + attention[:, 0].sum(), (h, scores))))
    for got, expected in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# dispatch

def test_auto_dispatch_picks_the_cpp_backend_for_cpu(monkeypatch):
    monkeypatch.delenv("FUSED_ATTN_AT_BACKEND", raising=False)
    assert fused_attn_at.resolve_backend(None, torch.device("cpu")) == "cpu"
    calls = []
    real = cpp.attention_pool

    def spy(*args):
        calls.append(args[4])
        return real(*args)

    monkeypatch.setattr(cpp, "attention_pool", spy)
    inputs = make_inputs(2, 5, 3, "padding", seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        out = fused_attn_at.attention_pool(inputs.h, inputs.scores, inputs.mask, perturbation="iat", grad=inputs.grad)
    assert calls == [2]
    expected = python_ref.attention_pool(inputs.h, inputs.scores, inputs.mask, perturbation="iat", grad=inputs.grad)
    torch.testing.assert_close(out.context, expected.context)


# ---------------------------------------------------------------------------------------------------------
# C++ input checks of a direct torch.ops call

def _good(dtype=torch.float32):
    h = torch.randn(2, 4, 3, dtype=dtype)
    scores = torch.randn(2, 4, dtype=dtype)
    mask = torch.ones(2, 4, dtype=torch.bool)
    return h, scores, mask, torch.randn(2, 4, dtype=dtype)


FWD_BAD = [
    ("h rank", lambda h, s, m, g: (h[0], s, m, g, 1, 1.0), ValueError, r"h must have shape \[B, T, H\]"),
    ("B/T mismatch", lambda h, s, m, g: (h, s[:, :3], m[:, :3], g[:, :3], 1, 1.0), ValueError,
     r"h \[B, T, H\] and scores \[B, T\] must agree on B and T"),
    ("scores rank", lambda h, s, m, g: (h, s[0], m, g, 1, 1.0), ValueError, r"scores must have shape \[B, T\]"),
    ("scores dtype", lambda h, s, m, g: (h, s.double(), m, g, 1, 1.0), TypeError, r"scores must have the dtype of h"),
    ("h dtype", lambda h, s, m, g: (h.int(), s.int(), m, g, 1, 1.0), TypeError, r"h must be a floating tensor"),
    ("mask dtype", lambda h, s, m, g: (h, s, m.float(), g, 1, 1.0), TypeError, r"mask must be a bool tensor"),
    ("mask shape", lambda h, s, m, g: (h, s, m[:, :3], g, 1, 1.0), ValueError, r"mask must have the shape of scores"),
    ("direction missing", lambda h, s, m, g: (h, s, m, None, 1, 1.0), ValueError, r"direction .* is required"),
    ("direction shape", lambda h, s, m, g: (h, s, m, g[:1], 2, 1.0), ValueError,
     r"direction must have the shape of scores"),
    ("kind", lambda h, s, m, g: (h, s, m, g, 3, 1.0), ValueError, r"kind must be 0 \(none\), 1"),
    ("eps", lambda h, s, m, g: (h, s, m, g, 1, -1.0), ValueError, r"eps must be a finite number >= 0"),
    ("eps nan", lambda h, s, m, g: (h, s, m, g, 1, float("nan")), ValueError, r"eps must be a finite number"),
]


@pytest.mark.parametrize("what,args,error,message", FWD_BAD, ids=[c[0] for c in FWD_BAD])
def test_forward_checks_name_the_argument(extension, what, args, error, message):
    with pytest.raises(error, match=message):
        extension.attention_pool_fwd(*args(*_good()))


def test_perturbation_and_backward_checks_name_the_argument(extension):
    h, scores, mask, grad = _good()
    with pytest.raises(ValueError, match=r"kind must be 1 \(AT/RP"):
        extension.perturbation(scores, mask, grad, 0, 1.0)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        extension.perturbation(scores, mask.to(torch.uint8), grad, 1, 1.0)
    with pytest.raises(ValueError, match=r"direction must have the shape of scores"):
        extension.perturbation(scores, mask, grad.t(), 2, 1.0)
    attention = torch.softmax(scores, -1)
    with pytest.raises(ValueError, match=r"grad_context must have shape \[B, H\] = \[2, 3\]"):
        extension.attention_pool_bwd(torch.randn(2, 4), None, h, attention)
    with pytest.raises(ValueError, match=r"attention must have shape \[B, T\]"):
        extension.attention_pool_bwd(torch.randn(2, 3), None, h, attention[:, :3])
    with pytest.raises(ValueError, match=r"grad_attention must have the shape of attention"):
        extension.attention_pool_bwd(torch.randn(2, 3), attention[:1], h, attention)
    with pytest.raises(ValueError, match=r"h must have shape \[B, T, H\]"):
        extension.attention_pool_bwd(torch.randn(2, 3), None, h[0], attention)


@pytest.mark.parametrize("isa", ["best", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 64, 1024)], ids=str)  # the second splits rows over H
def test_kernels_reject_nonfinite_values_at_real_positions(monkeypatch, extension, isa, dtype, shape):
    """The kernels check the values they read (the Python API no longer checks them for this backend):
    NaN or inf at a real position of scores or direction raises, for the fused forward and the perturbation
    op and every kind; the same values at a padded position are accepted."""
    if isa == "default":
        monkeypatch.setenv("FUSED_ATTN_AT_CPU_ISA", "default")
        assert cpp.cpu_isa() == "default"
    B, T, H = shape
    gen = torch.Generator().manual_seed(T)
    h = torch.randn(B, T, H, generator=gen).to(dtype)
    scores = torch.randn(B, T, generator=gen).to(dtype)
    direction = torch.randn(B, T, generator=gen).to(dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[B - 1, T - 1] = False  # the last position of the last row is padding
    real, pad = (0, T // 2), (B - 1, T - 1)
    for kind in (0, 1, 2):
        for target, bad in (("scores", float("nan")), ("scores", float("inf")), ("direction", float("-inf")),
                            ("direction", float("nan"))):
            if kind == 0 and target == "direction":
                continue
            for where, should_raise in ((real, True), (pad, False)):
                s, d = scores.clone(), direction.clone()
                (s if target == "scores" else d)[where] = bad
                calls = [lambda: extension.attention_pool_fwd(h, s, mask, d if kind else None, kind, 1.0)]
                if kind:
                    calls.append(lambda: extension.perturbation(s, mask, d, kind, 1.0))
                for call in calls:
                    if should_raise:
                        with pytest.raises(ValueError, match=f"{target} holds NaN or inf at real"):
                            call()
                    else:
                        out = call()
                        for x in (out if isinstance(out, tuple) else (out,)):
                            assert torch.isfinite(x).all(), f"kind {kind}: {bad} in padded {target} leaked"


# ---------------------------------------------------------------------------------------------------------
# layouts, threading splits, fully masked rows, non-finite padding: the kernels' own code paths

def _layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as h [B, T, H] in another memory layout."""
    if how == "along_t":  # transposed view of a [B, H, T] tensor
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "batch_inner":  # no unit stride along T or H: the kernel reads a contiguous copy
        return x.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    if how == "sliced":  # every other feature of a wider tensor
        wide = torch.zeros(*x.shape[:2], 2 * x.shape[2], dtype=x.dtype)
        wide[:, :, ::2] = x
        return wide[:, :, ::2]
    if how == "expanded":  # one h row broadcast over the batch (stride 0)
        return x[:1].expand_as(x)
    return x


@pytest.mark.parametrize("isa", ["best", "default"])
@pytest.mark.parametrize("layout", ["contiguous", "along_t", "batch_inner", "sliced", "expanded"])
@pytest.mark.parametrize("shape", [(1, 300, 256), (3, 63, 200), (5, 7, 3), (2, 1000, 1)], ids=str)
def test_layouts_and_splits_match_float64_reference(monkeypatch, isa, layout, shape):
    """float64 forward and backward (r held fixed) for every kind on a layout; (1, 300, 256) and
    (3, 63, 200) split rows over feature chunks on 2 threads; row 0 of the mask is empty and the padding
    holds NaN (scores) and inf (grad)."""
    with cpu_kernel_paths(monkeypatch, isa):
        B, T, H = shape
        inputs = padded_float64_inputs(B, T, H, seed=B * T + H)
        h_in = _layout(inputs.h, layout)
        inputs = dataclasses.replace(inputs, h=h_in.contiguous())  # "expanded" changes the values
        pad = ~inputs.mask
        scores_nan, grad_inf = inputs.scores.masked_fill(pad, float("nan")), inputs.grad.masked_fill(pad, float("inf"))
        for kind in (None, "at", "iat"):
            r = torch.zeros_like(inputs.scores)
            if kind is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # iAT with a batch of one
                    r = python_ref.perturbation(kind, inputs.scores, inputs.mask, grad=inputs.grad)
                r_cpp = torch.ops.fused_attn_at.perturbation(scores_nan, inputs.mask, grad_inf, KIND_CODE[kind], 1.0)
                assert relative_error(r_cpp, r) < 1e-12 or float(r.abs().max()) == 0.0 == float(r_cpp.abs().max())
            h_ref = inputs.h.clone().requires_grad_()
            s_ref = inputs.scores.clone().requires_grad_()
            attention_ref = python_ref.masked_softmax(s_ref + r, inputs.mask)
            context_ref = torch.bmm(attention_ref[:, None], h_ref).squeeze(1)
            h = h_in.detach().requires_grad_()
            s = scores_nan.clone().requires_grad_()
            context, attention = torch.ops.fused_attn_at.attention_pool_fwd(
                h, s, inputs.mask, None if kind is None else grad_inf, KIND_CODE[kind], 1.0)
            dc = torch.randn(B, H, dtype=torch.float64)
            da = torch.randn(B, T, dtype=torch.float64)
            grads = torch.autograd.grad((context * dc).sum() + (attention * da).sum(), (h, s))
            grads_ref = torch.autograd.grad((context_ref * dc).sum() + (attention_ref * da).sum(), (h_ref, s_ref))
            assert grads[0].stride() == torch.empty_like(h).stride(), "grad_h keeps h's layout"
            context, attention = context.detach(), attention.detach()
            got = dict(context=context, attention=attention, grad_h=grads[0], grad_scores=grads[1])
            expected = dict(context=context_ref, attention=attention_ref, grad_h=grads_ref[0],
                            grad_scores=grads_ref[1].masked_fill(pad, 0.0))
            for name, value in got.items():
                assert torch.isfinite(value).all(), f"{name} kind={kind}: non-finite values"
                err = relative_error(value, expected[name])
                assert err < 1e-12, f"{name} kind={kind}: relative error {err:.3g}"
            assert float(attention[pad].abs().sum()) == 0.0
            if B > 1:  # the empty row: zeros everywhere
                assert float(context[0].abs().max()) == 0.0 and float(grads[0][0].abs().max()) == 0.0


def test_large_grad_h_is_written_completely(extension):
    """A 32 MB grad_h is fresh memory given the huge-page hint (madvise) before the kernel writes it."""
    generator = torch.Generator().manual_seed(12)
    h = torch.randn(1, 8192, 1024, generator=generator).requires_grad_()
    scores = torch.randn(1, 8192, generator=generator).requires_grad_()
    context, attention = extension.attention_pool_fwd(h, scores, None, torch.randn(1, 8192, generator=generator), 1, 1.0)
    grad_context = torch.randn(1, 1024, generator=generator)
    grad_h, _ = torch.autograd.grad(context, (h, scores), grad_context)
    assert grad_h.shape == h.shape and grad_h.stride() == h.stride()
    torch.testing.assert_close(grad_h, attention.detach()[:, :, None] * grad_context[:, None, :], rtol=0, atol=0)


def test_empty_sizes(extension):
    for B, T, H in [(0, 4, 3), (2, 0, 3), (2, 4, 0)]:
        h, scores = torch.randn(B, T, H), torch.randn(B, T)
        context, attention = extension.attention_pool_fwd(h, scores, None, torch.randn(B, T), 2, 1.0)
        assert context.shape == (B, H) and attention.shape == (B, T)
        if T == 0:  # nothing to attend to: zero context
            assert float(context.abs().sum()) == 0.0
        grad_h, grad_scores = extension.attention_pool_bwd(torch.randn(B, H), None, h, attention)
        assert grad_h.shape == (B, T, H) and grad_scores.shape == (B, T)


# ---------------------------------------------------------------------------------------------------------
# float16 / bfloat16: accumulate in float32, so no worse than the reference computed in that dtype

@pytest.mark.parametrize("isa", ["best", "default"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", [None, "at", "iat"])
def test_low_precision_against_float64_reference(monkeypatch, isa, dtype, kind):
    """float16/bfloat16 under the ulp rule every backend shares (tests/_helpers.py): the float32 result rounded to
    the dtype plus 2 ulp, element by element."""
    if isa == "default":
        monkeypatch.setenv("FUSED_ATTN_AT_CPU_ISA", "default")
    inputs = make_inputs(5, 77, 40, "empty_row", seed=9, dtype=dtype)
    check_low_precision_against_reference("cpu", inputs, kind, what=f"{dtype} kind={kind} isa={cpp.cpu_isa()}")
