"""The reference as a backend: the same calls as the kernels, computed by python_ref."""
from __future__ import annotations

import python_ref
import torch

_NAME = {1: "at", 2: "iat"}


def perturbation(scores, mask, direction, kind: int, eps: float):
    if kind == 1:  # AT and RP share the normalisation
        return python_ref.at_perturbation(direction, mask, eps)
    return python_ref.iat_perturbation(scores, direction, mask, eps)


def attention_pool(h, scores, mask, direction, kind: int, eps: float):
    s = scores if kind == 0 else scores + perturbation(scores, mask, direction, kind, eps)
    a = python_ref.masked_softmax(s, mask)
    return (a[:, None, :] @ h).squeeze(1), a


def attention_pool_pair(h, scores, mask, direction, kind: int, eps: float):
    """The pair op's definition: the clean and the perturbed pooling of the same h (two plain calls)."""
    context_clean, attention_clean = attention_pool(h, scores, mask, None, 0, eps)
    context_adv, attention_adv = attention_pool(h, scores, mask, direction, kind, eps)
    return context_clean, attention_clean, context_adv, attention_adv


def attention_scores_grad(grad_context, grad_attention, h, attention):
    """dL/dscores of the op's backward (SPEC, r constant), without grad_h:
    da = h @ dc (+ grad_attention), grad_scores = a * (da - sum_t a_t da_t); zero where a is."""
    acc = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
    a = attention.to(acc)
    da = torch.matmul(h.to(acc), grad_context.to(acc)[..., None]).squeeze(-1)
    if grad_attention is not None:
        da = da + grad_attention.to(acc)
    da = da.masked_fill(a == 0, 0.0)  # h at padding is never read (it may hold anything)
    return (a * (da - (a * da).sum(-1, keepdim=True))).to(attention.dtype)
