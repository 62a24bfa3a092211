"""Interpretability and robustness measurements (SPEC "Evaluation").

- gradient_importance: Jain & Wallace's gradient x input word importance, |sum_e (dy/de_t)_e e_t,e|, with the
  attention held constant, y the predicted class probability, normalised to sum 1 over the valid tokens.
- importance_definitions: that importance and two more for the same tokens, all normalised to sum 1 over the
  valid tokens: the plain gradient norm ||dy/de_t||_2 (Simonyan et al. 2014) and gradient x input with the
  attention NOT held constant (dy/de_t also through the attention scores), in one call (two backward passes).
- perturbed_predictions: the logits and attention when the test-time scores get the AT perturbation of size
  eps (the direction that increases the loss of the true label), for the robustness numbers.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

import fused_attn_at

from .models import AttentionClassifier


class Importance(NamedTuple):
    importance: torch.Tensor  # [B, T], sums to 1 over each row's valid tokens (0 where none)
    attention: torch.Tensor  # [B, T] clean attention
    logits: torch.Tensor  # clean logits


class Perturbed(NamedTuple):
    logits: torch.Tensor  # logits under the perturbed attention
    attention: torch.Tensor  # perturbed attention [B, T]
    clean_logits: torch.Tensor
    clean_attention: torch.Tensor  # [B, T]


def _no_cudnn(device: torch.device):
    # cuDNN's RNN backward refuses to run in eval mode; these gradients are taken in eval mode.
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()


def gradient_importance(model: AttentionClassifier, batch) -> Importance:
    """Gradient x input importance of each token for the predicted class, attention held constant.
    Every example's y depends on its own embeddings only, so one backward of sum(y) gives all rows."""
    with torch.enable_grad(), _no_cudnn(batch.tokens.device):
        embedded = model.embed(batch.tokens).detach().requires_grad_(True)  # [B, T, E]
        enc = model.encode(batch, embedded)
        # Detached scores: the attention is a constant, so dy/de flows only through the values h.
        pooled = fused_attn_at.attention_pool(enc.h, enc.scores.detach(), enc.mask)
        logits = model.head(pooled.context, enc.query, batch.candidate_mask)
        y = model.predicted_probability(logits)  # [B]
        (grad,) = torch.autograd.grad(y.sum(), embedded)
    importance = (grad * embedded.detach()).sum(-1).abs().masked_fill(~batch.mask, 0.0)  # [B, T]
    importance = importance / importance.sum(-1, keepdim=True).clamp_min(torch.finfo(importance.dtype).tiny)
    return Importance(importance, pooled.attention.detach(), logits.detach())


# metrics.json keys of the importance definitions (SPEC "Evaluation"; report.py's claim-2 table)
IMPORTANCE_DEFINITIONS = {
    "gradient_x_input": "gradient x input, attention held constant (Jain & Wallace; the default)",
    "gradient_norm": "gradient norm ||dy/de_t|| (Simonyan et al. 2014), through the whole model",
    "gradient_x_input_through_attention": "gradient x input, gradient also through the attention",
}


def _normalised(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = values.masked_fill(~mask, 0.0)
    return values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


def importance_definitions(model: AttentionClassifier, batch) -> tuple[dict[str, torch.Tensor], Importance]:
    """{name: [B, T] importance} for every IMPORTANCE_DEFINITIONS entry (each row sums to 1 over its valid
    tokens), and gradient_importance's result (whose importance is the "gradient_x_input" entry)."""
    held = gradient_importance(model, batch)
    with torch.enable_grad(), _no_cudnn(batch.tokens.device):
        embedded = model.embed(batch.tokens).detach().requires_grad_(True)  # [B, T, E]
        enc = model.encode(batch, embedded)
        pooled = fused_attn_at.attention_pool(enc.h, enc.scores, enc.mask)  # scores NOT detached
        y = model.predicted_probability(model.head(pooled.context, enc.query, batch.candidate_mask))
        (grad,) = torch.autograd.grad(y.sum(), embedded)
    found = {"gradient_x_input": held.importance,
             "gradient_norm": _normalised(torch.linalg.vector_norm(grad, dim=-1), batch.mask),
             "gradient_x_input_through_attention": _normalised((grad * embedded.detach()).sum(-1).abs(), batch.mask)}
    return found, held


def perturbed_predictions(model: AttentionClassifier, batch, eps: float) -> Perturbed:
    """Predictions when the attention scores get the AT perturbation of norm eps (computed from the loss of
    the true labels, the worst first-order direction)."""
    with torch.no_grad():
        enc = model.encode(batch)
    with torch.enable_grad():
        scores = enc.scores.detach().requires_grad_(True)
        clean = fused_attn_at.attention_pool(enc.h, scores, enc.mask)
        clean_logits = model.head(clean.context, enc.query, batch.candidate_mask)
        (grad,) = torch.autograd.grad(model.loss(clean_logits, batch), scores)
    with torch.no_grad():
        adv = fused_attn_at.attention_pool(enc.h, enc.scores, enc.mask, perturbation="at", grad=grad, eps=eps)
        logits = model.head(adv.context, enc.query, batch.candidate_mask)
    return Perturbed(logits, adv.attention, clean_logits.detach(), clean.attention.detach())


def total_variation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """0.5 * sum_t |a_t - b_t| per row.  [B, T], [B, T] -> [B]"""
    return 0.5 * (a - b).abs().sum(-1)
