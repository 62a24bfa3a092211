"""Bad input raises ValueError/TypeError naming the argument and what was expected; backend selection
(argument, FUSED_ATTN_AT_BACKEND, automatic) and its errors."""
from __future__ import annotations

import warnings

import pytest
import torch

import fused_attn_at
import python_ref
from fused_attn_at import _backend
from _helpers import backend, make_inputs, require_backend  # noqa: F401  (backend is a fixture)

B, T, H = 3, 5, 4


@pytest.fixture
def inputs():
    return make_inputs(B, T, H, "padding", seed=0)


def _pool(inputs, backend_name, **overrides):
    args = dict(h=inputs.h, scores=inputs.scores, mask=inputs.mask, perturbation="at", grad=inputs.grad)
    args.update(overrides)
    return fused_attn_at.attention_pool(args.pop("h"), args.pop("scores"), args.pop("mask"),
                                        backend=backend_name, **args)


# (overrides of attention_pool's arguments, expected exception, regex the message must match)
def _bad_pool_calls(inputs):
    meta = torch.device("meta")
    nan_scores = inputs.scores.clone()
    nan_scores[1, 0] = float("nan")
    inf_scores = inputs.scores.clone()
    inf_scores[2, 0] = float("inf")
    nan_grad = inputs.grad.clone()
    nan_grad[0, 0] = float("nan")
    return {
        "h rank 2": (dict(h=inputs.h[:, :, 0]), ValueError, r"h must have shape \[B, T, H\].*got shape \(3, 5\)"),
        "h rank 4": (dict(h=inputs.h[None]), ValueError, r"h must have shape \[B, T, H\]"),
        "scores rank 3": (dict(scores=inputs.scores[..., None]), ValueError, r"scores must have shape \[B, T\]"),
        "scores rank 1": (dict(scores=inputs.scores[0]), ValueError, r"scores must have shape \[B, T\]"),
        "h not a tensor": (dict(h=inputs.h.tolist()), TypeError, r"h must be a torch\.Tensor.*got list"),
        "B mismatch": (dict(scores=inputs.scores[:2], mask=inputs.mask[:2], grad=inputs.grad[:2]), ValueError,
                       r"h \[B, T, H\] and scores \[B, T\] must agree on B and T"),
        "T mismatch": (dict(h=inputs.h[:, :4]), ValueError, r"must agree on B and T.*\(3, 4, 4\).*\(3, 5\)"),
        "mask shape": (dict(mask=inputs.mask[:, :4]), ValueError, r"mask must have the shape of scores \(3, 5\)"),
        "mask not bool": (dict(mask=inputs.mask.float()), TypeError, r"mask must be a bool tensor.*torch\.float32"),
        "mask int": (dict(mask=inputs.mask.long()), TypeError, r"mask must be a bool tensor.*torch\.int64"),
        "h integer": (dict(h=inputs.h.long(), scores=inputs.scores.long()), TypeError,
                      r"h must be a floating tensor.*torch\.int64"),
        "dtype mismatch": (dict(scores=inputs.scores.double()), TypeError,
                           r"scores must have the dtype of h \(torch\.float32\), got torch\.float64"),
        "grad missing at": (dict(grad=None), ValueError, r"grad .*required for perturbation='at'"),
        "grad missing iat": (dict(perturbation="iat", grad=None), ValueError, r"grad .*required for perturbation='iat'"),
        "grad shape": (dict(grad=inputs.grad[:, :3]), ValueError, r"grad must have the shape of scores"),
        "grad with rp": (dict(perturbation="rp"), ValueError, r"grad is only used by perturbation='at' or 'iat'"),
        "grad without perturbation": (dict(perturbation=None), ValueError, r"grad .*perturbation"),
        "noise with at": (dict(noise=inputs.noise), ValueError, r"noise is only used by perturbation='rp'"),
        "noise shape": (dict(perturbation="rp", grad=None, noise=inputs.noise[:, :2]), ValueError,
                        r"noise must have the shape of scores"),
        "nan in scores": (dict(scores=nan_scores), ValueError, r"scores holds NaN or inf.*expected finite"),
        "inf in scores": (dict(scores=inf_scores), ValueError, r"scores holds NaN or inf"),
        "nan in grad": (dict(grad=nan_grad), ValueError, r"grad holds NaN or inf"),
        "unknown perturbation": (dict(perturbation="fgsm"), ValueError,
                                 r"perturbation must be one of None, 'at', 'iat', 'rp'; got 'fgsm'"),
        "perturbation case": (dict(perturbation="AT"), ValueError, r"perturbation must be one of.*got 'AT'"),
        "eps negative": (dict(eps=-0.1), ValueError, r"eps must be a finite number >= 0, got -0\.1"),
        "eps nan": (dict(eps=float("nan")), ValueError, r"eps must be a finite number >= 0"),
        "eps tensor": (dict(eps=torch.tensor(1.0)), TypeError, r"eps must be a real number >= 0, got Tensor"),
        "scores on meta": (dict(scores=inputs.scores.to(meta)), ValueError,
                           r"h and scores must be on one device: h is on cpu, scores on meta"),
        "h on meta": (dict(h=inputs.h.to(meta)), ValueError, r"h and scores must be on one device: h is on meta"),
        "mask on meta": (dict(mask=inputs.mask.to(meta)), ValueError,
                         r"mask must be on the device of scores \(cpu\), got meta"),
        "grad on meta": (dict(grad=inputs.grad.to(meta)), ValueError,
                         r"grad must be on the device of scores \(cpu\), got meta"),
        "noise on meta": (dict(perturbation="rp", grad=None, noise=inputs.noise.to(meta)), ValueError,
                          r"noise must be on the device of scores \(cpu\), got meta"),
    }


_CASES = sorted(_bad_pool_calls(make_inputs(B, T, H, "padding")))


# Triton's interpreter computes the NaN/inf the op then rejects in numpy, which warns about it
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", _CASES)
def test_attention_pool_rejects_bad_input(backend, inputs, case):
    overrides, error, message = _bad_pool_calls(inputs)[case]
    with pytest.raises(error, match=message):
        _pool(inputs, backend, **overrides)
    # the reference rejects it with the same message (one set of checks for every implementation)
    args = dict(h=inputs.h, scores=inputs.scores, mask=inputs.mask, perturbation="at", grad=inputs.grad)
    args.update(overrides)
    with pytest.raises(error, match=message):
        python_ref.attention_pool(args.pop("h"), args.pop("scores"), args.pop("mask"), **args)


def test_nan_at_padded_positions_is_accepted(backend, inputs):
    scores = inputs.scores.masked_fill(~inputs.mask, float("nan"))
    out = _pool(inputs, backend, scores=scores)
    assert torch.isfinite(out.context).all()


@pytest.mark.parametrize("kind, overrides, error, message", [
    ("at", dict(grad=None), ValueError, r"grad .*required for perturbation='at'"),
    ("iat", dict(grad=None), ValueError, r"grad .*required for perturbation='iat'"),
    (None, dict(), ValueError, r"perturbation must be one of 'at', 'iat', 'rp'; got None"),
    ("bogus", dict(), ValueError, r"perturbation must be one of 'at', 'iat', 'rp'; got 'bogus'"),
    ("at", dict(scores="scores"), TypeError, r"scores must be a torch\.Tensor of shape \[B, T\]"),
    ("at", dict(eps=-1.0), ValueError, r"eps must be a finite number >= 0"),
    ("rp", dict(mask="mask-of-ints"), TypeError, r"mask must be a bool tensor"),
    ("at", dict(grad="grad-on-meta"), ValueError, r"grad must be on the device of scores"),
])
def test_perturbation_rejects_bad_input(backend, inputs, kind, overrides, error, message):
    args = dict(scores=inputs.scores, mask=inputs.mask, grad=inputs.grad if kind in ("at", "iat") else None)
    args.update(overrides)
    if args.get("mask") == "mask-of-ints":
        args["mask"] = inputs.mask.int()
    if isinstance(args.get("grad"), str):
        args["grad"] = inputs.grad.to("meta")
    with pytest.raises(error, match=message):
        fused_attn_at.perturbation(kind, args.pop("scores"), args.pop("mask"), backend=backend, **args)


# ---------------------------------------------------------------------------------------------------------
# Backend selection


def test_unknown_backend(inputs):
    with pytest.raises(ValueError, match=r"backend='tpu': expected one of 'cpu', 'cuda', 'triton', 'reference'"):
        _pool(inputs, "tpu")
    with pytest.raises(ValueError, match=r"backend='tpu'"):
        fused_attn_at.perturbation("at", inputs.scores, grad=inputs.grad, backend="tpu")


def test_environment_variable_is_honoured(monkeypatch, inputs):
    monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", "reference")
    assert fused_attn_at.resolve_backend(None, torch.device("cpu")) == "reference"
    # the reference really runs: a spy on its module sees the call
    from fused_attn_at.ops import reference

    calls = []
    original = reference.attention_pool
    monkeypatch.setattr(reference, "attention_pool", lambda *a: calls.append(a) or original(*a))
    _pool(inputs, None)
    assert len(calls) == 1
    monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"FUSED_ATTN_AT_BACKEND='tpu': expected one of"):
        _pool(inputs, None)
    _pool(inputs, "reference")  # an explicit argument wins over the variable
    monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"FUSED_ATTN_AT_BACKEND='cuda' is not available: .*CUDA tensors only"):
        _pool(inputs, None)
    monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", "")  # empty means unset
    assert fused_attn_at.resolve_backend(None, torch.device("cpu")) in ("cpu", "reference")


def test_forced_cuda_backend_on_cpu_tensors_says_why(inputs):
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: backend 'cuda' runs CUDA tensors only; "
                                           r"the inputs are on cpu"):
        _pool(inputs, "cuda")


def test_forced_backend_without_extension_says_how_to_get_it(monkeypatch, inputs):
    monkeypatch.setattr(_backend, "_cpp_status", lambda: (False, False, "No module named 'fused_attn_at._C'"))
    with pytest.raises(RuntimeError, match=r"backend='cpu' is not available: the C\+\+ extension fused_attn_at\._C is "
                                           r"not importable \(No module named 'fused_attn_at\._C'\); build it with "
                                           r"`pip install --no-build-isolation \.`"):
        _pool(inputs, "cpu")
    monkeypatch.setattr(_backend, "_triton_status", lambda: (False, "No module named 'triton'"))
    with pytest.raises(RuntimeError, match=r"backend='triton' is not available: Triton is not usable "
                                           r"\(No module named 'triton'\); `pip install 'triton>=3\.7'`"):
        _pool(inputs, "triton")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch, inputs):
    monkeypatch.setattr(_backend, "_triton_status", lambda: (True, ""))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend 'triton' needs CUDA tensors \(or TRITON_INTERPRET=1"):
        _pool(inputs, "triton")


def test_missing_extension_falls_back_to_the_reference_with_one_warning(monkeypatch, inputs):
    monkeypatch.setattr(_backend, "_cpp_status", lambda: (False, False, "No module named 'fused_attn_at._C'"))
    monkeypatch.setattr(_backend, "_warned_fallback", set())
    monkeypatch.delenv("FUSED_ATTN_AT_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _pool(inputs, None)
        _pool(inputs, None)
        fused_attn_at.perturbation("at", inputs.scores, inputs.mask, grad=inputs.grad)
    fallback = [w for w in caught if "falling back" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert issubclass(fallback[0].category, RuntimeWarning)
    assert "pip install --no-build-isolation" in str(fallback[0].message)
    expected = python_ref.attention_pool(inputs.h, inputs.scores, inputs.mask, perturbation="at", grad=inputs.grad)
    torch.testing.assert_close(first.context, expected.context, rtol=0, atol=0)


def test_automatic_choice_on_cpu_is_the_cpp_kernel():
    """With the extension built, CPU tensors go to the C++ kernel (never silently to the reference)."""
    require_backend("cpu")
    assert fused_attn_at.resolve_backend(None, torch.device("cpu")) == "cpu"
    assert fused_attn_at.available_backends("cpu")[0] == "cpu"


def test_meta_tensors_give_shapes():
    """Meta tensors hold no values: the checks skip the finiteness test and the reference infers shapes."""
    meta = make_inputs(B, T, H, "padding").to(torch.float32)
    h, scores, mask, grad = (x.to("meta") for x in (meta.h, meta.scores, meta.mask, meta.grad))
    out = python_ref.attention_pool(h, scores, mask, perturbation="iat", grad=grad)
    assert out.context.shape == (B, H) and out.attention.shape == (B, T) and out.context.device.type == "meta"
    assert "triton" not in fused_attn_at.available_backends("meta")
