"""The public functional API: checks the inputs once, picks a backend, runs the fused op."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from python_ref import AttentionPoolOutput, check_attention_inputs, check_perturbation_inputs
from python_ref.checks import check_values

from ._backend import resolve_backend
from .ops import KIND, PAIR_BACKENDS


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


# Backends whose kernels check the values they read (NaN or inf at real positions): the separate check
# (isfinite & mask, any, per tensor) cost ~25 us per tensor, more than the whole CPU kernel at small shapes. The
# reference gets the check here, before the call.
_KERNEL_CHECKS_VALUES = ("cpu", "cuda", "triton")


def _check_or_defer_values(backend, scores, mask, grad, noise) -> None:
    """On CPU tensors the kernels raise ValueError themselves. On CUDA tensors the kernels (cuda and triton) set
    a device-side flag that raises through torch._assert_async without a host sync, which is what runs under
    torch.compile and CUDA-graph capture; but such an assert surfaces late and leaves the CUDA context unusable,
    so in plain eager mode the values are also checked here first, for a clean ValueError naming the argument."""
    if backend not in _KERNEL_CHECKS_VALUES:
        check_values(scores, mask, grad, noise)
    elif (scores.device.type == "cuda" and not torch.compiler.is_compiling()
          and not torch.cuda.is_current_stream_capturing()):
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


class AttentionPoolPair(NamedTuple):
    """What attention_pool_pair returns."""

    clean: AttentionPoolOutput  # attention_pool(h, scores, mask)
    adversarial: AttentionPoolOutput  # attention_pool(h, scores, mask, perturbation=..., ...)


def _pair_module(backend: str, what: str):
    """The ops module of `backend` for the pair calls; NotImplementedError for a backend without them."""
    if backend not in PAIR_BACKENDS:
        raise NotImplementedError(
            f"{what} is not implemented for backend {backend!r} yet (it runs on "
            f"{', '.join(repr(b) for b in PAIR_BACKENDS)}); call attention_pool twice instead (clean, then "
            "perturbed), as fused_attn_at.adversarial_attention_loss does on that backend")
    return _backend_module(backend)


def attention_pool_pair(
    h: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    perturbation: str,
    grad: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    eps: float = 1.0,
    backend: str | None = None,
    generator: torch.Generator | None = None,
) -> AttentionPoolPair:
    """The clean and the perturbed attention pooling of the same h and scores, as one op:
    (clean, adversarial) equal attention_pool(h, scores, mask) and attention_pool(h, scores, mask,
    perturbation=..., grad=..., noise=..., eps=...) in values and gradients, but the kernel reads h once
    for both contexts, and their backward reads h once and writes grad_h once (a_clean dc_clean + a_adv dc_adv)
    instead of twice plus a sum. perturbation: "at" or "iat" (grad = dL_clean/dscores, e.g. from
    attention_scores_grad) or "rp" (noise, or drawn from `generator`). Same checks, backends and autocast rule
    as attention_pool; every backend ("cpu", "cuda", "triton", "reference").
    """
    if perturbation is None:
        raise ValueError("perturbation must be one of 'at', 'iat', 'rp' for attention_pool_pair (its second "
                         "branch is the perturbed one); got None: call attention_pool for the clean pooling alone")
    h, scores, autocasting = _autocast_promote(h, scores)
    check_attention_inputs(h, scores, mask, perturbation, grad, noise, eps, values=False)
    name = resolve_backend(backend, h.device)
    impl = _pair_module(name, "attention_pool_pair")
    _check_or_defer_values(name, scores, mask, grad, noise)
    direction = _direction(perturbation, scores, grad, noise, generator)
    with torch.autocast(h.device.type, enabled=False) if autocasting else contextlib.nullcontext():
        context_clean, attention_clean, context_adv, attention_adv = _run_kernel(
            impl.attention_pool_pair, perturbation, h, scores, mask, direction, KIND[perturbation], float(eps))
    return AttentionPoolPair(AttentionPoolOutput(context_clean, attention_clean),
                             AttentionPoolOutput(context_adv, attention_adv))


def _check_scores_grad_inputs(grad_context, h, attention, grad_attention) -> None:
    for name, x, ndim, text in (("h", h, 3, "[B, T, H]"), ("attention", attention, 2, "[B, T]"),
                                ("grad_context", grad_context, 2, "[B, H]")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {text}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must have shape {text} ({ndim} dims), got shape {tuple(x.shape)}")
        if x.device != h.device:
            raise ValueError(f"{name} must be on the device of h ({h.device}), got {x.device}")
    B, T, H = h.shape
    if attention.shape != (B, T):
        raise ValueError(f"attention must have shape [B, T] = {[B, T]} (from h [B, T, H]), got {tuple(attention.shape)}")
    if grad_context.shape != (B, H):
        raise ValueError(f"grad_context must have shape [B, H] = {[B, H]} (from h [B, T, H]), got "
                         f"{tuple(grad_context.shape)}")
    if grad_attention is not None and (not isinstance(grad_attention, torch.Tensor)
                                       or grad_attention.shape != attention.shape):
        raise ValueError(f"grad_attention must be None or a tensor of the shape of attention {tuple(attention.shape)}")


def attention_scores_grad(
    grad_context: torch.Tensor,
    h: torch.Tensor,
    attention: torch.Tensor,
    grad_attention: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """g = dL/dscores [B, T] for out = attention_pool(h, scores, mask) (attention = out.attention) from
    dL/dcontext [B, H] (and dL/dattention [B, T]): what torch.autograd.grad(L, scores) gives, without the
    grad_h [B, T, H] that the op's backward would also compute (a kernel reads h once and writes nothing of
    that size). A constant (no gradient flows through it), like the perturbation. Every backend ("cpu", "cuda",
    "triton", "reference")."""
    _check_scores_grad_inputs(grad_context, h, attention, grad_attention)
    if h.dtype != attention.dtype:  # e.g. h of an autocast region: run in the wider dtype, as attention_pool
        h = h.to(torch.promote_types(h.dtype, attention.dtype))
    name = resolve_backend(backend, h.device)
    impl = _pair_module(name, "attention_scores_grad")
    with torch.no_grad():
        return impl.attention_scores_grad(grad_context.detach(), None if grad_attention is None else
                                          grad_attention.detach(), h.detach(), attention.detach())
