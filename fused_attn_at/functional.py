"""The public functional API: checks the inputs once, picks a backend, runs the fused op."""
from __future__ import annotations

import contextlib

import torch
from python_ref import AttentionPoolOutput, check_attention_inputs, check_perturbation_inputs
from python_ref.checks import check_values

from ._backend import resolve_backend
from .ops import KIND


def _backend_module(backend: str):
    """The ops module of `backend`. Plain imports, not importlib: torch.compile(fullgraph=True) traces
    them (importlib.import_module is a graph break)."""
    if backend in ("cpu", "cuda"):
        from .ops import cpp

        return cpp
    if backend == "triton":
        from .ops import triton_attention_pool

        return triton_attention_pool
    from .ops import reference

    return reference


# Backends whose kernels check the values they read (NaN or inf at real positions raise ValueError): the
# separate check (isfinite & mask, any, per tensor) cost ~25 us per tensor, more than the whole CPU kernel at
# small shapes. The other backends get the check here, before the call.
_KERNEL_CHECKS_VALUES = ("cpu",)


def _check_or_defer_values(backend, scores, mask, grad, noise) -> None:
    if backend not in _KERNEL_CHECKS_VALUES:
        check_values(scores, mask, grad, noise)


def _run_kernel(call, kind, *args):
    """call(*args), with the op's name for a non-finite direction replaced by the user's argument."""
    try:
        return call(*args)
    except ValueError as exc:
        text = str(exc)
        if not text.startswith("direction holds NaN"):
            raise
        raise ValueError(("noise" if kind == "rp" else "grad") + text[len("direction"):]) from None


def _direction(kind, scores, grad, noise, generator):
    """The tensor the kernel normalises: grad for AT/iAT, standard normal noise for RP."""
    if kind == "rp":
        if noise is None:
            noise = torch.randn(scores.shape, generator=generator, dtype=scores.dtype, device=scores.device)
        return noise.detach()
    return None if grad is None else grad.detach()


def _autocast_on(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)  # "meta" has no autocast


def _autocast_promote(h: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Under torch.autocast, h (often a low-precision Linear/LSTM output) and scores may arrive in two float
    dtypes: run in the wider one (autocast's promote rule, as for torch.cat) instead of refusing the mix.
    Also says whether autocast is on, so that the op then runs with it off: every backend, the reference's
    own bmm included, computes in the promoted dtype."""
    if not (isinstance(h, torch.Tensor) and isinstance(scores, torch.Tensor)) or not _autocast_on(h.device.type):
        return h, scores, False  # (the checks then name what is wrong)
    if h.dtype != scores.dtype and h.is_floating_point() and scores.is_floating_point():
        dtype = torch.promote_types(h.dtype, scores.dtype)
        h, scores = h.to(dtype), scores.to(dtype)
    return h, scores, True


def attention_pool(
    h: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    perturbation: str | None = None,
    grad: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    eps: float = 1.0,
    backend: str | None = None,
    generator: torch.Generator | None = None,
) -> AttentionPoolOutput:
    """Attention pooling with an optional adversarial/random perturbation of the scores, in one fused kernel.

    h [B, T, H] encoder states; scores [B, T]; mask [B, T] bool, True at real tokens (None: all real).
    perturbation: None, "at" (needs grad = dL_clean/dscores), "iat" (needs grad) or "rp" (noise [B, T] standard
    normal, or drawn from `generator`). Returns (context [B, H], attention [B, T]); the attention is the
    perturbed one when a perturbation is asked for. Gradients flow to h and scores; the perturbation is a
    constant. backend: None (best available), "cpu", "cuda", "triton" or "reference"; also $FUSED_ATTN_AT_BACKEND.
    Under torch.autocast, h and scores of two float dtypes run in the wider one.
    """
    h, scores, autocasting = _autocast_promote(h, scores)
    check_attention_inputs(h, scores, mask, perturbation, grad, noise, eps, values=False)
    name = resolve_backend(backend, h.device)
    _check_or_defer_values(name, scores, mask, grad, noise)
    impl = _backend_module(name)
    direction = _direction(perturbation, scores, grad, noise, generator)
    with torch.autocast(h.device.type, enabled=False) if autocasting else contextlib.nullcontext():
        context, attention = _run_kernel(impl.attention_pool, perturbation, h, scores, mask, direction,
                                         KIND[perturbation], float(eps))
    return AttentionPoolOutput(context, attention)


def perturbation(
    kind: str,
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    grad: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    eps: float = 1.0,
    backend: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The perturbation r [B, T] of `kind` ("at", "iat", "rp") that attention_pool adds to the scores.
    Zero at padded positions, norm eps per row (zero where the direction is zero); no gradient."""
    check_perturbation_inputs(kind, scores, mask, grad, noise, eps, required=True, values=False)
    name = resolve_backend(backend, scores.device)
    _check_or_defer_values(name, scores, mask, grad, noise)
    impl = _backend_module(name)
    direction = _direction(kind, scores, grad, noise, generator)
    with torch.no_grad():
        return _run_kernel(impl.perturbation, kind, scores.detach(), mask, direction, KIND[kind], float(eps))
