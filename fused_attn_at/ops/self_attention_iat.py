"""iAT's direction u for the fused self-attention backends (cpu, triton), with O(B) maps instead of the reference's
O(B^2).

SPEC "Self-attention", iAT, per layer with the map flattened into units (one per example, or one per example, head
and query row for norm="row"): D_ij = (S_i - S_j) M_i M_j, d_ij = D_ij / ||D_ij||, k_ij = <G_i, d_ij>,
u_i = sum_j k_ij d_ij, r_i = eps u_i / ||u_i||. python_ref materialises every D_ij at once ([B, B, units, L]);
here the differences are formed for a chunk of examples i at a time ([chunk, B, units, L], chunk >= 1), so the
memory is a few [B, nh, Tq, Tk] maps (S, G, u) plus one chunk. The differences are taken explicitly, as in the
reference (no Gram-matrix expansion, which would cancel for nearly equal examples). u is zero outside M; the
caller normalises it as AT normalises G (the same norm over the same valid entries), so r = eps u / ||u||.
"""
from __future__ import annotations

import math

import torch

from python_ref.checks import warn_iat_batch_of_one
from python_ref.perturbations import DELTA, _accumulation_dtype
from python_ref.self_attention import IAT_MAX_BYTES_ENV, _units, iat_max_bytes

# bytes of one chunk's differences: large enough that the loop over chunks is a few Python steps for a batch of
# 32 with a 12 x 128 x 128 map, small enough to stay near the caches
CHUNK_BYTES = 64 * 2**20


def check_iat_memory(shape, dtype: torch.dtype, max_bytes: int | None = None, extra_maps: int = 0) -> None:
    """MemoryError when iat_direction's maps for scores of `shape` in `dtype` (plus `extra_maps` more, e.g. a
    record's G recomputation) would pass the iAT byte limit (max_bytes, else $FUSED_ATTN_AT_IAT_MAX_BYTES, else
    2 GiB); called before any map exists."""
    numel = math.prod(shape)
    map_bytes = numel * torch.empty((), dtype=dtype).element_size()
    # S, G, u, at least one example's differences, and their valid masks (bool)
    needed = (4 + extra_maps) * map_bytes + 2 * numel
    limit = iat_max_bytes(max_bytes)
    if needed > limit:
        raise MemoryError(
            f"iAT on the fused backends holds a few [B, nh, Tq, Tk] maps: ~{needed / 2**20:.0f} MiB for "
            f"B={shape[0]}, map {list(shape[1:])}, above the limit of {limit / 2**20:.0f} MiB; raise it with "
            f"{IAT_MAX_BYTES_ENV}=BYTES (or the iat_max_bytes argument), or use a smaller batch")


def iat_direction(scores: torch.Tensor, grad: torch.Tensor, valid: torch.Tensor, norm: str,
                  max_bytes: int | None = None) -> torch.Tensor:
    """u [B, nh, Tq, Tk] (float32 for half inputs, else their dtype) of the clean scores S and G = dL_clean/dS
    [B, nh, Tq, Tk] over the valid entries (bool, broadcastable); zero outside them. Raises MemoryError (as
    check_iat_memory) when its maps would pass the iAT byte limit."""
    shape = scores.shape
    B = shape[0]
    dtype = _accumulation_dtype(scores)
    check_iat_memory(shape, dtype, max_bytes)
    map_bytes = scores.numel() * torch.empty((), dtype=dtype).element_size()
    if B == 1:
        warn_iat_batch_of_one()
    m = valid.expand(shape)
    mu = _units(m, norm)  # [B, U, L]
    s = _units(scores.detach().to(dtype).masked_fill(~m, 0.0), norm)
    g = _units(grad.detach().to(dtype).masked_fill(~m, 0.0), norm)
    u = torch.empty_like(s)
    chunk = max(1, min(B, CHUNK_BYTES // max(1, map_bytes)))
    for i0 in range(0, B, chunk):
        i1 = min(B, i0 + chunk)
        both = mu[i0:i1, None] & mu[None]  # [c, B, U, L]
        diff = (s[i0:i1, None] - s[None]).masked_fill_(~both, 0.0)  # D_ij, [c, B, U, L]; D_ii = 0
        del both
        length = torch.linalg.vector_norm(diff, dim=-1).clamp_min(DELTA)  # ||D_ij||, [c, B, U]
        # k_ij / ||D_ij|| = <G_i, D_ij> / ||D_ij||^2, so that u_i = sum_j (k_ij / ||D_ij||) D_ij
        coeff = torch.einsum("cul,cbul->cbu", g[i0:i1], diff) / (length * length)
        u[i0:i1] = torch.einsum("cbu,cbul->cul", coeff, diff)
    return u.reshape(shape)
