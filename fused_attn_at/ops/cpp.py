"""The compiled backends "cpu" and "cuda": the ops of fused_attn_at._C (csrc/), made differentiable and
traceable here.

Loading fused_attn_at._C registers these ops in the dispatcher (schemas in csrc/ops.cpp):
    torch.ops.fused_attn_at.attention_pool_fwd(h, scores, mask, direction, kind, eps) -> (context, attention)
    torch.ops.fused_attn_at.attention_pool_bwd(grad_context, grad_attention, h, attention) -> (grad_h, grad_scores)
    torch.ops.fused_attn_at.perturbation(scores, mask, direction, kind, eps) -> r
and the pair ops of the AT training step (issue 17; CPU kernels only so far):
    torch.ops.fused_attn_at.attention_scores_grad(grad_context, grad_attention, h, attention) -> grad_scores
        (attention_pool_bwd's grad_scores without grad_h: reads h once, writes nothing of size B*T*H)
    torch.ops.fused_attn_at.attention_pool_pair_fwd(h, scores, mask, direction, kind, eps)
        -> (context_clean, attention_clean, context_adv, attention_adv)   (one sweep over h for both)
    torch.ops.fused_attn_at.attention_pool_pair_bwd(grad_context_clean, grad_attention_clean, grad_context_adv,
        grad_attention_adv, h, attention_clean, attention_adv) -> (grad_h, grad_scores)   (grad_h written once)
The derivatives of attention_pool_fwd and attention_pool_pair_fwd (the backward ops) are registered in C++
(csrc/autograd.cpp); attention_scores_grad and perturbation have none (their results are constants); this module
gives the ops fake (meta) implementations for torch.compile and offers the backend-module calls of
fused_attn_at.ops. Which _C is loaded (the prebuilt one, or one compiled at first import for the running torch)
is decided in fused_attn_at/_build.py. Without a compiled module it imports all the same, with
CPU_AVAILABLE = CUDA_AVAILABLE = False and the reason in UNAVAILABLE_REASON.

The CPU kernels are built twice, for the compiler's baseline and for AVX2+FMA+F16C, and the AVX2 build runs
where the CPU has it (cpu_isa() says which). Environment, read at every call:
    FUSED_ATTN_AT_CPU_ISA=default   run the baseline build (to test it, or to compare)
    FUSED_ATTN_AT_NO_THP=1          no transparent-huge-page hint for outputs of 32 MB or more
"""
from __future__ import annotations


import torch
from python_ref.checks import warn_iat_batch_of_one

from .. import _build

CPU_AVAILABLE = False
CUDA_AVAILABLE = False
UNAVAILABLE_REASON = ""
PAIR_DEVICES: tuple[str, ...] = ()

_OPS = ("attention_pool_fwd", "attention_pool_bwd", "perturbation")
# The pair ops: a device whose kernels lack them runs the op above but not attention_pool_pair (see
# PAIR_DEVICES); the training helper then takes the two-op path there.
_PAIR_OPS = ("attention_scores_grad", "attention_pool_pair_fwd", "attention_pool_pair_bwd")

# The prebuilt _C when it was built for this torch, else one compiled now for it (cached); None with the reason
# when neither can be had. Loading it registers the ops.
_C, _why_not = _build.load_extension()
if _C is None:
    UNAVAILABLE_REASON = _why_not


def _has_kernel(dispatch_key: str, ops=_OPS) -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn_at::{op}", dispatch_key) for op in ops)


if _C is not None:
    CPU_AVAILABLE = _has_kernel("CPU")
    CUDA_AVAILABLE = _has_kernel("CUDA")
    # the device types ("cpu", "cuda") whose kernels include the pair ops
    PAIR_DEVICES = tuple(d for d, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernel(key, _OPS + _PAIR_OPS))
    if not CPU_AVAILABLE:
        UNAVAILABLE_REASON = "fused_attn_at._C loaded but registers no CPU kernel for the fused_attn_at ops"
    elif not CUDA_AVAILABLE:
        UNAVAILABLE_REASON = "fused_attn_at._C was built without the CUDA kernels"


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels run with ("avx2" or "default"), None without the extension."""
    return _C.cpu_isa() if _C is not None else None


if _C is not None:
    _ops = torch.ops.fused_attn_at

    @torch.library.register_fake("fused_attn_at::attention_pool_fwd")
    def _attention_pool_fwd_fake(h, scores, mask, direction, kind, eps):
        B, T, H = h.shape
        return h.new_empty((B, H)), scores.new_empty((B, T))

    @torch.library.register_fake("fused_attn_at::attention_pool_bwd")
    def _attention_pool_bwd_fake(grad_context, grad_attention, h, attention):
        # grad_h keeps h's layout (empty_like), as the kernels do
        return torch.empty_like(h), attention.new_empty(attention.shape)

    @torch.library.register_fake("fused_attn_at::perturbation")
    def _perturbation_fake(scores, mask, direction, kind, eps):
        return scores.new_empty(scores.shape)

    @torch.library.register_fake("fused_attn_at::attention_scores_grad")
    def _attention_scores_grad_fake(grad_context, grad_attention, h, attention):
        return attention.new_empty(attention.shape)

    @torch.library.register_fake("fused_attn_at::attention_pool_pair_fwd")
    def _attention_pool_pair_fwd_fake(h, scores, mask, direction, kind, eps):
        B, T, H = h.shape
        return h.new_empty((B, H)), scores.new_empty((B, T)), h.new_empty((B, H)), scores.new_empty((B, T))

    @torch.library.register_fake("fused_attn_at::attention_pool_pair_bwd")
    def _attention_pool_pair_bwd_fake(grad_context_clean, grad_attention_clean, grad_context_adv,
                                      grad_attention_adv, h, attention_clean, attention_adv):
        return torch.empty_like(h), attention_clean.new_empty(attention_clean.shape)


def _warn_iat_batch_of_one(kind: int, scores: torch.Tensor) -> None:
    if kind == 2 and scores.shape[0] == 1:
        warn_iat_batch_of_one()


def _require_extension() -> None:
    if _C is None:
        raise RuntimeError(f"the compiled backend is not available: {UNAVAILABLE_REASON}")


def attention_pool(h, scores, mask, direction, kind: int, eps: float):
    """(context [B, H], attention [B, T]) of the fused op; differentiable wrt h and scores."""
    _require_extension()
    _warn_iat_batch_of_one(kind, scores)
    return _ops.attention_pool_fwd(h, scores, mask, direction if kind else None, kind, eps)


def perturbation(scores, mask, direction, kind: int, eps: float):
    """The perturbation r [B, T] (kind 1 or 2) the fused op adds to the scores."""
    _require_extension()
    _warn_iat_batch_of_one(kind, scores)
    return _ops.perturbation(scores, mask, direction, kind, eps)


def _require_pair(device: torch.device) -> None:
    _require_extension()
    if device.type not in PAIR_DEVICES:
        raise NotImplementedError(
            f"the pair ops (attention_pool_pair, attention_scores_grad) have no {device.type} kernel in "
            f"fused_attn_at._C yet (it has them for: {', '.join(PAIR_DEVICES) or 'none'}); use backend='reference' "
            "or two attention_pool calls")


def attention_pool_pair(h, scores, mask, direction, kind: int, eps: float):
    """(context_clean, attention_clean, context_adv, attention_adv) of one sweep over h (kind 1 or 2);
    differentiable wrt h and scores, with one backward for both branches (grad_h written once)."""
    _require_pair(h.device)
    _warn_iat_batch_of_one(kind, scores)
    return _ops.attention_pool_pair_fwd(h, scores, mask, direction, kind, eps)


def attention_scores_grad(grad_context, grad_attention, h, attention):
    """grad_scores [B, T] of the op's backward without grad_h (h read once, nothing [B, T, H] written); not
    differentiable (call it under no_grad: its result is a constant, like the perturbation)."""
    _require_pair(h.device)
    return _ops.attention_scores_grad(grad_context, grad_attention, h, attention)
