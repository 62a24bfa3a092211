"""nn.Module wrappers: the attention scorers of the paper's models and the fused pooling."""
from __future__ import annotations

import torch
from torch import nn

import python_ref

from .functional import attention_pool


class AdditiveScorer(nn.Module):
    """s_t = w2 . tanh(W1 h_t + b1 [+ Wq q + bq]), W1: H -> H/2 (SPEC). query_size>0 gives the pair form."""

    def __init__(self, hidden_size: int, query_size: int = 0, attention_size: int | None = None):
        super().__init__()
        attention_size = attention_size or max(1, hidden_size // 2)
        self.proj = nn.Linear(hidden_size, attention_size)
        self.query_proj = nn.Linear(query_size, attention_size) if query_size else None
        self.v = nn.Parameter(torch.empty(attention_size).uniform_(-attention_size ** -0.5, attention_size ** -0.5))

    def forward(self, h: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:  # [B, T, H] -> [B, T]
        query_term = None if self.query_proj is None else self.query_proj(query)
        return python_ref.additive_scores(h, self.proj.weight, self.proj.bias, self.v, query_term)


class DotScorer(nn.Module):
    """s_t = (w . h_t) / sqrt(H) with a learned w, or (h_t . q) / sqrt(H) when a query is given."""

    def __init__(self, hidden_size: int, learned_query: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.randn(hidden_size) * hidden_size ** -0.5) if learned_query else None

    def forward(self, h: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:  # [B, T, H] -> [B, T]
        return python_ref.dot_scores(h, self.w if query is None else query)


class AttentionPool(nn.Module):
    """Module form of fused_attn_at.attention_pool (no parameters): forward(h, scores, mask, **kwargs)."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, h, scores, mask=None, **kwargs):
        kwargs.setdefault("backend", self.backend)
        return attention_pool(h, scores, mask, **kwargs)
