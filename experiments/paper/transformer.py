"""A small Transformer encoder trained from scratch (issue 18 item 6), as one more encoder of the paper's model
(paper.models.AttentionClassifier: embedding -> encoder -> the paper's pooling attention -> decoder), and the
training step that perturbs its self-attention maps.

    python experiments/train.py --encoder transformer --method attention_at                        # pooling (the paper's)
    python experiments/train.py --encoder transformer --method attention_at --perturb-layers self  # every layer's map
    python experiments/train.py --encoder transformer --method attention_at --perturb-layers all   # both at once

Every self-attention of the encoder goes through fused_attn_at.perturbed_attention (layer=its module), so
fused_attn_at.SelfAttentionAT can perturb its maps (SPEC "Self-attention"). --perturb-layers:
- pooling: the paper's attention methods on the pooling attention, exactly as for the BiLSTM/CNN (methods.Objective:
  one encoder pass shared by the clean and the adversarial loss);
- self: SelfAttentionAT on every self-attention map of the encoder(s) (clean fwd+bwd, adversarial fwd+bwd with
  every layer perturbed by the r of the clean pass), the pooling attention unperturbed;
- all: both in the adversarial pass: every self-attention map perturbed as for "self", and the pooling scores of
  the adversarial pass shifted by the r the pooling perturbation takes from the clean pass (its scores and
  dL_clean/ds), the same r that "pooling" adds.
The word methods and vanilla do not look at --perturb-layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import fused_attn_at

from . import methods

PERTURB_LAYERS = ("pooling", "self", "all")
# train.py's defaults: ~10x the BiLSTM's speed per step on 2 CPU cores, 8 SST epochs well under 10 minutes
DEFAULTS = {"layers": 2, "heads": 4, "width": 128, "ff_size": 256, "dropout": 0.1}


def sinusoidal_positions(T: int, width: int, device, dtype) -> torch.Tensor:
    """Vaswani et al.'s fixed position encoding [T, width] (no length limit, nothing to learn)."""
    position = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(T, width, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: width // 2])
    return table.to(dtype)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention through fused_attn_at.perturbed_attention.
    [B, T, W], mask [B, T] -> [B, T, W]"""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, nh, T, d]
        o = fused_attn_at.perturbed_attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0,
                                              layer=self)
        return self.out(o.transpose(1, 2).reshape(B, T, W))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm Transformer layer (stable when trained from scratch without warm-up)."""

    def __init__(self, width: int, heads: int, ff_size: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(width, ff_size), nn.GELU(), nn.Linear(ff_size, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x), mask))
        return x + self.drop(self.ff(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """Input projection (embedding size -> width), sinusoidal positions, `layers` pre-LN layers, final LayerNorm.
    Same interface as paper.models.LSTMEncoder: [B, T, E], mask [B, T] -> states [B, T, width] (zero at padding),
    final [B, width] (the mean of the valid states: the query of pair tasks)."""

    def __init__(self, embed_size: int, *, layers: int = 2, heads: int = 4, width: int = 128, ff_size: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        if layers < 1 or heads < 1 or width < 1 or ff_size < 1:
            raise ValueError("layers, heads, width and ff_size must be positive")
        if width % heads:
            raise ValueError(f"--transformer-width {width} must be a multiple of --transformer-heads {heads}")
        if width % 2:
            raise ValueError(f"--transformer-width must be even (sinusoidal positions), got {width}")
        self.project = nn.Linear(embed_size, width) if embed_size != width else nn.Identity()
        self.layers = nn.ModuleList(EncoderLayer(width, heads, ff_size, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.output_size = width

    def forward(self, embedded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.project(embedded)
        x = self.drop(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype))
        for layer in self.layers:
            x = layer(x, mask)
        states = self.norm(x) * mask[..., None]
        count = mask.sum(1, keepdim=True).clamp_min(1).to(states.dtype)
        return states, states.sum(1) / count


def encoder_options(config: dict) -> dict:
    """The TransformerEncoder keyword arguments a run's config holds (train.py's --transformer-* flags)."""
    return {key: config.get(f"transformer_{key}", default) for key, default in DEFAULTS.items()}


# ----------------------------------------------------------------------------------------------- training step

class SelfAttentionObjective(methods.Objective):
    """methods.Objective whose attention methods perturb the self-attention maps (perturb_layers "self") or the
    self-attention maps and the pooling attention together ("all") through fused_attn_at.SelfAttentionAT. Its
    step back-propagates L_clean + lam * L_adv itself (two forward and two backward passes), so the returned
    loss is detached and the training loop must not call backward() again (`backward_in_step`)."""

    backward_in_step = True

    def __init__(self, model, method: str, *, perturb_layers: str, eps: float, lam: float,
                 generator: torch.Generator | None = None, word_iat_norm: str = "coefficients", world_size: int = 1):
        super().__init__(model, method, eps=eps, lam=lam, compat=None, generator=generator,
                         word_iat_norm=word_iat_norm)
        if perturb_layers not in PERTURB_LAYERS:
            raise ValueError(f"perturb_layers must be one of {PERTURB_LAYERS}, got {perturb_layers!r}")
        if world_size > 1:
            from .training import UsageError
            raise UsageError("--perturb-layers self/all runs its own backward passes (fused_attn_at.SelfAttentionAT) "
                             "and is not wired for torchrun here: train it in one process")
        self.perturb_layers = perturb_layers
        kind = methods.ATTENTION_PERTURBATION.get(method)
        self.kind = kind
        self.self_at = fused_attn_at.SelfAttentionAT(model, kind, eps=eps, lam=lam, generator=generator) \
            if kind is not None else None

    def forward(self, batch) -> methods.StepResult:
        if self.kind is None or self.perturb_layers == "pooling":
            result = super().forward(batch)
            result.loss.backward()  # this objective always leaves the gradient in .grad itself
            detach = lambda t: None if t is None else t.detach()  # noqa: E731
            return result._replace(loss=detach(result.loss), clean_loss=detach(result.clean_loss),
                                   adversarial_loss=detach(result.adversarial_loss))
        return self._self_attention_step(batch)

    def _self_attention_step(self, batch) -> methods.StepResult:
        model, kind, saved = self.model, self.kind, {}
        pooling_too = self.perturb_layers == "all"

        def forward():
            enc = model.encode(batch)
            head, loss_fn = self._closures(batch, enc)
            if "clean" not in saved:  # the clean pass (SelfAttentionAT back-propagates its loss)
                pooled = fused_attn_at.attention_pool(enc.h, enc.scores, enc.mask)
                logits = head(pooled.context)
                saved["clean"] = (logits.detach(), pooled.attention.detach(), enc.scores.detach())
                if pooling_too and kind != "rp" and enc.scores.requires_grad:
                    enc.scores.register_hook(lambda g: saved.__setitem__("grad", g.detach()))
                return loss_fn(logits)
            scores = enc.scores
            if pooling_too:  # the pooling perturbation of the clean pass, added to this pass's scores
                clean_scores = saved["clean"][2]
                r = fused_attn_at.perturbation(kind, clean_scores, enc.mask, grad=saved.get("grad"), eps=self.eps,
                                               generator=self.generator) if kind == "rp" or "grad" in saved \
                    else torch.zeros_like(clean_scores)
                scores = scores + r
            pooled = fused_attn_at.attention_pool(enc.h, scores, enc.mask)
            saved["adversarial_attention"] = pooled.attention.detach()
            return loss_fn(head(pooled.context))

        step = self.self_at.step(forward)
        logits, attention, _ = saved["clean"]
        return methods.StepResult(step.loss, step.clean_loss, step.adversarial_loss, logits, attention,
                                  saved.get("adversarial_attention"))


def make_objective(model, config: dict, generator: torch.Generator | None, world_size: int = 1):
    """The objective of a --encoder transformer run with --perturb-layers self/all (None otherwise: the caller
    uses methods.Objective)."""
    perturb = config.get("perturb_layers") or "pooling"
    if config.get("encoder") != "transformer" or perturb == "pooling":
        return None
    return SelfAttentionObjective(model, config["method"], perturb_layers=perturb, eps=config["eps"],
                                  lam=config["lam"], generator=generator,
                                  word_iat_norm=config.get("word_iat_norm") or "perturbation", world_size=world_size)
