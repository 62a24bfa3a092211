"""Multi-head self-attention with the paper's perturbations of the scores (SPEC "Self-attention"), written to
be read: every map [B, nh, Tq, Tk] is materialised. This is the truth the fused kernels are tested against.

    S = scale * Q K^T (+ bias),   P = masked_softmax(S + r, allowed),   O = P V
    allowed[b, h, i, j] = key_mask[b, j] and (j <= i if causal) and attn_mask[b, h, i, j] and bias != -inf
    valid  [b, h, i, j] = allowed[b, h, i, j] and query_mask[b, i]      (where r may be non-zero)

`query_mask` defaults to `key_mask` when Tq == Tk (self-attention), else all True. A bias entry of -inf masks
that entry like padding does. r is a constant for autograd (built from detached tensors).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from .attention import masked_softmax
from .checks import FLOAT_DTYPES, PERTURBATIONS, _is_compiling, check_eps, warn_iat_batch_of_one
from .perturbations import DELTA, _accumulation_dtype

NORMS = ("example", "row")
# iAT materialises [B, B, units, entries] here: refuse above this many bytes (argument iat_max_bytes or env).
IAT_MAX_BYTES_ENV = "FUSED_ATTN_AT_IAT_MAX_BYTES"
IAT_MAX_BYTES_DEFAULT = 2 << 30


class SelfAttentionOutput(NamedTuple):
    output: torch.Tensor  # [B, nh, Tq, dv]
    attention: torch.Tensor  # [B, nh, Tq, Tk], the perturbed map when a perturbation was asked for


# ---------------------------------------------------------------------------------------------------------
# Input checks (shared with fused_attn_at.self_attention)


def _check_4d(name: str, x, shape_text: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_text}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape {shape_text} (4 dims), got shape {tuple(x.shape)}")


def _check_broadcast(name: str, x: torch.Tensor, full: tuple, text: str) -> None:
    if x.dim() != 4 or any(a not in (1, b) for a, b in zip(x.shape, full)):
        raise ValueError(f"{name} must have shape {text} = {list(full)} (each of the first two dims may be 1), "
                         f"got {tuple(x.shape)}")
    if x.shape[2:] != full[2:]:
        raise ValueError(f"{name} must have shape {text} = {list(full)} (Tq and Tk in full), got {tuple(x.shape)}")


def check_self_attention_inputs(q, k, v, key_mask=None, *, causal=False, bias=None, scale=None, perturbation=None,
                                grad=None, noise=None, eps=1.0, norm="example", attn_mask=None, query_mask=None,
                                dropout_p=0.0, grad_is_tensor=True) -> None:
    """Shapes, dtypes and devices of perturbed_attention's inputs; raises naming the argument and what was expected."""
    _check_4d("q", q, "[B, nh, Tq, d]")
    _check_4d("k", k, "[B, nh, Tk, d]")
    _check_4d("v", v, "[B, nh, Tk, dv]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
    B, nh, Tq, d = q.shape
    Tk = k.shape[2]
    if k.shape[:2] != (B, nh) or k.shape[3] != d:
        raise ValueError(f"k must have shape [B, nh, Tk, d] = [{B}, {nh}, Tk, {d}] (like q), got {tuple(k.shape)}")
    if v.shape[:3] != (B, nh, Tk):
        raise ValueError(f"v must have shape [B, nh, Tk, dv] = [{B}, {nh}, {Tk}, dv] (like k), got {tuple(v.shape)}")
    full = (B, nh, Tq, Tk)
    for name, m, T, what in (("key_mask", key_mask, Tk, "Tk"), ("query_mask", query_mask, Tq, "Tq")):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or tuple(m.shape) != (B, T):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{name} must have shape [B, {what}] = [{B}, {T}] (bool, True = token), got {shape}")
        if m.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor [B, {what}] (True = token), got dtype {m.dtype}")
        if m.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {m.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if attn_mask is not None:
        _check_4d("attn_mask", attn_mask, "[B or 1, nh or 1, Tq, Tk]")
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be a bool tensor (True = may attend), got dtype {attn_mask.dtype}")
        _check_broadcast("attn_mask", attn_mask, full, "[B or 1, nh or 1, Tq, Tk]")
    if bias is not None:
        _check_4d("bias", bias, "[B or 1, nh or 1, Tq, Tk]")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
        _check_broadcast("bias", bias, full, "[B or 1, nh or 1, Tq, Tk]")
        if bias.device != q.device:
            raise ValueError(f"bias must be on the device of q ({q.device}), got {bias.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not 0 < scale < math.inf):
        raise ValueError(f"scale must be None (1/sqrt(d)) or a finite number > 0, got {scale!r}")
    if scale is None and q.shape[-1] == 0:
        raise ValueError("q has d = 0 features, so the default scale 1/sqrt(d) is undefined: pass scale=")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be 'example' or 'row', got {norm!r}")
    if perturbation is not None and perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be None, 'at', 'iat' or 'rp', got {perturbation!r}")
    check_eps(eps)
    if perturbation in ("at", "iat") and grad is None:
        raise ValueError(f"perturbation={perturbation!r} needs grad = dL_clean/dS, a tensor [B, nh, Tq, Tk] = "
                         f"{list(full)}")
    if perturbation in (None, "rp") and grad is not None:
        raise ValueError(f"grad is only used by perturbation='at' or 'iat', got perturbation={perturbation!r}")
    if perturbation != "rp" and noise is not None:
        raise ValueError(f"noise is only used by perturbation='rp', got perturbation={perturbation!r}")
    for name, x in (("grad", grad if grad_is_tensor else None), ("noise", noise)):
        if x is None:
            continue
        _check_4d(name, x, f"[B, nh, Tq, Tk] = {list(full)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if tuple(x.shape) != full:
            raise ValueError(f"{name} must have shape [B, nh, Tq, Tk] = {list(full)}, got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")


def _check_finite_at(name: str, x: torch.Tensor, where: torch.Tensor) -> None:
    if _is_compiling() or x.device.type == "meta":
        return
    if bool((~torch.isfinite(x) & where).any()):
        raise ValueError(f"{name} holds NaN or inf at unmasked entries; expected finite values")


# ---------------------------------------------------------------------------------------------------------
# Masks, scores, perturbations


def self_attention_masks(q: torch.Tensor, k: torch.Tensor, key_mask=None, *, causal=False, attn_mask=None,
                         query_mask=None, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed, valid), both bool [B, nh, Tq, Tk]: `allowed` are the keys each query's softmax runs over,
    `valid` (allowed and a real query) the entries where r may be non-zero and over which norms are taken."""
    B, nh, Tq, _ = q.shape
    Tk = k.shape[2]
    allowed = torch.ones((1, 1, Tq, Tk), dtype=torch.bool, device=q.device)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones((Tq, Tk), dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        allowed = allowed & attn_mask
    if bias is not None:
        allowed = allowed & (bias != float("-inf"))
    allowed = allowed.expand(B, nh, Tq, Tk)
    if query_mask is None and key_mask is not None and Tq == Tk:
        query_mask = key_mask
    valid = allowed if query_mask is None else allowed & query_mask[:, None, :, None]
    return allowed, valid


def attention_scores(q: torch.Tensor, k: torch.Tensor, bias=None, scale=None) -> torch.Tensor:
    """S = scale * Q K^T (+ bias), [B, nh, Tq, Tk]; scale defaults to 1/sqrt(d)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    return s


def _units(x: torch.Tensor, norm: str) -> torch.Tensor:
    """[B, nh, Tq, Tk] -> [B, U, L]: the vectors that are normalised (one per example, or one per row)."""
    B, nh, Tq, Tk = x.shape
    return x.reshape(B, 1, nh * Tq * Tk) if norm == "example" else x.reshape(B, nh * Tq, Tk)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(DELTA)


def iat_max_bytes(limit: int | None = None) -> int:
    """The byte limit of the materialising iAT: `limit`, else $FUSED_ATTN_AT_IAT_MAX_BYTES, else 2 GiB."""
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit < math.inf:
            raise ValueError(f"iat_max_bytes must be None or a number of bytes >= 0, got {limit!r}")
        return int(limit)
    text = os.environ.get(IAT_MAX_BYTES_ENV)
    if text:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value < math.inf:
            raise ValueError(f"{IAT_MAX_BYTES_ENV}={text!r}: expected a number of bytes >= 0")
        return int(value)
    return IAT_MAX_BYTES_DEFAULT


def self_attention_perturbation(kind: str, scores: torch.Tensor, valid: torch.Tensor | None = None, *,
                                grad: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                                eps: float = 1.0, norm: str = "example", generator: torch.Generator | None = None,
                                max_bytes: int | None = None) -> torch.Tensor:
    """The perturbation r [B, nh, Tq, Tk] of `kind` ("at", "iat", "rp") for one layer's scores S.

    valid: bool, broadcastable to S (None: every entry); r is zero outside it and every norm is taken over it:
    per example over (heads, queries, keys) for norm="example", per (example, head, query) over keys for "row".
    AT: eps * G / ||G||; RP: the same for standard normal noise (`noise`, or drawn from `generator`);
    iAT: D_ij = (S_i - S_j) M_i M_j, d_ij = D_ij/||D_ij||, k_ij = <G_i, d_ij>, u_i = sum_j k_ij d_ij,
    r_i = eps u_i/||u_i||. This reference materialises [B, B, ...] for iAT and refuses above `max_bytes`
    (default $FUSED_ATTN_AT_IAT_MAX_BYTES or 2 GiB).
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"kind must be 'at', 'iat' or 'rp', got {kind!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be 'example' or 'row', got {norm!r}")
    check_eps(eps)
    if scores.dim() != 4:
        raise ValueError(f"scores must have shape [B, nh, Tq, Tk] (4 dims), got {tuple(scores.shape)}")
    shape = scores.shape
    m = torch.ones(shape, dtype=torch.bool, device=scores.device) if valid is None else valid.expand(shape)
    dtype = _accumulation_dtype(scores)
    if kind in ("at", "iat") and grad is None:
        raise ValueError(f"kind={kind!r} needs grad = dL_clean/dS [B, nh, Tq, Tk]")
    if kind == "rp":
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=scores.dtype, device=scores.device)
        direction = noise
    else:
        direction = grad
    if tuple(direction.shape) != tuple(shape):
        raise ValueError(f"{'noise' if kind == 'rp' else 'grad'} must have the shape of the scores "
                         f"{list(shape)}, got {tuple(direction.shape)}")
    g = _units(direction.detach().to(dtype).masked_fill(~m, 0.0), norm)  # [B, U, L]
    if kind in ("at", "rp"):
        return (eps * _normalize(g)).reshape(shape).to(scores.dtype)
    B = shape[0]
    if B == 1:
        warn_iat_batch_of_one()
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = 3 * B * B * g.shape[1] * g.shape[2] * itemsize
    limit = iat_max_bytes(max_bytes)
    if needed > limit:
        raise MemoryError(
            f"the reference iAT perturbation materialises [B, B, nh*Tq*Tk] differences: ~{needed / 2**20:.0f} MiB "
            f"for B={B}, map {list(shape[1:])}, above the limit of {limit / 2**20:.0f} MiB; raise it with "
            f"{IAT_MAX_BYTES_ENV}=BYTES (or the iat_max_bytes argument), or use a smaller batch")
    mu = _units(m, norm)
    s = _units(scores.detach().to(dtype).masked_fill(~m, 0.0), norm)
    both = mu[:, None] & mu[None, :]  # [B, B, U, L]
    d = _normalize((s[:, None] - s[None, :]).masked_fill(~both, 0.0))  # [B, B, U, L], d_ii = 0
    k = (g[:, None] * d).sum(-1, keepdim=True)  # [B, B, U, 1]
    u = (k * d).sum(1)  # [B, U, L]
    return (eps * _normalize(u)).reshape(shape).to(scores.dtype)


def perturbed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                        *, causal: bool = False, bias: torch.Tensor | None = None, scale: float | None = None,
                        perturbation: str | None = None, grad: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, eps: float = 1.0, norm: str = "example",
                        attn_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0, return_attention: bool = False,
                        generator: torch.Generator | None = None, iat_max_bytes: int | None = None,
                        dropout_mask: torch.Tensor | None = None):
    """O = masked_softmax(scale Q K^T + bias + r) V with r the (constant) perturbation of the scores.

    q [B, nh, Tq, d], k [B, nh, Tk, d], v [B, nh, Tk, dv]; key_mask [B, Tk] bool (True = token); query_mask
    [B, Tq] (default key_mask when Tq == Tk); attn_mask bool [B|1, nh|1, Tq, Tk] (True = may attend); bias
    float [B|1, nh|1, Tq, Tk] (-inf masks). perturbation None | "at" | "iat" (grad = dL_clean/dS [B, nh, Tq, Tk])
    | "rp" (noise, or generator). dropout_p: dropout on the attention probabilities (after the softmax);
    dropout_mask: its multipliers [B, nh, Tq, Tk] (0 or 1 / (1 - dropout_p)) instead of torch's random draw (how
    a fused kernel's hashed mask is checked). Returns O [B, nh, Tq, dv], or SelfAttentionOutput(O, P) with return_attention=True (P before dropout).
    """
    check_self_attention_inputs(q, k, v, key_mask, causal=causal, bias=bias, scale=scale, perturbation=perturbation,
                                grad=grad, noise=noise, eps=eps, norm=norm, attn_mask=attn_mask,
                                query_mask=query_mask, dropout_p=dropout_p)
    s, allowed, valid = checked_scores(q, k, key_mask, causal=causal, bias=bias, scale=scale, attn_mask=attn_mask,
                                       query_mask=query_mask, noise=noise)
    if grad is not None:
        _check_finite_at("grad", grad, valid)
    if perturbation is not None:
        s = s + self_attention_perturbation(perturbation, s.detach(), valid, grad=grad, noise=noise, eps=eps,
                                            norm=norm, generator=generator, max_bytes=iat_max_bytes)
    if dropout_mask is not None:
        if dropout_p == 0:
            raise ValueError("dropout_mask needs dropout_p > 0 (the probability it was drawn with)")
        _check_broadcast("dropout_mask", dropout_mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
                         "[B, nh, Tq, Tk]")
    out, p = attend(s, allowed, v, dropout_p, dropout_mask)
    return SelfAttentionOutput(out, p) if return_attention else out


def checked_scores(q, k, key_mask=None, *, causal=False, bias=None, scale=None, attn_mask=None, query_mask=None,
                   noise=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S = scale Q K^T + bias [B, nh, Tq, Tk] with the entries it may attend (allowed) and those r may touch
    (valid); raises if S, or the given RP noise, is not finite where it is used."""
    allowed, valid = self_attention_masks(q, k, key_mask, causal=causal, attn_mask=attn_mask, query_mask=query_mask,
                                          bias=bias)
    s = attention_scores(q, k, bias, scale)
    _check_finite_at("scores (scale * q k^T + bias)", s.detach(), allowed)
    if noise is not None:
        _check_finite_at("noise", noise, valid)
    return s, allowed, valid


def attend(s: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
           dropout_mask: torch.Tensor | None = None):
    """(O = dropout(P) V [B, nh, Tq, dv], P = masked_softmax(S) [B, nh, Tq, Tk], before dropout); dropout_mask:
    the dropout's multipliers, given (else torch draws them)."""
    p = masked_softmax(s, allowed)
    if dropout_mask is not None:
        p_used = p * dropout_mask.to(p.dtype)
    else:
        p_used = torch.nn.functional.dropout(p, dropout_p) if dropout_p > 0 else p
    return p_used @ v, p
