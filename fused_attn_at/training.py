"""The paper's training objective for the attention methods at the cost of ONE encoder pass (SPEC
"Training objective"): the encoder states and scores are computed once and shared by the clean and the
adversarial attention pooling; only the cheap pooling and head run twice."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from python_ref import AttentionPoolOutput

from .functional import attention_pool

COMPAT_MODES = (None, "released")


class AdversarialLoss(NamedTuple):
    loss: torch.Tensor  # what to back-propagate: L_clean + lam * L_adv (2 L_clean + lam L_adv in "released")
    clean_loss: torch.Tensor  # L_clean, detached from nothing: it is part of `loss`
    adversarial_loss: torch.Tensor | None  # L_adv, None for perturbation=None
    clean_logits: torch.Tensor  # head(clean context), for metrics
    clean: AttentionPoolOutput  # clean context [B, H] and attention [B, T]
    adversarial: AttentionPoolOutput | None  # perturbed context and attention


def adversarial_attention_loss(
    h: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    head: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    perturbation: str | None = "at",
    eps: float = 1.0,
    lam: float = 1.0,
    compat: str | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> AdversarialLoss:
    """L = L_clean + lam * L_adv for attention AT ("at"), iAT ("iat") or random perturbation ("rp").

    h [B, T, H] and scores [B, T] come from one encoder pass (scores must be part of the autograd graph);
    head maps a context [B, H] to logits (close over a query for pair tasks: `lambda c: decoder(c, q)`);
    loss_fn maps logits to the scalar task loss. g = dL_clean/dscores is taken with
    torch.autograd.grad(..., retain_graph=True), so no parameter's .grad is touched.

    compat="released" reproduces the authors' released code (SPEC, last section): the objective becomes
    2 L_clean + lam L_adv and the iAT direction becomes eps * normalize(-g). Its third network pass changes
    the cost, not the gradient, so it is not repeated here.
    """
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be None or 'released', got {compat!r}")
    if perturbation in ("at", "iat") and not scores.requires_grad:
        raise ValueError("scores must require grad (be computed from the model's parameters) for "
                         f"perturbation={perturbation!r}: the AT direction is dL_clean/dscores")
    clean = attention_pool(h, scores, mask, backend=backend)
    clean_logits = head(clean.context)
    clean_loss = loss_fn(clean_logits)
    if perturbation is None:
        return AdversarialLoss(clean_loss, clean_loss, None, clean_logits, clean, None)

    kind, grad = perturbation, None
    if perturbation in ("at", "iat"):
        (grad,) = torch.autograd.grad(clean_loss, scores, retain_graph=True, allow_unused=True)
        if grad is None:  # the loss does not depend on the scores (e.g. every row fully masked)
            grad = torch.zeros_like(scores)
        if compat == "released" and perturbation == "iat":
            kind, grad = "at", -grad  # the released iAT collapses to the normalised negative gradient
    adversarial = attention_pool(h, scores, mask, perturbation=kind, grad=grad, eps=eps,
                                 generator=generator, backend=backend)
    adversarial_loss = loss_fn(head(adversarial.context))
    clean_weight = 2.0 if compat == "released" else 1.0
    loss = clean_weight * clean_loss + lam * adversarial_loss
    return AdversarialLoss(loss, clean_loss, adversarial_loss, clean_logits, clean, adversarial)
