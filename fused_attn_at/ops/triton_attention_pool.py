"""The Triton backend: kernels, launchers and torch.library registration of the fused perturbed attention
pooling, in one module (Liger-Kernel style).

Backend-module contract (see ops/__init__.py):
    attention_pool(h, scores, mask, direction, kind, eps) -> (context [B, H], attention [B, T])
    perturbation(scores, mask, direction, kind, eps) -> r [B, T]
    attention_pool_pair(h, scores, mask, direction, kind, eps) -> (context_clean, attention_clean, context_adv,
        attention_adv)                                       (one sweep over h forward, one backward)
    attention_scores_grad(grad_context, grad_attention, h, attention) -> grad_scores [B, T]   (no grad_h)

Kernels (each program owns one batch row, or one slice of it; strides are passed, offsets are 64-bit):
  _iat_coeff_kernel      W[i, j] = <g_i, D_ij> / max(||D_ij||, delta)^2, D_ij = (s_i - s_j) m_i m_j.     O(B^2 T)
  _perturbation_kernel   r_i = eps * v_i / max(||v_i||, delta), v_i = direction_i (AT/RP) or
                         u_i = sum_j W[i, j] D_ij (iAT, rebuilt block by block from the scores: no [B, B, T]).
  _fwd_kernel            online-softmax statistics of s + r over T blocks (r normalised inline for AT/RP, or
                         read from _perturbation_kernel for iAT), the attention, and the context of an H slice.
                         PAIR: the clean softmax and context too, from the same loads of h (the pair op).
  _bwd_dh_da_kernel      da_t = <dc, h_t> (+ grad_attention_t) and dh_t = a_t dc over a slice of T. STORE_DH
                         off: da alone (attention_scores_grad). PAIR: a second branch's da2 from the same loads
                         of h, and dh_t = a_t dc + a2_t dc2 stored once (the pair op's backward).
  _bwd_dscores_kernel    dscores = a * (da - sum_t a_t da_t) (PAIR: + a2 * (da2 - sum_t a2_t da2_t)).
Why the forward takes the iAT r from a separate kernel: on a GPU the forward splits H over several programs per
row to fill the chip at small batches, and each of them would otherwise rebuild u_i (O(B T) per program).

float16/bfloat16 accumulate in float32, float64 in float64. Without a GPU the same functions run on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported), which is how CI tests them.
The ops live in their own namespace, fused_attn_at_triton::{attention_pool_fwd, attention_pool_bwd,
perturbation} and the pair ops of the AT training step (issue 17: attention_scores_grad,
attention_pool_pair_fwd, attention_pool_pair_bwd, with the contract of ops/__init__.py), registered with
torch.library.triton_op (torch.compile traces into the kernels; the fake implementation is the launcher itself,
run on fake tensors) and an autograd formula (attention_pool_fwd and attention_pool_pair_fwd).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import numpy as np
import torch
from python_ref.checks import warn_iat_batch_of_one

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except Exception as exc:  # ImportError, or a broken install that fails while loading its driver
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton is not importable: {type(exc).__name__}: {exc}"

DELTA = 1e-12  # SPEC: guards every division by a norm (python_ref.DELTA)
NAMESPACE = "fused_attn_at_triton"

# Forward kernel's PERTURB: what is added to the scores.
_PERTURB_NONE, _PERTURB_NORMALISE, _PERTURB_GIVEN = 0, 1, 2
# Contract's kind: 0 none, 1 normalise the direction (AT/RP), 2 iAT.
_KIND_NONE, _KIND_NORMALISE, _KIND_IAT = 0, 1, 2

# Under the interpreter the @triton.jit functions are InterpretedFunction objects (set before import).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Launch parameters forced by tests (small blocks so that the loops over T, H and j run several times under
# the interpreter) or by a benchmark; see `launch_overrides`.
_OVERRIDES: dict[str, int] = {}
_OVERRIDE_KEYS = ("block_t", "block_h", "block_j", "split", "num_warps")


def launch_overrides(**values: int) -> contextlib.AbstractContextManager[None]:
    """Force launch parameters inside the block: block_t, block_h, block_j (powers of two), split (programs
    per row along H in the forward, along T in the backward), num_warps."""
    return _launch_overrides(_OVERRIDES, _OVERRIDE_KEYS, values)


@contextlib.contextmanager
def _launch_overrides(overrides: dict[str, int], keys: tuple[str, ...], values: dict[str, int], min_block: int = 1,
                      may_be_zero: tuple[str, ...] = ()) -> Iterator[None]:
    """The body of a kernel module's `launch_overrides`: checks `values` (names among `keys`; positive ints, or
    >= 0 for the names in `may_be_zero`; block_* a power of two >= min_block) and sets them in `overrides` (the
    module's dict) inside the block."""
    for key, value in values.items():
        if key not in keys:
            raise ValueError(f"launch_overrides: unknown parameter {key!r}; expected one of {keys}")
        if not isinstance(value, int) or value < (0 if key in may_be_zero else 1):
            raise ValueError(f"launch_overrides: {key} must be a positive int, got {value!r}")
        if key.startswith("block_") and (value & (value - 1) or value < min_block):
            at_least = f" >= {min_block}" if min_block > 1 else ""
            raise ValueError(f"launch_overrides: {key} must be a power of two{at_least}, got {value}")
    saved = dict(overrides)
    overrides.update(values)
    try:
        yield
    finally:
        overrides.clear()
        overrides.update(saved)


def _skip_launch(x: torch.Tensor) -> bool:
    """True for fake/meta tensors under the interpreter (torch.library.opcheck, fake-mode tracing): the launchers
    then only allocate. Compiled kernels go through wrap_triton's traced path instead, which needs no skip."""
    if not _INTERPRETING:
        return False
    from torch._subclasses.fake_tensor import is_fake

    return x.device.type == "meta" or is_fake(x)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _num_programs_target(device: torch.device) -> int:
    """Programs per launch that keep every multiprocessor streaming (four 4-warp programs per SM); 1 on the CPU
    interpreter, where more programs only cost time."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if AVAILABLE:
    _TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
    _TL_DELTA = tl.constexpr(DELTA)  # a jit function may read a module global only as a constexpr
    # Triton's interpreter truncates float32 -> bfloat16 (and ignores fp_downcast_rounding) where the GPU
    # rounds to nearest even; the kernels round by hand there so that CI checks the GPU's numbers.
    _ROUND_BF16_BY_HAND = tl.constexpr(_INTERPRETING)

    @triton.jit
    def _cast(x, DTYPE: tl.constexpr):
        """x in DTYPE (an output's element type), rounded to nearest even."""
        if _ROUND_BF16_BY_HAND and DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(DTYPE)

    @triton.jit
    def _eps(eps_hi, eps_lo, ACC: tl.constexpr):
        """eps in ACC: Triton passes Python floats as float32, so float64 gets it as a sum of two (_eps_parts)."""
        # (scalar args are tensors when compiled and Python floats under the interpreter: promote by addition)
        return (tl.zeros([], ACC) + eps_hi) + eps_lo

    @triton.jit
    def _valid_positions(mask_ptr, row_m, stride_mt, offs_t, in_bounds, HAS_MASK: tl.constexpr):
        """In-bounds positions that are real tokens; masked positions are never loaded from anywhere."""
        if HAS_MASK:
            m = tl.load(mask_ptr + row_m + offs_t.to(tl.int64) * stride_mt, mask=in_bounds, other=0)
            valid = in_bounds & (m != 0)
        else:
            valid = in_bounds
        return valid

    @triton.jit
    def _nonfinite(x, valid):
        """1 if x holds a NaN or inf at a valid position of the block, else 0 (an int32 scalar)."""
        bad = valid & ((x != x) | (tl.abs(x) == float("inf")))
        return tl.max(tl.where(bad, 1, 0), 0)

    @triton.jit
    def _flag(flag_ptr, bad_scores, bad_direction):
        """Clears the "scores are finite" (flag_ptr[0]) and "direction is finite" (flag_ptr[1]) flags where a
        program found a non-finite real value (they start at 1: the host asserts they are nonzero)."""
        tl.atomic_and(flag_ptr, 0, mask=bad_scores != 0)
        tl.atomic_and(flag_ptr + 1, 0, mask=bad_direction != 0)

    @triton.jit
    def _masked_sumsq(x_ptr, row_x, stride_xt, mask_ptr, row_m, stride_mt, T,
                      HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
        """sum_t x_t^2 over the valid positions of one row."""
        acc = tl.zeros([BLOCK_T], ACC)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            valid = _valid_positions(mask_ptr, row_m, stride_mt, offs_t, offs_t < T, HAS_MASK)
            x = tl.load(x_ptr + row_x + offs_t.to(tl.int64) * stride_xt, mask=valid, other=0).to(ACC)
            acc += x * x
        return tl.sum(acc, 0)

    @triton.jit
    def _score_differences(s_ptr, mask_ptr, s_i, valid_i, rows_j, in_j, offs_t64,
                           stride_sb, stride_st, stride_mb, stride_mt,
                           HAS_MASK: tl.constexpr, ACC: tl.constexpr):
        """D_ij = (s_i - s_j) m_i m_j for a block of rows j on one block of positions.  # -> [BLOCK_J, BLOCK_T]"""
        both = in_j[:, None] & valid_i[None, :]
        if HAS_MASK:
            m_j = tl.load(mask_ptr + rows_j[:, None] * stride_mb + offs_t64[None, :] * stride_mt,
                          mask=both, other=0)
            both = both & (m_j != 0)
        s_j = tl.load(s_ptr + rows_j[:, None] * stride_sb + offs_t64[None, :] * stride_st,
                      mask=both, other=0).to(ACC)
        return tl.where(both, s_i[None, :] - s_j, 0.0)

    @triton.jit
    def _iat_direction_block(s_ptr, mask_ptr, w_ptr, row_w, s_i, valid_i, offs_t, B,
                             stride_sb, stride_st, stride_mb, stride_mt,
                             HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):
        """u_i[t] = sum_j W[i, j] (s_i[t] - s_j[t]) m_i[t] m_j[t] on one block of positions.  # -> [BLOCK_T]"""
        u = tl.zeros([BLOCK_T], ACC)
        offs_t64 = offs_t.to(tl.int64)
        for j0 in range(0, B, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            in_j = offs_j < B
            w = tl.load(w_ptr + row_w + offs_j, mask=in_j, other=0)
            diff = _score_differences(s_ptr, mask_ptr, s_i, valid_i, offs_j.to(tl.int64), in_j, offs_t64,
                                      stride_sb, stride_st, stride_mb, stride_mt, HAS_MASK, ACC)
            u += tl.sum(w[:, None] * diff, axis=0)
        return u

    @triton.jit
    def _iat_coeff_kernel(s_ptr, mask_ptr, g_ptr, w_ptr, flag_ptr, B, T,
                          stride_sb, stride_st, stride_mb, stride_mt, stride_gb, stride_gt,
                          HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):
        """One program per row i: W[i, :] (the iAT coefficient of every difference direction, divided once
        more by its norm so that u_i = sum_j W[i, j] D_ij needs no normalised d_ij). Flags a non-finite real
        score or grad value of row i."""
        row_i = tl.program_id(0).to(tl.int64)
        bad_s = tl.zeros([], tl.int32)
        bad_g = tl.zeros([], tl.int32)
        for j0 in range(0, B, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            in_j = offs_j < B
            rows_j = offs_j.to(tl.int64)
            sq_norm = tl.zeros([BLOCK_J, BLOCK_T], ACC)
            g_dot_d = tl.zeros([BLOCK_J, BLOCK_T], ACC)
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                offs_t64 = offs_t.to(tl.int64)
                valid_i = _valid_positions(mask_ptr, row_i * stride_mb, stride_mt, offs_t, offs_t < T, HAS_MASK)
                s_i = tl.load(s_ptr + row_i * stride_sb + offs_t64 * stride_st, mask=valid_i, other=0).to(ACC)
                g_i = tl.load(g_ptr + row_i * stride_gb + offs_t64 * stride_gt, mask=valid_i, other=0).to(ACC)
                bad_s = tl.maximum(bad_s, _nonfinite(s_i, valid_i))
                bad_g = tl.maximum(bad_g, _nonfinite(g_i, valid_i))
                diff = _score_differences(s_ptr, mask_ptr, s_i, valid_i, rows_j, in_j, offs_t64,
                                          stride_sb, stride_st, stride_mb, stride_mt, HAS_MASK, ACC)
                sq_norm += diff * diff
                g_dot_d += g_i[None, :] * diff
            norm = tl.maximum(tl.sqrt(tl.sum(sq_norm, axis=1)), _TL_DELTA)
            coeff = tl.sum(g_dot_d, axis=1) / (norm * norm)
            tl.store(w_ptr + row_i * B + offs_j, coeff, mask=in_j)
        _flag(flag_ptr, bad_s, bad_g)

    @triton.jit
    def _perturbation_kernel(s_ptr, mask_ptr, d_ptr, w_ptr, r_ptr, flag_ptr, B, T, eps_hi, eps_lo,
                             stride_sb, stride_st, stride_mb, stride_mt, stride_db, stride_dt,
                             stride_rb, stride_rt,
                             KIND: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):
        """One program per row: r = eps * v / max(||v||, delta), zero at padded positions; v is the direction
        (KIND 1) or the iAT combination u_i of the score differences (KIND 2, from W). Flags a non-finite real
        score or direction value (KIND 2: the scores; _iat_coeff_kernel read the grad)."""
        row = tl.program_id(0).to(tl.int64)
        row_m = row * stride_mb
        if KIND == 1:
            sq_norm = _masked_sumsq(d_ptr, row * stride_db, stride_dt, mask_ptr, row_m, stride_mt, T,
                                    HAS_MASK, ACC, BLOCK_T)
        else:
            sq_acc = tl.zeros([BLOCK_T], ACC)
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                valid = _valid_positions(mask_ptr, row_m, stride_mt, offs_t, offs_t < T, HAS_MASK)
                s_i = tl.load(s_ptr + row * stride_sb + offs_t.to(tl.int64) * stride_st, mask=valid,
                              other=0).to(ACC)
                u = _iat_direction_block(s_ptr, mask_ptr, w_ptr, row * B, s_i, valid, offs_t, B,
                                         stride_sb, stride_st, stride_mb, stride_mt,
                                         HAS_MASK, ACC, BLOCK_J, BLOCK_T)
                sq_acc += u * u
            sq_norm = tl.sum(sq_acc, 0)
        scale = _eps(eps_hi, eps_lo, ACC) / tl.maximum(tl.sqrt(sq_norm), _TL_DELTA)
        bad_s = tl.zeros([], tl.int32)
        bad_d = tl.zeros([], tl.int32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            offs_t64 = offs_t.to(tl.int64)
            in_t = offs_t < T
            valid = _valid_positions(mask_ptr, row_m, stride_mt, offs_t, in_t, HAS_MASK)
            s_i = tl.load(s_ptr + row * stride_sb + offs_t64 * stride_st, mask=valid, other=0).to(ACC)
            bad_s = tl.maximum(bad_s, _nonfinite(s_i, valid))
            if KIND == 1:
                v = tl.load(d_ptr + row * stride_db + offs_t64 * stride_dt, mask=valid, other=0).to(ACC)
                bad_d = tl.maximum(bad_d, _nonfinite(v, valid))
            else:
                v = _iat_direction_block(s_ptr, mask_ptr, w_ptr, row * B, s_i, valid, offs_t, B,
                                         stride_sb, stride_st, stride_mb, stride_mt,
                                         HAS_MASK, ACC, BLOCK_J, BLOCK_T)
            r = tl.where(valid, v * scale, 0.0)
            tl.store(r_ptr + row * stride_rb + offs_t64 * stride_rt, _cast(r, r_ptr.dtype.element_ty), mask=in_t)
        _flag(flag_ptr, bad_s, bad_d)

    @triton.jit
    def _perturbed_scores(s_ptr, row_s, stride_st, d_ptr, row_d, stride_dt, offs_t, valid, scale,
                          PERTURB: tl.constexpr, ACC: tl.constexpr):
        """s + r on one block, -inf at padded positions.  # -> [BLOCK_T]"""
        offs_t64 = offs_t.to(tl.int64)
        x = tl.load(s_ptr + row_s + offs_t64 * stride_st, mask=valid, other=0).to(ACC)
        if PERTURB != 0:
            x += scale * tl.load(d_ptr + row_d + offs_t64 * stride_dt, mask=valid, other=0).to(ACC)
        return tl.where(valid, x, float("-inf"))

    @triton.jit
    def _softmax_update(lane_max, lane_sum, x):
        """One block of the online softmax: one running (max, sum) per lane, merged by _softmax_finish."""
        new_max = tl.maximum(lane_max, x)
        # A lane that has seen only padding keeps max -inf; shift by 0 there so that no inf - inf appears.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
        return new_max, lane_sum

    @triton.jit
    def _softmax_finish(lane_max, lane_sum):
        """(shift, 1 / total) of a row from its lanes: a = exp(x - shift) * inv_total."""
        row_max = tl.max(lane_max, 0)
        row_shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        total = tl.sum(lane_sum * tl.exp(lane_max - row_shift), 0)
        # A fully masked row has total 0: attention 0, context 0 (and no 1/0 evaluated in the other branch).
        inv_total = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
        return row_shift, inv_total

    @triton.jit
    def _fwd_kernel(h_ptr, s_ptr, mask_ptr, d_ptr, ctx_ptr, a_ptr, ctxc_ptr, ac_ptr, flag_ptr, T, H, eps_hi, eps_lo,
                    stride_hb, stride_ht, stride_hh, stride_sb, stride_st, stride_mb, stride_mt,
                    stride_db, stride_dt, stride_cb, stride_ch, stride_ab, stride_at,
                    stride_ccb, stride_cch, stride_acb, stride_act,
                    PERTURB: tl.constexpr, PAIR: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        """Program (row, k) of a grid (B, n): the softmax of row's perturbed scores and the context columns
        [k BLOCK_H, (k+1) BLOCK_H) + multiples of n BLOCK_H. Program k = 0 also writes the attention.
        PERTURB 0: none; 1: r = eps * d / max(||d||, delta) computed here; 2: r = d given (already scaled).
        PAIR (PERTURB 1 or 2; the pair op): also the clean softmax of the unperturbed scores, its attention
        (ac_ptr) and context (ctxc_ptr), from the same loads of h: both contexts in one sweep over h.
        Program k = 0 flags a non-finite real score (and direction value, PERTURB 1) while it writes the attention."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        row_s = row * stride_sb
        row_m = row * stride_mb
        row_d = row * stride_db
        if PERTURB == 1:
            sq_norm = _masked_sumsq(d_ptr, row_d, stride_dt, mask_ptr, row_m, stride_mt, T, HAS_MASK, ACC, BLOCK_T)
            scale = _eps(eps_hi, eps_lo, ACC) / tl.maximum(tl.sqrt(sq_norm), _TL_DELTA)
        else:
            scale = 1.0

        # Online softmax statistics, one running (max, sum) per lane, merged at the end (PAIR: both softmaxes).
        lane_max = tl.full([BLOCK_T], float("-inf"), ACC)
        lane_sum = tl.zeros([BLOCK_T], ACC)
        lane_max_c = tl.full([BLOCK_T], float("-inf"), ACC)
        lane_sum_c = tl.zeros([BLOCK_T], ACC)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            valid = _valid_positions(mask_ptr, row_m, stride_mt, offs_t, offs_t < T, HAS_MASK)
            x = _perturbed_scores(s_ptr, row_s, stride_st, d_ptr, row_d, stride_dt, offs_t, valid, scale,
                                  PERTURB, ACC)
            lane_max, lane_sum = _softmax_update(lane_max, lane_sum, x)
            if PAIR:
                x_c = _perturbed_scores(s_ptr, row_s, stride_st, d_ptr, row_d, stride_dt, offs_t, valid, scale,
                                        0, ACC)
                lane_max_c, lane_sum_c = _softmax_update(lane_max_c, lane_sum_c, x_c)
        row_shift, inv_total = _softmax_finish(lane_max, lane_sum)
        row_shift_c, inv_total_c = _softmax_finish(lane_max_c, lane_sum_c)

        if split == 0:
            bad_s = tl.zeros([], tl.int32)
            bad_d = tl.zeros([], tl.int32)
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                offs_t64 = offs_t.to(tl.int64)
                in_t = offs_t < T
                valid = _valid_positions(mask_ptr, row_m, stride_mt, offs_t, in_t, HAS_MASK)
                # (the same loads as _perturbed_scores', kept apart so that each tensor is checked on its own)
                s = tl.load(s_ptr + row_s + offs_t64 * stride_st, mask=valid, other=0).to(ACC)
                bad_s = tl.maximum(bad_s, _nonfinite(s, valid))
                if PAIR:
                    a_c = tl.exp(tl.where(valid, s, float("-inf")) - row_shift_c) * inv_total_c
                    tl.store(ac_ptr + row * stride_acb + offs_t64 * stride_act, _cast(a_c, ac_ptr.dtype.element_ty),
                             mask=in_t)
                if PERTURB != 0:
                    d = tl.load(d_ptr + row_d + offs_t64 * stride_dt, mask=valid, other=0).to(ACC)
                    if PERTURB == 1:
                        bad_d = tl.maximum(bad_d, _nonfinite(d, valid))
                    s += scale * d
                x = tl.where(valid, s, float("-inf"))
                a = tl.exp(x - row_shift) * inv_total
                tl.store(a_ptr + row * stride_ab + offs_t64 * stride_at, _cast(a, a_ptr.dtype.element_ty),
                         mask=in_t)
            _flag(flag_ptr, bad_s, bad_d)

        for h0 in range(split * BLOCK_H, H, n_split * BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            in_h = offs_h < H
            offs_h64 = offs_h.to(tl.int64)
            acc = tl.zeros([BLOCK_T, BLOCK_H], ACC)
            acc_c = tl.zeros([BLOCK_T, BLOCK_H], ACC)
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                valid = _valid_positions(mask_ptr, row_m, stride_mt, offs_t, offs_t < T, HAS_MASK)
                x = _perturbed_scores(s_ptr, row_s, stride_st, d_ptr, row_d, stride_dt, offs_t, valid, scale,
                                      PERTURB, ACC)
                a = tl.exp(x - row_shift) * inv_total
                # Padded rows of h are skipped: their weight is exactly 0.
                h = tl.load(h_ptr + row * stride_hb + offs_t.to(tl.int64)[:, None] * stride_ht
                            + offs_h64[None, :] * stride_hh,
                            mask=valid[:, None] & in_h[None, :], other=0).to(ACC)
                acc += a[:, None] * h
                if PAIR:
                    x_c = _perturbed_scores(s_ptr, row_s, stride_st, d_ptr, row_d, stride_dt, offs_t, valid, scale,
                                            0, ACC)
                    a_c = tl.exp(x_c - row_shift_c) * inv_total_c
                    acc_c += a_c[:, None] * h
            context = tl.sum(acc, axis=0)
            tl.store(ctx_ptr + row * stride_cb + offs_h64 * stride_ch, _cast(context, ctx_ptr.dtype.element_ty),
                     mask=in_h)
            if PAIR:
                context_c = tl.sum(acc_c, axis=0)
                tl.store(ctxc_ptr + row * stride_ccb + offs_h64 * stride_cch,
                         _cast(context_c, ctxc_ptr.dtype.element_ty), mask=in_h)

    @triton.jit
    def _bwd_dh_da_kernel(dc_ptr, ga_ptr, h_ptr, a_ptr, dh_ptr, da_ptr, dc2_ptr, ga2_ptr, a2_ptr, da2_ptr, T, H,
                          stride_cb, stride_ch, stride_gb, stride_gt, stride_hb, stride_ht, stride_hh,
                          stride_ab, stride_at, stride_xb, stride_xt, stride_xh,
                          stride_c2b, stride_c2h, stride_g2b, stride_g2t, stride_a2b, stride_a2t,
                          HAS_GA: tl.constexpr, PAIR: tl.constexpr, HAS_GA2: tl.constexpr, STORE_DH: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        """Program (row, k) of a grid (B, n): T blocks k, k + n, ... of the row. da_t = <dc, h_t> + ga_t into a
        [B, T] buffer (ACC, contiguous) and dh_t = a_t dc (strides stride_x*; not written without STORE_DH: the
        scores gradient alone). PAIR (the pair op's backward): a second branch (dc2, ga2, a2) read against the
        same loads of h, da2_t = <dc2, h_t> + ga2_t into da2_ptr, and dh_t = a_t dc + a2_t dc2 written once."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        for t0 in range(split * BLOCK_T, T, n_split * BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            offs_t64 = offs_t.to(tl.int64)
            in_t = offs_t < T
            a = tl.load(a_ptr + row * stride_ab + offs_t64 * stride_at, mask=in_t, other=0).to(ACC)
            # Where a_t = 0 (padding, or underflow) dscores_t = a_t (...) = 0 and dh_t = 0: h_t is not needed.
            weighted = in_t & (a != 0)
            if PAIR:
                a2 = tl.load(a2_ptr + row * stride_a2b + offs_t64 * stride_a2t, mask=in_t, other=0).to(ACC)
                weighted2 = in_t & (a2 != 0)
                read = weighted | weighted2
            else:
                a2 = a  # unused
                weighted2 = weighted
                read = weighted
            acc = tl.zeros([BLOCK_T, BLOCK_H], ACC)
            acc2 = tl.zeros([BLOCK_T, BLOCK_H], ACC)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                offs_h64 = offs_h.to(tl.int64)
                in_h = offs_h < H
                dc = tl.load(dc_ptr + row * stride_cb + offs_h64 * stride_ch, mask=in_h, other=0).to(ACC)
                h = tl.load(h_ptr + row * stride_hb + offs_t64[:, None] * stride_ht + offs_h64[None, :] * stride_hh,
                            mask=read[:, None] & in_h[None, :], other=0).to(ACC)
                acc += h * dc[None, :]
                dh = a[:, None] * dc[None, :]
                if PAIR:
                    dc2 = tl.load(dc2_ptr + row * stride_c2b + offs_h64 * stride_c2h, mask=in_h, other=0).to(ACC)
                    acc2 += h * dc2[None, :]
                    dh += a2[:, None] * dc2[None, :]
                if STORE_DH:
                    tl.store(dh_ptr + row * stride_xb + offs_t64[:, None] * stride_xt + offs_h64[None, :] * stride_xh,
                             _cast(dh, dh_ptr.dtype.element_ty), mask=in_t[:, None] & in_h[None, :])
            da = tl.sum(acc, axis=1)
            if HAS_GA:
                da += tl.load(ga_ptr + row * stride_gb + offs_t64 * stride_gt, mask=weighted, other=0).to(ACC)
            tl.store(da_ptr + row * T + offs_t64, da, mask=in_t)
            if PAIR:
                da2 = tl.sum(acc2, axis=1)
                if HAS_GA2:
                    da2 += tl.load(ga2_ptr + row * stride_g2b + offs_t64 * stride_g2t, mask=weighted2,
                                   other=0).to(ACC)
                tl.store(da2_ptr + row * T + offs_t64, da2, mask=in_t)

    @triton.jit
    def _bwd_dscores_kernel(a_ptr, da_ptr, a2_ptr, da2_ptr, ds_ptr, T, stride_ab, stride_at, stride_a2b, stride_a2t,
                            stride_xb, stride_xt, PAIR: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
        """One program per row: dscores = a * (da - sum_t a_t da_t) (PAIR: plus a2 * (da2 - sum_t a2_t da2_t),
        the second branch's, in the same pass)."""
        row = tl.program_id(0).to(tl.int64)
        dot_acc = tl.zeros([BLOCK_T], ACC)
        dot2_acc = tl.zeros([BLOCK_T], ACC)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            offs_t64 = offs_t.to(tl.int64)
            in_t = offs_t < T
            a = tl.load(a_ptr + row * stride_ab + offs_t64 * stride_at, mask=in_t, other=0).to(ACC)
            da = tl.load(da_ptr + row * T + offs_t64, mask=in_t, other=0)
            dot_acc += a * da
            if PAIR:
                a2 = tl.load(a2_ptr + row * stride_a2b + offs_t64 * stride_a2t, mask=in_t, other=0).to(ACC)
                da2 = tl.load(da2_ptr + row * T + offs_t64, mask=in_t, other=0)
                dot2_acc += a2 * da2
        dot = tl.sum(dot_acc, 0)
        dot2 = tl.sum(dot2_acc, 0)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            offs_t64 = offs_t.to(tl.int64)
            in_t = offs_t < T
            a = tl.load(a_ptr + row * stride_ab + offs_t64 * stride_at, mask=in_t, other=0).to(ACC)
            da = tl.load(da_ptr + row * T + offs_t64, mask=in_t, other=0)
            ds = a * (da - dot)
            if PAIR:
                a2 = tl.load(a2_ptr + row * stride_a2b + offs_t64 * stride_a2t, mask=in_t, other=0).to(ACC)
                da2 = tl.load(da2_ptr + row * T + offs_t64, mask=in_t, other=0)
                ds += a2 * (da2 - dot2)
            tl.store(ds_ptr + row * stride_xb + offs_t64 * stride_xt, _cast(ds, ds_ptr.dtype.element_ty), mask=in_t)


# ----------------------------------------------------------------------------------------------- launchers

def _eps_parts(eps: float) -> tuple[float, float]:
    """(hi, lo), both exact in float32, with hi + lo == eps to about 1e-16 relative: a float64 eps for kernels
    whose float arguments are float32."""
    # numpy, not torch: this runs while torch.compile traces the op, where a torch.tensor would be fake.
    hi = float(np.float32(eps))
    return hi, float(np.float32(eps - hi))


def _launch_params(B: int, T: int, H: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Block sizes and programs per row. A [block_t, block_h] tile of h is 16 KB (16-byte loads along H, 256
    contiguous bytes per row). The forward splits H over programs and the backward splits T; where B times the
    H blocks would leave the GPU short of programs, the forward takes 128-byte H slices and longer T blocks
    (fwd_block_h, fwd_block_t). launch_overrides' block_t/block_h set both passes."""
    elem = dtype.itemsize
    wide, narrow = max(16, 256 // elem), max(16, 128 // elem)  # fp32: 64 / 32, fp16/bf16: 128 / 64
    block_h = min(_next_pow2(H), wide)
    block_t = min(_next_pow2(T), 64)
    fwd_block_h, fwd_block_t = block_h, block_t
    if device.type == "cuda" and B * triton.cdiv(H, block_h) < _num_programs_target(device):
        fwd_block_h, fwd_block_t = min(block_h, narrow), min(_next_pow2(T), 128)
    params = {"block_t": block_t, "block_h": block_h, "fwd_block_t": fwd_block_t, "fwd_block_h": fwd_block_h,
              "block_j": min(_next_pow2(B), 16), "split": 0, "num_warps": 4}
    params.update(_OVERRIDES)
    for key in ("block_t", "block_h"):
        if key in _OVERRIDES:
            params["fwd_" + key] = _OVERRIDES[key]
    return params


def _split(requested: int, blocks: int, B: int, device: torch.device) -> int:
    """Programs per row: the override if any (capped at the blocks there are), else enough to fill the GPU,
    with the blocks spread evenly (8 blocks for 5 wanted programs: 4 programs of 2 blocks, not 5 of 1 or 2)."""
    if requested:
        return max(1, min(requested, blocks))
    wanted = max(1, min(blocks, -(-_num_programs_target(device) // max(B, 1))))
    per_program = -(-blocks // wanted)
    return -(-blocks // per_program)


def _mask_arg(mask: Optional[torch.Tensor], scores: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """(pointer tensor, stride_b, stride_t, has_mask). bool is read as uint8 (same bytes, no copy)."""
    if mask is None:
        return scores, 0, 0, False
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def _check_kind(kind: int, direction: Optional[torch.Tensor]) -> None:
    if kind not in (_KIND_NONE, _KIND_NORMALISE, _KIND_IAT):
        raise ValueError(f"kind must be 0 (none), 1 (AT/RP) or 2 (iAT), got {kind!r}")
    if kind != _KIND_NONE and direction is None:
        raise ValueError(f"direction [B, T] is required for kind={kind}")


_SCORES_MESSAGE = "scores holds NaN or inf at real (unmasked) positions; expected finite values"
# Eager on CPU tensors raises ValueError with the op's name for the tensor, "direction", which
# fused_attn_at.functional renames to the argument the user passed (grad or noise), as for the C++ kernels.
_DIRECTION_MESSAGE = "direction holds NaN or inf at real (unmasked) positions; expected finite values"
# The device-side assertion cannot be renamed afterwards: it names the argument itself (iAT always takes grad).
_ASYNC_DIRECTION_MESSAGE = {
    _KIND_NORMALISE: "grad (or noise, for perturbation='rp') holds NaN or inf at real (unmasked) positions; "
                     "expected finite values",
    _KIND_IAT: "grad holds NaN or inf at real (unmasked) positions; expected finite values",
}


def _new_flags(like: torch.Tensor) -> torch.Tensor:
    """int32 [2]: "the real scores are finite", "the real direction values are finite"; the kernels clear them."""
    return torch.ones(2, dtype=torch.int32, device=like.device)


def _is_eager_tensor(x: torch.Tensor) -> bool:
    """A plain tensor holding values (not a fake, functional or traced one), outside torch.compile's tracing."""
    from torch._subclasses.fake_tensor import is_fake

    return (type(x) is torch.Tensor and not is_fake(x) and not torch._is_functional_tensor(x)
            and not torch.compiler.is_compiling())


def _raise_if_nonfinite(flags: torch.Tensor, kind: int) -> None:
    """After the kernels: NaN or inf at a real position of the scores or the direction is an error.

    CPU tensors (Triton's interpreter) in eager: the flags are read here (no device to wait for) and a ValueError
    is raised, the class the C++ kernels and the input checks raise. CUDA tensors, or any tensor while
    torch.compile traces the op: torch._assert_async, a device-side assertion that costs no host
    synchronisation: the error surfaces at the next synchronisation as a CUDA "device-side assert triggered"
    RuntimeError (which, as for any device assertion, leaves the CUDA context unusable), and torch.compile
    keeps it in the graph, so compiled and eager code reject the same inputs."""
    if flags.device.type == "cpu" and _is_eager_tensor(flags):
        scores_ok, direction_ok = flags.tolist()
        if not scores_ok:
            raise ValueError(_SCORES_MESSAGE)
        if not direction_ok:
            raise ValueError(_DIRECTION_MESSAGE)
        return
    torch._assert_async(flags[0], _SCORES_MESSAGE)
    if kind != _KIND_NONE:
        torch._assert_async(flags[1], _ASYNC_DIRECTION_MESSAGE[kind])


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU, not on the current one (a no-op context for CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch_perturbation(scores: torch.Tensor, mask: Optional[torch.Tensor], direction: torch.Tensor, kind: int,
                         eps: float, out: torch.Tensor, flags: torch.Tensor) -> None:
    """r [B, T] of kind 1 or 2 into `out` (any float dtype and strides); non-finite inputs clear `flags`."""
    B, T = scores.shape
    p = _launch_params(B, T, 1, scores.dtype, scores.device)
    acc = _acc_dtype(scores.dtype)
    mask_t, smb, smt, has_mask = _mask_arg(mask, scores)
    # The iAT program holds a [BLOCK_J, BLOCK_T] tile of the other rows' scores.
    block_t = p["block_t"] if kind == _KIND_NORMALISE else min(p["block_t"], max(16, 4096 // p["block_j"]))
    if kind == _KIND_IAT:
        coeff = torch.empty((B, B), dtype=acc, device=scores.device)  # W[i, j]
        torch.library.wrap_triton(_iat_coeff_kernel)[(B,)](
            scores, mask_t, direction, coeff, flags, B, T,
            scores.stride(0), scores.stride(1), smb, smt, direction.stride(0), direction.stride(1),
            HAS_MASK=has_mask, ACC=_TL_ACC[acc], BLOCK_J=p["block_j"], BLOCK_T=block_t, num_warps=p["num_warps"])
    else:
        coeff = scores  # unused
    torch.library.wrap_triton(_perturbation_kernel)[(B,)](
        scores, mask_t, direction, coeff, out, flags, B, T, *_eps_parts(eps),
        scores.stride(0), scores.stride(1), smb, smt, direction.stride(0), direction.stride(1),
        out.stride(0), out.stride(1),
        KIND=kind, HAS_MASK=has_mask, ACC=_TL_ACC[acc], BLOCK_J=p["block_j"], BLOCK_T=block_t,
        num_warps=p["num_warps"])


def _forward(h: torch.Tensor, scores: torch.Tensor, mask: Optional[torch.Tensor], direction: Optional[torch.Tensor],
             kind: int, eps: float, pair: bool = False) -> tuple[torch.Tensor, ...]:
    """(context, attention) of the (perturbed) pooling; pair=True (kind 1 or 2): (context_clean,
    attention_clean, context_adv, attention_adv) from one sweep over h."""
    _check_kind(kind, direction)
    if pair and kind == _KIND_NONE:
        raise ValueError("kind must be 1 (AT/RP: normalise direction) or 2 (iAT) for the pair op (its second "
                         f"branch is the perturbed one), got {kind}")
    B, T, H = h.shape
    context = torch.empty((B, H), dtype=h.dtype, device=h.device)
    attention = torch.empty((B, T), dtype=h.dtype, device=h.device)
    if pair:
        context_c = torch.empty((B, H), dtype=h.dtype, device=h.device)
        attention_c = torch.empty((B, T), dtype=h.dtype, device=h.device)
        outputs = (context_c, attention_c, context, attention)
    else:
        context_c, attention_c = context, attention  # unused
        outputs = (context, attention)
    if B == 0 or _skip_launch(h):
        return outputs
    if T == 0:
        context.zero_()
        context_c.zero_()
        return outputs
    acc = _acc_dtype(h.dtype)
    p = _launch_params(B, T, H, h.dtype, h.device)
    mask_t, smb, smt, has_mask = _mask_arg(mask, scores)
    flags = _new_flags(h)
    if kind == _KIND_IAT:
        r = torch.empty((B, T), dtype=acc, device=h.device)
        _launch_perturbation(scores, mask, direction, kind, eps, r, flags)
        perturb, d = _PERTURB_GIVEN, r
    elif kind == _KIND_NORMALISE:
        perturb, d = _PERTURB_NORMALISE, direction
    else:
        perturb, d = _PERTURB_NONE, scores  # unused
    split = _split(p["split"], triton.cdiv(max(H, 1), p["fwd_block_h"]), B, h.device)
    torch.library.wrap_triton(_fwd_kernel)[(B, split)](
        h, scores, mask_t, d, context, attention, context_c, attention_c, flags, T, H, *_eps_parts(eps),
        h.stride(0), h.stride(1), h.stride(2), scores.stride(0), scores.stride(1), smb, smt,
        d.stride(0), d.stride(1), context.stride(0), context.stride(1), attention.stride(0), attention.stride(1),
        context_c.stride(0), context_c.stride(1), attention_c.stride(0), attention_c.stride(1),
        PERTURB=perturb, PAIR=pair, HAS_MASK=has_mask, ACC=_TL_ACC[acc], BLOCK_T=p["fwd_block_t"],
        BLOCK_H=p["fwd_block_h"], num_warps=p["num_warps"])
    _raise_if_nonfinite(flags, kind)
    return outputs


def _backward(grad_context: torch.Tensor, grad_attention: Optional[torch.Tensor], h: torch.Tensor,
              attention: torch.Tensor, second: Optional[tuple] = None,
              store_dh: bool = True) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(grad_h, grad_scores) of the op's backward. second = (grad_context, grad_attention, attention) of a
    second branch over the same h (the pair op): both branches' gradients summed, from one sweep over h, grad_h
    written once. store_dh=False: grad_scores alone (grad_h None), nothing of size B*T*H written."""
    B, T, H = h.shape
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format) if store_dh else None
    grad_scores = torch.empty((B, T), dtype=attention.dtype, device=h.device)
    if _skip_launch(h):
        return grad_h, grad_scores
    if B == 0 or T == 0:
        if grad_h is not None:
            grad_h.zero_()
        return grad_h, grad_scores
    acc = _acc_dtype(h.dtype)
    p = _launch_params(B, T, H, h.dtype, h.device)
    da = torch.empty((2 if second is not None else 1, B, T), dtype=acc, device=h.device)  # dL/da_t, contiguous
    ga = grad_attention if grad_attention is not None else attention  # unused when None
    if second is not None:
        dc2, ga2_given, a2 = second
        ga2 = ga2_given if ga2_given is not None else a2  # unused when None
    else:
        dc2, ga2_given, ga2, a2 = grad_context, None, ga, attention  # unused
    dh = grad_h if grad_h is not None else h  # unused without store_dh
    split = _split(p["split"], triton.cdiv(T, p["block_t"]), B, h.device)
    torch.library.wrap_triton(_bwd_dh_da_kernel)[(B, split)](
        grad_context, ga, h, attention, dh, da[0], dc2, ga2, a2, da[-1], T, H,
        grad_context.stride(0), grad_context.stride(1), ga.stride(0), ga.stride(1),
        h.stride(0), h.stride(1), h.stride(2), attention.stride(0), attention.stride(1),
        dh.stride(0), dh.stride(1), dh.stride(2),
        dc2.stride(0), dc2.stride(1), ga2.stride(0), ga2.stride(1), a2.stride(0), a2.stride(1),
        HAS_GA=grad_attention is not None, PAIR=second is not None, HAS_GA2=ga2_given is not None,
        STORE_DH=store_dh, ACC=_TL_ACC[acc], BLOCK_T=p["block_t"], BLOCK_H=p["block_h"],
        num_warps=p["num_warps"])
    torch.library.wrap_triton(_bwd_dscores_kernel)[(B,)](
        attention, da[0], a2, da[-1], grad_scores, T, attention.stride(0), attention.stride(1),
        a2.stride(0), a2.stride(1), grad_scores.stride(0), grad_scores.stride(1), PAIR=second is not None,
        ACC=_TL_ACC[acc], BLOCK_T=p["block_t"], num_warps=p["num_warps"])
    return grad_h, grad_scores


# -------------------------------------------------------------------------------------- torch.library ops

def _define_op(name: str):
    """torch.library.triton_op on a GPU: torch.compile traces into the op and its kernels. Under the interpreter
    wrap_triton cannot trace a kernel (it hands back the interpreted function, which cannot run on the fake
    tensors of a trace), so a traced triton_op would silently drop its kernels and return uninitialised memory:
    there the op is an opaque torch.library.custom_op (the compiled graph calls it on real tensors) whose fake
    implementation is the launcher itself, which only allocates on fake tensors (_skip_launch)."""
    def define(fn):
        if not _INTERPRETING:
            return torch.library.triton_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op.register_fake(fn)
        return op
    return define


if AVAILABLE:
    from ._composite import attention_pool_backward_composite

    @_define_op("attention_pool_fwd")
    def attention_pool_fwd(h: torch.Tensor, scores: torch.Tensor, mask: Optional[torch.Tensor],
                           direction: Optional[torch.Tensor], kind: int,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, H], attention [B, T]) of masked_softmax(scores + r) over h [B, T, H]."""
        with _device_guard(h.device):
            return _forward(h, scores, mask, direction, kind, eps)

    @_define_op("attention_pool_bwd")
    def attention_pool_bwd(grad_context: torch.Tensor, grad_attention: Optional[torch.Tensor], h: torch.Tensor,
                           attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_h [B, T, H], grad_scores [B, T]); r is a constant, so this is the softmax-pooling backward."""
        with _device_guard(h.device):
            return _backward(grad_context, grad_attention, h, attention)

    @_define_op("perturbation")
    def perturbation_op(scores: torch.Tensor, mask: Optional[torch.Tensor], direction: torch.Tensor, kind: int,
                        eps: float) -> torch.Tensor:
        """r [B, T] in the dtype of scores (kind 1: AT/RP, 2: iAT)."""
        _check_kind(kind, direction)
        if kind == _KIND_NONE:
            raise ValueError("perturbation needs kind 1 (AT/RP) or 2 (iAT), got 0")
        out = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
        if out.numel() and not _skip_launch(scores):
            flags = _new_flags(scores)
            with _device_guard(scores.device):
                _launch_perturbation(scores, mask, direction, kind, eps, out, flags)
            _raise_if_nonfinite(flags, kind)
        return out

    def _setup_context(ctx, inputs, output) -> None:
        h, _scores, _mask, _direction, _kind, _eps = inputs
        _context, attention = output
        # The attention is saved as the op's output: in a recorded backward (create_graph=True) autograd then
        # links it back to the scores through this very backward, which is what makes double backward exact.
        ctx.save_for_backward(h, attention)

    def _attention_pool_backward(ctx, grad_context, grad_attention):
        h, attention = ctx.saved_tensors
        if grad_context is None:
            grad_context = h.new_zeros((h.shape[0], h.shape[2]))
        if torch.is_grad_enabled():
            # create_graph=True: the backward must itself be differentiable, and the kernel op has no
            # derivative: the same formula as differentiable torch ops (fused_attn_at/ops/_composite.py).
            grad_h, grad_scores = attention_pool_backward_composite(grad_context, grad_attention, h, attention)
        else:
            grad_h, grad_scores = attention_pool_bwd(grad_context, grad_attention, h, attention)
        return grad_h, grad_scores, None, None, None, None

    attention_pool_fwd.register_autograd(_attention_pool_backward, setup_context=_setup_context)

    # ---- the pair ops of the AT training step (issue 17; the contract in ops/__init__.py) ----

    @_define_op("attention_scores_grad")
    def attention_scores_grad_op(grad_context: torch.Tensor, grad_attention: Optional[torch.Tensor],
                                 h: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """grad_scores [B, T] of attention_pool_bwd without grad_h: h read once, nothing [B, T, H] written.
        No derivative (a constant, like the perturbation)."""
        with _device_guard(h.device):
            return _backward(grad_context, grad_attention, h, attention, store_dh=False)[1]

    @_define_op("attention_pool_pair_fwd")
    def attention_pool_pair_fwd(h: torch.Tensor, scores: torch.Tensor, mask: Optional[torch.Tensor],
                                direction: torch.Tensor, kind: int,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context_clean, attention_clean, context_adv, attention_adv): the clean pooling and that of
        masked_softmax(scores + r) (kind 1 or 2), both contexts from one sweep over h."""
        with _device_guard(h.device):
            return _forward(h, scores, mask, direction, kind, eps, pair=True)

    @_define_op("attention_pool_pair_bwd")
    def attention_pool_pair_bwd(grad_context_clean: torch.Tensor, grad_attention_clean: Optional[torch.Tensor],
                                grad_context_adv: torch.Tensor, grad_attention_adv: Optional[torch.Tensor],
                                h: torch.Tensor, attention_clean: torch.Tensor,
                                attention_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_h, grad_scores) of the pair, both branches summed: one sweep over h, grad_h written once
        (a_clean dc_clean + a_adv dc_adv)."""
        with _device_guard(h.device):
            return _backward(grad_context_clean, grad_attention_clean, h, attention_clean,
                             second=(grad_context_adv, grad_attention_adv, attention_adv))

    def _pair_setup_context(ctx, inputs, output) -> None:
        h = inputs[0]
        _context_clean, attention_clean, _context_adv, attention_adv = output
        ctx.save_for_backward(h, attention_clean, attention_adv)  # outputs, as in _setup_context

    def _attention_pool_pair_backward(ctx, grad_context_clean, grad_attention_clean, grad_context_adv,
                                      grad_attention_adv):
        h, attention_clean, attention_adv = ctx.saved_tensors
        if grad_context_clean is None:
            grad_context_clean = h.new_zeros((h.shape[0], h.shape[2]))
        if grad_context_adv is None:
            grad_context_adv = h.new_zeros((h.shape[0], h.shape[2]))
        if torch.is_grad_enabled():  # create_graph=True: each branch's backward as differentiable torch ops
            gh_clean, gs_clean = attention_pool_backward_composite(grad_context_clean, grad_attention_clean, h,
                                                                   attention_clean)
            gh_adv, gs_adv = attention_pool_backward_composite(grad_context_adv, grad_attention_adv, h,
                                                               attention_adv)
            grad_h, grad_scores = gh_clean + gh_adv, gs_clean + gs_adv
        else:
            grad_h, grad_scores = attention_pool_pair_bwd(grad_context_clean, grad_attention_clean,
                                                          grad_context_adv, grad_attention_adv, h,
                                                          attention_clean, attention_adv)
        return grad_h, grad_scores, None, None, None, None

    attention_pool_pair_fwd.register_autograd(_attention_pool_pair_backward, setup_context=_pair_setup_context)


# ------------------------------------------------------------------------------------- backend-module API

def _require_available() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"the Triton backend is not available: {UNAVAILABLE_REASON}")


def _warn_single_row_iat(kind: int, batch: int) -> None:
    if kind == _KIND_IAT and batch == 1:
        warn_iat_batch_of_one()


def attention_pool(h: torch.Tensor, scores: torch.Tensor, mask: Optional[torch.Tensor],
                   direction: Optional[torch.Tensor], kind: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, H], attention [B, T]), differentiable wrt h and scores (r is a constant)."""
    _require_available()
    _warn_single_row_iat(kind, h.shape[0])
    if direction is not None:
        direction = direction.detach()
    return attention_pool_fwd(h, scores, mask, direction, int(kind), float(eps))


def perturbation(scores: torch.Tensor, mask: Optional[torch.Tensor], direction: torch.Tensor, kind: int,
                 eps: float) -> torch.Tensor:
    """r [B, T] (called under no_grad)."""
    _require_available()
    _warn_single_row_iat(kind, scores.shape[0])
    return perturbation_op(scores.detach(), mask, direction.detach(), int(kind), float(eps))


def attention_pool_pair(h: torch.Tensor, scores: torch.Tensor, mask: Optional[torch.Tensor], direction: torch.Tensor,
                        kind: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context_clean, attention_clean, context_adv, attention_adv) of one sweep over h (kind 1 or 2);
    differentiable wrt h and scores, with one backward for both branches (grad_h written once)."""
    _require_available()
    _warn_single_row_iat(kind, h.shape[0])
    return attention_pool_pair_fwd(h, scores, mask, direction.detach(), int(kind), float(eps))


def attention_scores_grad(grad_context: torch.Tensor, grad_attention: Optional[torch.Tensor], h: torch.Tensor,
                          attention: torch.Tensor) -> torch.Tensor:
    """grad_scores [B, T] of the op's backward without grad_h (call it under no_grad: a constant)."""
    _require_available()
    return attention_scores_grad_op(grad_context, grad_attention, h, attention)


# ------------------------------------------------------------------------------ compiling without a GPU

# Unit strides of the contiguous layouts (innermost dimension of each tensor argument), per kernel: the JIT
# specialises a stride of 1 into a constant, which is what lets it emit 16-byte vector accesses.
_UNIT_STRIDES = {
    "_iat_coeff_kernel": ("stride_st", "stride_mt", "stride_gt"),
    "_perturbation_kernel": ("stride_st", "stride_mt", "stride_dt", "stride_rt"),
    "_fwd_kernel": ("stride_st", "stride_mt", "stride_dt", "stride_hh", "stride_ch", "stride_at", "stride_cch",
                    "stride_act"),
    "_bwd_dh_da_kernel": ("stride_ch", "stride_gt", "stride_hh", "stride_at", "stride_xh", "stride_c2h",
                          "stride_g2t", "stride_a2t"),
    "_bwd_dscores_kernel": ("stride_at", "stride_a2t", "stride_xt"),
}
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def compile_for_gpu(name: str, dtype: torch.dtype = torch.float32, arch: int = 90, **constexprs):
    """Compile kernel `name` ahead of time for CUDA compute capability `arch` (no GPU needed) as the JIT
    would specialise it for contiguous inputs of `dtype` whose sizes are multiples of 16; returns Triton's
    CompiledKernel (its .asm holds "ptx" and "cubin"). constexprs override the default launch constants.
    Needs the real JIT: fails under TRITON_INTERPRET=1."""
    _require_available()
    if _INTERPRETING:
        raise RuntimeError("compile_for_gpu needs TRITON_INTERPRET unset before triton is imported")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = globals()[name]
    acc = _acc_dtype(dtype)
    p = _launch_params(64, 1024, 256, dtype, torch.device("cpu"))
    defaults = {"PERTURB": _PERTURB_NORMALISE, "KIND": _KIND_IAT, "HAS_MASK": True, "HAS_GA": True,
                "PAIR": False, "HAS_GA2": True, "STORE_DH": True,
                "ACC": _TL_ACC[acc], "BLOCK_T": p["block_t"], "BLOCK_H": p["block_h"], "BLOCK_J": p["block_j"]}
    constants = {k: v for k, v in {**defaults, **constexprs}.items() if k in kernel.arg_names}
    perturb_given = constants.get("PERTURB") == _PERTURB_GIVEN
    signature, attrs = {}, {}
    for index, arg in enumerate(kernel.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in _UNIT_STRIDES[name]:
            constants[arg] = 1
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            if arg == "mask_ptr":
                signature[arg] = "*u8"
            elif arg == "flag_ptr":
                signature[arg] = "*i32"
            elif arg in ("w_ptr", "da_ptr", "da2_ptr") or (arg == "d_ptr" and perturb_given):
                signature[arg] = "*" + _TRITON_TYPE[acc]
            else:
                signature[arg] = "*" + _TRITON_TYPE[dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # 16-byte aligned, as torch allocates
        elif arg in ("eps_hi", "eps_lo"):
            signature[arg] = "fp32"
        else:  # sizes and the other strides
            signature[arg] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": p["num_warps"]})
