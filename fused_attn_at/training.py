"""The paper's training objective for the attention methods at the cost of ONE encoder pass (SPEC
"Training objective"): the encoder states and scores are computed once and shared by the clean and the
adversarial attention pooling; only the cheap pooling and head run twice.

Passes over h [B, T, H] per step (issue 17, item 3): reads of h, and writes/reads of a [B, T, H] gradient dh.
The pooling is memory-bound, so these passes are its cost; everything else is [B, T] or [B, H].

    two single ops (the path before issue 17; now only for perturbation=None):
      clean forward                                  read h
      g = torch.autograd.grad(L_clean, scores)       read h, write a dh that is thrown away
      perturbed forward                              read h
      loss.backward(): clean branch's backward       read h, write dh
                       perturbed branch's backward   read h, write dh
                       autograd sums the two dh      read 2 dh, write dh (in place into one of them)
      at/iat: 5 reads of h + 4 dh written + 2 dh read = 11 passes; rp (no g): 4 + 3 + 2 = 9 passes
    the pair op (every backend: cpu, cuda, triton, reference):
      clean forward, no autograd                     read h
      g = attention_scores_grad(dL/dc_clean, ...)    read h (no dh)
      attention_pool_pair: both forwards             read h
      loss.backward(): the pair's one backward       read h, write dh once
      at/iat: 4 reads of h + 1 dh written = 5 passes; rp (no g, no clean forward): 2 + 1 = 3 passes
(tests/test_pair_op.py counts the [B, T, H] allocations and additions of both: 1 and 0 against 3 and 1.)
This is the minimum: g needs dL/dc_clean, which needs the clean context (a pass) and the head, before the
perturbed forward can start; g itself needs <h_t, dL/dc> (a pass); the perturbed context a pass; the backward
of both branches one pass that writes dh once.

The head runs on the clean context twice ([B, H], cheap): once on a detached copy to get dL/dc_clean (no
parameter is touched), once inside the objective. Its random draws (dropout) are replayed for the second run,
so both see the same sample, as the single head run of the two-op path did. (For rp without a `generator` the
noise comes from the global generator before the head runs, where the two-op path drew it after the clean
head: the same distribution, but another sample when the head draws random numbers too. The experiments pass
a generator of its own.)
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
from python_ref import AttentionPoolOutput

from ._backend import resolve_backend
from .functional import attention_pool, attention_pool_pair, attention_scores_grad
from .ops import PAIR_BACKENDS

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
    loss_fn maps logits to the scalar task loss. g = dL_clean/dscores is taken without touching any
    parameter's .grad. Every backend has the pair op, so the step makes the fewest passes over h (module
    docstring); a backend that lacked it would run two single ops, with the same results.

    compat="released" reproduces the authors' released code (SPEC, last section): the objective becomes
    2 L_clean + lam L_adv and the iAT direction becomes eps * normalize(-g). Its third network pass changes
    the cost, not the gradient, so it is not repeated here.
    """
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be None or 'released', got {compat!r}")
    if perturbation in ("at", "iat") and not scores.requires_grad:
        raise ValueError("scores must require grad (be computed from the model's parameters) for "
                         f"perturbation={perturbation!r}: the AT direction is dL_clean/dscores")
    if perturbation is not None and resolve_backend(backend, h.device) in PAIR_BACKENDS:
        return _pair_step(h, scores, mask, head, loss_fn, perturbation, eps, lam, compat, generator, backend)
    # No perturbation (one pooling), or a backend without the pair op: two single ops.
    return _two_op_step(h, scores, mask, head, loss_fn, perturbation, eps, lam, compat, generator, backend)


def _two_op_step(h, scores, mask, head, loss_fn, perturbation, eps, lam, compat, generator, backend) -> AdversarialLoss:
    """The step as two single ops, g by torch.autograd.grad (11 passes over h for at/iat, 9 for rp)."""
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


@contextlib.contextmanager
def _rng_replayed(device: torch.device):
    """Runs the block, then puts the random number generators of the CPU and of `device` back as they were,
    so the next block draws the same numbers (the head's dropout mask)."""
    if device.type in ("cpu", "meta"):
        with torch.random.fork_rng(devices=[]):
            yield
    else:
        index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
        with torch.random.fork_rng(devices=[index], device_type=device.type):
            yield


def _pair_step(h, scores, mask, head, loss_fn, perturbation, eps, lam, compat, generator, backend) -> AdversarialLoss:
    """The step at the fewest passes over h: 5 for at/iat, 3 for rp (module docstring)."""
    kind, grad = perturbation, None
    if perturbation in ("at", "iat"):
        with torch.no_grad():
            clean_first = attention_pool(h, scores, mask, backend=backend)  # read h
        with torch.enable_grad(), _rng_replayed(clean_first.context.device):
            context = clean_first.context.detach().requires_grad_()
            (grad_context,) = torch.autograd.grad(loss_fn(head(context)), context, allow_unused=True)
        if grad_context is None:  # the loss does not depend on the context
            grad_context = torch.zeros_like(context)
        grad = attention_scores_grad(grad_context, h, clean_first.attention, backend=backend)  # read h, no dh
        if compat == "released" and perturbation == "iat":
            kind, grad = "at", -grad  # the released iAT collapses to the normalised negative gradient
    clean, adversarial = attention_pool_pair(h, scores, mask, perturbation=kind, grad=grad, eps=eps,
                                             generator=generator, backend=backend)  # read h
    clean_logits = head(clean.context)
    clean_loss = loss_fn(clean_logits)
    adversarial_loss = loss_fn(head(adversarial.context))
    clean_weight = 2.0 if compat == "released" else 1.0
    loss = clean_weight * clean_loss + lam * adversarial_loss  # its backward: the pair's, read h and write dh once
    return AdversarialLoss(loss, clean_loss, adversarial_loss, clean_logits, clean, adversarial)
