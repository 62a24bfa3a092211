"""The backward of the fused op as differentiable PyTorch ops: what a backend runs instead of its backward
kernel when the backward itself is recorded by autograd (torch.autograd.grad(..., create_graph=True)), so that
a second derivative exists (double backward, e.g. gradient penalties).

With a = the (perturbed) attention [B, T] that the forward saved (an output of the op, so autograd links it
back to the scores through the op's own backward), h [B, T, H], dc = dL/dcontext [B, H], ga = dL/dattention
[B, T] or None, and r a constant (SPEC):

    grad_h      = a[..., None] * dc[:, None, :]
    da          = h @ dc (+ ga)                                        [B, T]
    grad_scores = a * (da - sum_t a_t da_t)

float16/bfloat16 are computed in float32 and cast back, as the kernels accumulate; float32/float64 as is.
Padded positions have a = 0, so their gradients are exactly 0 (a fully masked row gives zeros).
"""
from __future__ import annotations

from typing import Optional

import torch


def attention_pool_backward_composite(grad_context: torch.Tensor, grad_attention: Optional[torch.Tensor],
                                      h: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_h [B, T, H], grad_scores [B, T]) of the fused op, differentiable wrt every argument."""
    out_h, out_s = h.dtype, attention.dtype
    acc = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
    a = attention.to(acc)
    dc = grad_context.to(acc)
    hh = h.to(acc)
    grad_h = a[..., None] * dc[:, None, :]
    da = torch.matmul(hh, dc[..., None]).squeeze(-1)
    if grad_attention is not None:
        da = da + grad_attention.to(acc)
    grad_scores = a * (da - (a * da).sum(-1, keepdim=True))
    return grad_h.to(out_h), grad_scores.to(out_s)
