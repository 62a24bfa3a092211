"""Attention scores, masked softmax and attention pooling (SPEC "Attention scores", "Attention pooling")."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .checks import check_attention_inputs
from .perturbations import perturbation as make_perturbation, valid_mask


class AttentionPoolOutput(NamedTuple):
    context: torch.Tensor  # [B, H]
    attention: torch.Tensor  # [B, T], the perturbed attention when a perturbation was asked for


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the positions where mask is True, exactly 0 elsewhere; a fully masked row gives zeros
    and no NaN, forward or backward.  # [B, T] -> [B, T]"""
    m = valid_mask(mask, scores)
    s = scores.masked_fill(~m, float("-inf"))
    # The max is only for stability (softmax is shift invariant), so it carries no gradient.
    if s.shape[-1] == 0:  # no positions (T = 0): an empty softmax, which amax cannot reduce
        return scores * 0.0
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(m.any(dim=-1, keepdim=True), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)  # exp(-inf) = 0 at padded positions
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def additive_scores(
    h: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    query_term: torch.Tensor | None = None,
) -> torch.Tensor:
    """s_t = w2 . tanh(W1 h_t + b1 [+ Wq q + bq]).  h [B, T, H], w1 [H', H], w2 [H'], query_term [B, H'] -> [B, T]"""
    pre = torch.nn.functional.linear(h, w1, b1)  # [B, T, H']
    if query_term is not None:
        pre = pre + query_term[:, None, :]
    return torch.tanh(pre) @ w2


def dot_scores(h: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """s_t = (h_t . q) / sqrt(H); q is a learned vector [H] (single sequence) or a query [B, H] (pair)."""
    if query.dim() == 1:
        return (h @ query) / math.sqrt(h.shape[-1])
    return torch.bmm(h, query[:, :, None]).squeeze(-1) / math.sqrt(h.shape[-1])


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
    """c = sum_t a_t h_t with a = masked_softmax(scores + r, mask), r the (constant) perturbation.

    h [B, T, H], scores [B, T] -> context [B, H], attention [B, T]
    """
    if backend not in (None, "reference"):
        raise ValueError(f"python_ref.attention_pool only implements backend='reference', got backend={backend!r}")
    check_attention_inputs(h, scores, mask, perturbation, grad, noise, eps)
    s = scores
    if perturbation is not None:
        r = make_perturbation(perturbation, scores, mask, grad=grad, noise=noise, eps=eps, generator=generator)
        s = scores + r
    a = masked_softmax(s, mask)
    context = torch.bmm(a[:, None, :], h).squeeze(1)  # [B, 1, T] @ [B, T, H] -> [B, H]
    return AttentionPoolOutput(context, a)
