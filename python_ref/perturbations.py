"""The score perturbations of the paper (SPEC "Perturbations of the scores"), written to be read.

Every perturbation is a constant for autograd: it is built from detached tensors and no gradient flows
into or through it. Values at padded positions (mask False) are never read, so they may hold anything.
"""
from __future__ import annotations

import torch

from .checks import check_perturbation_inputs, warn_iat_batch_of_one

# Guards every division by a norm; a zero vector normalises to zero (SPEC).
DELTA = 1e-12


def valid_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`mask` as a bool tensor shaped like `like` [B, T]; None means every position is real."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return mask


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32, like the kernels do: DELTA = 1e-12 underflows to 0 in
    float16 (0 / 0 = nan for a zero row) and a sum of squares overflows it from |x| ~ 256."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def normalize_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x / max(||x||_2, DELTA) per row over its valid positions, zero elsewhere.  # [B, T] -> [B, T]"""
    x = x.to(_accumulation_dtype(x)).masked_fill(~mask, 0.0)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(DELTA)


def at_perturbation(grad: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1.0) -> torch.Tensor:
    """Attention AT: r_b = eps * g_b / max(||g_b||, delta).  # [B, T] -> [B, T]"""
    return (eps * normalize_rows(grad.detach(), valid_mask(mask, grad))).to(grad.dtype)


def rp_perturbation(noise: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1.0) -> torch.Tensor:
    """Attention RP: the same normalisation applied to standard normal noise.  # [B, T] -> [B, T]"""
    return (eps * normalize_rows(noise.detach(), valid_mask(mask, noise))).to(noise.dtype)


def iat_perturbation(
    scores: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1.0
) -> torch.Tensor:
    """Attention iAT: the AT direction restricted to the span of score differences in the batch.

    D_ij = (s_i - s_j) m_i m_j,  d_ij = D_ij / max(||D_ij||, delta),  k_ij = <g_i, d_ij>,
    u_i = sum_j k_ij d_ij,  r_i = eps * u_i / max(||u_i||, delta).           # [B, T] -> [B, T]
    This reference materialises [B, B, T]; the kernels do not.
    """
    m = valid_mask(mask, scores)
    if scores.shape[0] == 1:
        warn_iat_batch_of_one()
    dtype = _accumulation_dtype(scores)
    s = scores.detach().to(dtype).masked_fill(~m, 0.0)
    g = grad.detach().to(dtype).masked_fill(~m, 0.0)
    both = m[:, None, :] & m[None, :, :]  # [B, B, T]
    diff = (s[:, None, :] - s[None, :, :]).masked_fill(~both, 0.0)  # [B, B, T]
    d = diff / diff.norm(dim=-1, keepdim=True).clamp_min(DELTA)  # [B, B, T]
    k = (g[:, None, :] * d).sum(-1)  # [B, B]
    u = (k[:, :, None] * d).sum(1)  # [B, T]
    return (eps * normalize_rows(u, m)).to(scores.dtype)


def perturbation(
    kind: str,
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    grad: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    eps: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The perturbation r [B, T] of `kind` in {"at", "iat", "rp"} for the scores [B, T]."""
    check_perturbation_inputs(kind, scores, mask, grad, noise, eps, required=True)
    if kind == "at":
        return at_perturbation(grad, mask, eps)
    if kind == "iat":
        return iat_perturbation(scores, grad, mask, eps)
    if noise is None:
        noise = torch.randn(scores.shape, generator=generator, dtype=scores.dtype, device=scores.device)
    return rp_perturbation(noise, mask, eps)


def word_at_perturbation(
    grad: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1.0
) -> torch.Tensor:
    """Word AT (Miyato et al. 2017): one norm over all valid tokens and dimensions.  # [B, T, E] -> [B, T, E]"""
    m = valid_mask(mask, grad[..., 0])
    g = grad.detach().to(_accumulation_dtype(grad)).masked_fill(~m[..., None], 0.0)
    norm = g.flatten(1).norm(dim=-1).clamp_min(DELTA)  # [B]
    return (eps * g / norm[:, None, None]).to(grad.dtype)


def nearest_neighbours(weight: torch.Tensor, k: int = 10, chunk: int = 4096) -> torch.Tensor:
    """For each vocabulary row, the indices of its k nearest other rows (Euclidean).  # [V, E] -> [V, k]"""
    w = weight.detach()
    sq = (w * w).sum(-1)
    out = []
    for start in range(0, w.shape[0], chunk):
        block = w[start:start + chunk]
        dist = sq[start:start + chunk, None] - 2.0 * block @ w.T + sq[None, :]  # [chunk, V]
        rows = torch.arange(start, start + block.shape[0], device=w.device)
        dist[torch.arange(block.shape[0], device=w.device), rows] = float("inf")  # exclude the word itself
        out.append(dist.topk(k, dim=-1, largest=False).indices)
    return torch.cat(out)


def word_iat_perturbation(
    embedded: torch.Tensor,
    grad: torch.Tensor,
    neighbour_vectors: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1.0,
    normalize: str = "perturbation",
) -> torch.Tensor:
    """Word iAT (Sato et al. 2018): directions towards each token's K nearest vocabulary words.

    embedded [B, T, E] (the token vectors w_t), grad [B, T, E], neighbour_vectors [B, T, K, E] (w_k).
    d_tk = normalize(w_k - w_t) (a unit vector per token and neighbour), k_tk = <g_t, d_tk> (the gradient of
    the loss with respect to the coefficient alpha_tk of r_t = sum_k alpha_tk d_tk, at alpha = 0).

    normalize "perturbation": u_t = sum_k k_tk d_tk, r_b = eps * u_b / ||u_b|| (norm over the example's valid
    tokens and dimensions), so ||r_b|| = eps.
    normalize "coefficients" (Sato et al. 2018 as their public code computes it): each token's coefficient
    gradients are normalised over its K neighbours, alpha_t = k_t / ||k_t|| (F.normalize(grad_alpha, axis=1) in
    their train.py), u_t = sum_k alpha_tk d_tk, and then, as for every method here (SPEC), r_b = eps * u_b /
    ||u_b|| over the example (their sentence-level option), so ||r_b|| = eps and eps means what it means for AT.
    A token whose coefficients are all zero contributes nothing.
    """
    if normalize not in ("perturbation", "coefficients"):
        raise ValueError(f"normalize must be 'perturbation' or 'coefficients', got {normalize!r}")
    m = valid_mask(mask, grad[..., 0])
    dtype = _accumulation_dtype(grad)
    diff = neighbour_vectors.detach().to(dtype) - embedded.detach().to(dtype)[:, :, None, :]  # [B, T, K, E]
    norm = torch.linalg.vector_norm(diff, dim=-1).clamp_min(DELTA)  # [B, T, K]
    # u_t = sum_k (<g_t, diff_tk> / |diff_tk|^2) diff_tk: the same sum as above without materialising d_tk or
    # the two [B, T, K, E] products, which made this 2.6x slower and word_iat on IMDB 2.2x slower than word_at.
    k = torch.einsum("btke,bte->btk", diff, grad.detach().to(dtype)) / norm  # [B, T, K]
    if normalize == "coefficients":
        k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(DELTA)  # alpha_t, unit per token
    u = torch.einsum("btk,btke->bte", k / norm, diff)  # [B, T, E]
    return word_at_perturbation(u, m, eps).to(grad.dtype)
