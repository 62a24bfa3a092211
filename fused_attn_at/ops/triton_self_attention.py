"""The "triton" backend of fused_attn_at.perturbed_attention: flash-attention-2 style Triton kernels, made
differentiable and traceable here (the backend-module contract of ops/cpp_self_attention.py).

Ops, in the namespace fused_attn_at_triton (the schemas of the cpu backend's fused_attn_at::sa_* ops):
    sa_fwd(q, k, v, key_mask?, bias?, causal, scale, kind, coef?, dense?, seed, cq?, ck?, cv?, co?, cdo?, clse?,
        cbias?) -> (out [B, nh, Tq, dv], lse [B, nh, Tq])         lse = +inf on rows with no allowed key
    sa_bwd(dout, q, k, v, out, lse, key_mask?, bias?, causal, scale, bias_grad, <the perturbation arguments of
        sa_fwd>) -> (dq, dk, dv, dbias (bias's shape, or [0]), gsq [B, nh, Tq] = sum_j dS^2)
    sa_rowsq(q, k, key_mask?, bias?, causal, dense?, seed) -> [B, nh, Tq]: sum over the allowed j of X^2
    sa_rp_noise(q, k, seed) -> [B, nh, Tq, Tk]: the in-kernel RP noise, materialised (for tests)
    sa_fwd and sa_bwd end with dropout_p, dropout_seed, cdropout_p, cdropout_seed (defaults 0: no dropout).
The perturbation is r[b, h, i, j] = coef[b, h, i] * X[b, h, i, j] on the allowed entries, X by `kind` (the cpu
backend's numbering): 0 none, 1 `dense` (a given [B, nh, Tq, Tk] tensor: the user's G or noise), 2 standard
normal noise generated in the kernels from (seed, b nh + h, i, j) (Philox-4x32 and Box-Muller, as tl.randn: the
forward and both backward kernels regenerate the same numbers, never stored), 3 G = dL_clean/dS recomputed block
by block from the clean pass's cq, ck, cv, co (its O, or delta = rowsum(dO * O) [B, nh, Tq]), cdo (its dO), clse
and cbias: G = P_c * (dO_c V_c^T - delta) (AT through a CleanPassRecord). coef = eps / norm (zero at padded queries) comes from sa_rowsq (kinds 1,
2) or from the clean backward's gsq (kind 3), through the cpu backend's perturbation_coefficients.

Kernels (one program per (example x head, block of BLOCK_M queries) or (.., block of BLOCK_N keys)):
  _fwd_kernel    online softmax over the key blocks (running max and sum), O and the log-sum-exp.
  _bwd_dkdv_kernel  per key block, over the query blocks: P recomputed from the lse, dV += P^T dO,
                 dS = P (dO V^T - rowsum(dO O)), dK += scale dS^T Q.
  _bwd_dq_kernel per query block, over the key blocks: dQ += scale dS K, gsq = sum_j dS^2, and dS itself into
                 a [B, nh, Tq, Tk] float map only when the bias needs a gradient (the bias is such a map).
  _rowsq_kernel, _rp_noise_kernel.
Nothing of size B * nh * Tq * Tk is allocated except that bias gradient (and the dense G / noise a caller
passes, which already are maps). Scores and softmax statistics are float32 for float16/bfloat16/float32 inputs
(float32 matmuls with input_precision="ieee": no TF32) and float64 for float64; Q K^T reads the inputs' dtype
(tensor cores for half precision), P V and the backward matmuls round P and dS to it (as flash attention does).

Attention dropout (dropout_p > 0) is fused: each kernel regenerates the keep mask of its block from the dropout
seed by Philox (P M / (1 - p) reaches O and dV, dP is masked the same way); kind 3 recomputes the clean pass's
G with the clean call's mask (cdropout_p, cdropout_seed). sa_dropout_mask(q, k, p, seed) materialises the
multipliers (for tests). iAT materialises S, G and its direction u (a few maps, as
the cpu backend does: ops/self_attention_iat.py) and runs the kernels as AT with G := u. What this backend hands to
the reference (python_ref, materialised maps), as the cpu backend does: return_attention=True (in
fused_attn_at.self_attention). Without a GPU the kernels
run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported), which is how the
tests run them; the ops are then opaque custom ops whose fake implementation is the launcher (see
triton_attention_pool._define_op).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from python_ref.self_attention import self_attention_perturbation  # noqa: F401  (materialises r by definition)

from .cpp_self_attention import (
    KIND_CLEAN,
    KIND_DENSE,
    KIND_HASH,
    KIND_NONE,
    FusedBackend,
    FusedCleanPass,
    clean_pass_function,
    register_no_second_derivative,
    register_not_differentiable,
    run_fused,
    sa_fwd_autograd,
)
from .triton_attention_pool import (
    AVAILABLE,
    UNAVAILABLE_REASON,
    _acc_dtype,
    _INTERPRETING,
    _define_op,
    _device_guard,
    _eps_parts,
    _is_eager_tensor,
    _launch_overrides,
    _next_pow2,
    _skip_launch,
)

if AVAILABLE:
    import triton
    import triton.language as tl

    from .triton_attention_pool import _TL_ACC, _cast, _eps

_NO_CLEAN = (None,) * 7
_SCORES_MESSAGE = "scores (scale * q k^T + bias) holds NaN or inf at unmasked entries; expected finite values"

# Launch parameters forced by tests (small blocks, so that small shapes cross block edges under the
# interpreter) or by a benchmark; see `launch_overrides`.
_OVERRIDES: dict[str, int] = {}
_OVERRIDE_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "low_p")


def launch_overrides(**values: int) -> contextlib.AbstractContextManager[None]:
    """Force launch parameters inside the block: block_m (queries), block_n (keys) (powers of two >= 16),
    num_warps, num_stages, low_p (1: P and dS rounded to the inputs' dtype for their matmuls, the default for
    float16/bfloat16; 0: those matmuls in float32 from exact products)."""
    return _launch_overrides(_OVERRIDES, _OVERRIDE_KEYS, values, min_block=16, may_be_zero=("low_p",))


def _launch_params(dtype: torch.dtype, device: torch.device, D: int, Dv: int) -> dict[str, int]:
    if device.type == "cuda":
        if dtype.itemsize == 2:
            block = 64
        elif dtype.itemsize == 4:
            block = 32
        else:
            block = 16
        if max(D, Dv) > 128:
            block = max(16, block // 2)
        params = {"block_m": block, "block_n": block, "num_warps": 4, "num_stages": 2}
    else:  # the interpreter: fewer, larger blocks cost less Python per element
        params = {"block_m": 64, "block_n": 64, "num_warps": 1, "num_stages": 1}
    params["low_p"] = int(dtype.itemsize == 2)
    params.update(_OVERRIDES)
    return params


def _block_d(n: int) -> int:
    return max(16, _next_pow2(n))


def _key_mask_arg(key_mask: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(pointer tensor, has_mask); bool is read as uint8 (same bytes, no copy)."""
    if key_mask is None:
        return like, False
    return key_mask.contiguous().view(torch.uint8), True


def _bias_arg(bias: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """(pointer tensor with contiguous [Tq, Tk] planes, stride over B (0 if broadcast), over nh, has_bias)."""
    if bias is None:
        return like, 0, 0, False
    b = bias.contiguous()
    return b, (0 if b.shape[0] == 1 else b.stride(0)), (0 if b.shape[1] == 1 else b.stride(1)), True


if AVAILABLE:

    # Triton's interpreter multiplies bfloat16 blocks as their raw 16-bit integers in tl.dot: there the operands
    # go through float32 first (exact, and what the GPU's tensor cores compute: exact products, float32 sums).
    _BF16_DOT_IN_FP32 = tl.constexpr(_INTERPRETING)

    @triton.jit
    def _dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr):
        """a @ b accumulated in ACC."""
        if _BF16_DOT_IN_FP32 and a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)

    @triton.jit
    def _dot_p(p, x, ACC: tl.constexpr, PREC: tl.constexpr, LOW_P: tl.constexpr):
        """p @ x for p an ACC block (P or dS): p rounded to x's dtype first (LOW_P: flash attention's tensor-core
        matmul), or x taken up to ACC (exact products, float32 FMAs: slower on a GPU)."""
        if LOW_P:
            return _dot(_cast(p, x.dtype), x, ACC, PREC)
        else:
            return _dot(p, x.to(ACC), ACC, PREC)

    @triton.jit
    def _noise(seed, bh, rows, cols):
        """Standard normal numbers of the elements (bh, rows, cols) (same-shaped int blocks): Philox-4x32 keyed by
        the 64-bit seed with the counter (col, row, bh, 0) (unique for any size below 2^32 each), Box-Muller on
        its first two words (tl.randn's transform)."""
        c0 = cols.to(tl.uint32)
        c1 = rows.to(tl.uint32)
        c2 = (tl.zeros_like(c0) + bh).to(tl.uint32)
        i1, i2, _, _ = tl.philox(seed, c0, c1, c2, tl.zeros_like(c0))
        n1, _ = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(i1),
                                                 tl.random.uint_to_uniform_float(i2))
        return n1

    @triton.jit
    def _dropout_mult(dseed, dp, dscale, bh64, offs_m, offs_n, ACC: tl.constexpr):
        """Attention dropout's multipliers of a block: 1 / (1 - p) (dscale, in ACC) where a uniform from Philox-4x32
        keyed by the dropout seed with the counter (col, row, bh, 1) is >= p, else 0; the forward and both
        backward kernels regenerate the same mask (the counter's last word keeps it apart from RP's noise)."""
        c0 = (offs_n[None, :] + 0 * offs_m[:, None]).to(tl.uint32)
        c1 = (offs_m[:, None] + 0 * offs_n[None, :]).to(tl.uint32)
        c2 = (tl.zeros_like(c0) + bh64).to(tl.uint32)
        i1, _, _, _ = tl.philox(dseed, c0, c1, c2, tl.zeros_like(c0) + 1)
        keep = tl.random.uint_to_uniform_float(i1) >= dp
        return tl.where(keep, dscale, tl.zeros([], ACC))

    @triton.jit
    def _load_rows(ptr, bh64, offs_r, R, offs_c, C):
        """Rows offs_r, columns offs_c of the [R, C] slice bh64 of a contiguous [.., R, C] tensor (0 outside)."""
        mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
        return tl.load(ptr + (bh64 * R + offs_r[:, None]) * C + offs_c[None, :], mask=mask, other=0)

    @triton.jit
    def _mask_scores(s, km_ptr, bias_ptr, b64, h64, offs_m, offs_n, Tq, Tk, sb0, sb1,
                     CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, HAS_BIAS: tl.constexpr):
        """(s + bias, allowed) of one block: allowed = in bounds, a real key, j <= i if causal, bias != -inf.
        Nothing is loaded where the entry is not allowed."""
        in_n = offs_n < Tk
        allowed = (offs_m[:, None] < Tq) & in_n[None, :]
        if HAS_KM:
            km = tl.load(km_ptr + b64 * Tk + offs_n, mask=in_n, other=0)
            allowed = allowed & (km[None, :] != 0)
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        if HAS_BIAS:
            bv = tl.load(bias_ptr + b64 * sb0 + h64 * sb1 + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :],
                         mask=allowed, other=0).to(s.dtype)
            allowed = allowed & (bv != float("-inf"))
            s = s + bv
        return s, allowed

    @triton.jit
    def _direction(allowed, dense_ptr, seed, cq_ptr, ck_ptr, cv_ptr, co_ptr, cdo_ptr, clse_ptr, cbias_ptr, km_ptr,
                   b64, h64, bh64, offs_m, offs_n, offs_d, offs_dv, Tq, Tk, D, Dv, scale, cb0, cb1,
                   cdseed, cdp, cdscale,
                   KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, HAS_CBIAS: tl.constexpr,
                   CDROPOUT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
        """X [BLOCK_M, BLOCK_N] of the perturbation r = coef X (KIND 1, 2 or 3), zero where not allowed."""
        if KIND == 1:
            x = tl.load(dense_ptr + (bh64 * Tq + offs_m[:, None]) * Tk + offs_n[None, :], mask=allowed,
                        other=0).to(ACC)
        elif KIND == 2:
            x = _noise(seed, bh64, offs_m[:, None] + 0 * offs_n[None, :], offs_n[None, :] + 0 * offs_m[:, None])
            x = x.to(ACC)
        else:
            cq = _load_rows(cq_ptr, bh64, offs_m, Tq, offs_d, D)
            ck = _load_rows(ck_ptr, bh64, offs_n, Tk, offs_d, D)
            sc = _dot(cq, tl.trans(ck), ACC, PREC) * scale
            sc, callowed = _mask_scores(sc, km_ptr, cbias_ptr, b64, h64, offs_m, offs_n, Tq, Tk, cb0, cb1,
                                        CAUSAL, HAS_KM, HAS_CBIAS)
            clse = tl.load(clse_ptr + bh64 * Tq + offs_m, mask=offs_m < Tq, other=float("inf")).to(ACC)
            pc = tl.where(callowed, tl.exp(sc - clse[:, None]), 0.0)
            cdo = _load_rows(cdo_ptr, bh64, offs_m, Tq, offs_dv, Dv)
            dc = tl.load(co_ptr + bh64 * Tq + offs_m, mask=offs_m < Tq, other=0).to(ACC)  # rowsum(dO_c * O_c)
            cv = _load_rows(cv_ptr, bh64, offs_n, Tk, offs_dv, Dv)
            dpc = _dot(cdo, tl.trans(cv), ACC, PREC)
            if CDROPOUT:  # the clean call's dropout: G = P_c ((dO_c V_c^T) M_c - delta)
                dpc = dpc * _dropout_mult(cdseed, cdp, cdscale, bh64, offs_m, offs_n, ACC)
            x = pc * (dpc - dc[:, None])
        return tl.where(allowed, x, 0.0)

    @triton.jit
    def _scores_block(q, k, km_ptr, bias_ptr, coef, dense_ptr, seed, cq_ptr, ck_ptr, cv_ptr, co_ptr, cdo_ptr,
                      clse_ptr, cbias_ptr, b64, h64, bh64, offs_m, offs_n, offs_d, offs_dv, Tq, Tk, D, Dv, scale,
                      sb0, sb1, cb0, cb1, cdseed, cdp, cdscale, KIND: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_KM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CBIAS: tl.constexpr,
                      CDROPOUT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
        """(S + r with -inf where not allowed, allowed, S before r) of one [BLOCK_M, BLOCK_N] block."""
        s = _dot(q, tl.trans(k), ACC, PREC) * scale
        s, allowed = _mask_scores(s, km_ptr, bias_ptr, b64, h64, offs_m, offs_n, Tq, Tk, sb0, sb1,
                                  CAUSAL, HAS_KM, HAS_BIAS)
        clean = s
        if KIND != 0:
            x = _direction(allowed, dense_ptr, seed, cq_ptr, ck_ptr, cv_ptr, co_ptr, cdo_ptr, clse_ptr, cbias_ptr,
                           km_ptr, b64, h64, bh64, offs_m, offs_n, offs_d, offs_dv, Tq, Tk, D, Dv, scale, cb0, cb1,
                           cdseed, cdp, cdscale, KIND, CAUSAL, HAS_KM, HAS_CBIAS, CDROPOUT, ACC, PREC)
            s = s + coef[:, None] * x
        return tl.where(allowed, s, float("-inf")), allowed, clean

    @triton.jit
    def _program_ids(H, BLOCK: tl.constexpr):
        """(b, h, b * H + h) as int64 of this program's example x head (axis 0), and the rows of its block of
        BLOCK queries or keys (axis 1)."""
        bh = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        return (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh.to(tl.int64), offs

    @triton.jit
    def _program(H, scale_hi, scale_lo, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
        """_program_ids, the offsets along d and dv, and the scale in ACC."""
        b64, h64, bh64, offs = _program_ids(H, BLOCK)
        return b64, h64, bh64, offs, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), _eps(scale_hi, scale_lo, ACC)

    @triton.jit
    def _row_coef(coef_ptr, bh64, offs_m, Tq, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
        """coef of the rows offs_m (0 outside, and without a perturbation)."""
        coef = tl.zeros([BLOCK_M], ACC)
        if KIND != 0:
            coef = tl.load(coef_ptr + bh64 * Tq + offs_m, mask=offs_m < Tq, other=0).to(ACC)
        return coef

    @triton.jit
    def _key_end(Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
        """The end of the keys this program's block of queries (axis 1) sees: with causal, up to its last query."""
        jend = Tk
        if CAUSAL:
            jend = tl.minimum(Tk, (tl.program_id(1) + 1) * BLOCK_M)
        return jend

    @triton.jit
    def _row_stats(lse_ptr, delta_ptr, bh64, offs_m, Tq):
        """(lse, delta = rowsum(dO * O)) of the rows offs_m (+inf and 0 outside)."""
        in_m = offs_m < Tq
        lse = tl.load(lse_ptr + bh64 * Tq + offs_m, mask=in_m, other=float("inf"))
        return lse, tl.load(delta_ptr + bh64 * Tq + offs_m, mask=in_m, other=0)

    @triton.jit
    def _p_ds(s, allowed, lse, delta, do, v, mult, ACC: tl.constexpr, PREC: tl.constexpr, DROPOUT: tl.constexpr):
        """(P recomputed from the lse, times the dropout multipliers `mult` with DROPOUT: the P that reached O;
        dS = P ((dO V^T) mult - delta)) of one block, 0 where not allowed."""
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), ACC, PREC)
        if DROPOUT:
            dp = dp * mult
        ds = tl.where(allowed, p * (dp - delta[:, None]), 0.0)
        if DROPOUT:
            p = p * mult
        return p, ds

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, km_ptr, bias_ptr, coef_ptr, dense_ptr, cq_ptr, ck_ptr, cv_ptr, co_ptr,
                    cdo_ptr, clse_ptr, cbias_ptr, out_ptr, lse_ptr, flag_ptr, seed, scale_hi, scale_lo,
                    H, Tq, Tk, D, Dv, sb0, sb1, cb0, cb1, dseed, dp, dscale_hi, dscale_lo, cdseed, cdp, cdscale_hi,
                    cdscale_lo,
                    KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_CBIAS: tl.constexpr, DROPOUT: tl.constexpr, CDROPOUT: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr, LOW_P: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        b64, h64, bh64, offs_m, offs_d, offs_dv, scale = _program(H, scale_hi, scale_lo, ACC, BLOCK_M, BLOCK_D,
                                                                  BLOCK_DV)
        in_m = offs_m < Tq
        dscale, cdscale = _eps(dscale_hi, dscale_lo, ACC), _eps(cdscale_hi, cdscale_lo, ACC)
        q = _load_rows(q_ptr, bh64, offs_m, Tq, offs_d, D)
        coef = _row_coef(coef_ptr, bh64, offs_m, Tq, KIND, ACC, BLOCK_M)
        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_M], ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
        bad = tl.zeros([], tl.int32)
        for j0 in range(0, _key_end(Tk, CAUSAL, BLOCK_M), BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            k = _load_rows(k_ptr, bh64, offs_n, Tk, offs_d, D)
            s, allowed, clean = _scores_block(
                q, k, km_ptr, bias_ptr, coef, dense_ptr, seed, cq_ptr, ck_ptr, cv_ptr, co_ptr, cdo_ptr, clse_ptr,
                cbias_ptr, b64, h64, bh64, offs_m, offs_n, offs_d, offs_dv, Tq, Tk, D, Dv, scale, sb0, sb1, cb0,
                cb1, cdseed, cdp, cdscale, KIND, CAUSAL, HAS_KM, HAS_BIAS, HAS_CBIAS, CDROPOUT, ACC, PREC)
            nonfinite = allowed & ((clean != clean) | (tl.abs(clean) == float("inf")))
            bad = tl.maximum(bad, tl.max(tl.max(tl.where(nonfinite, 1, 0), 1), 0))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.where(allowed, tl.exp(s - m_safe[:, None]), 0.0)
            alpha = tl.exp(m_i - m_safe)  # 0 while the row has seen no allowed key (m_i = -inf)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:  # the normaliser sums kept and dropped entries; only O sees the mask
                p = p * _dropout_mult(dseed, dp, dscale, bh64, offs_m, offs_n, ACC)
            v = _load_rows(v_ptr, bh64, offs_n, Tk, offs_dv, Dv)
            acc = acc * alpha[:, None] + _dot_p(p, v, ACC, PREC, LOW_P)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        out_mask = in_m[:, None] & (offs_dv[None, :] < Dv)
        tl.store(out_ptr + (bh64 * Tq + offs_m[:, None]) * Dv + offs_dv[None, :],
                 _cast(out, out_ptr.dtype.element_ty), mask=out_mask)
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
        tl.store(lse_ptr + bh64 * Tq + offs_m, lse, mask=in_m)
        tl.store(flag_ptr + bh64 * tl.num_programs(1) + tl.program_id(1), bad)

    @triton.jit
    def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, km_ptr, bias_ptr, coef_ptr, dense_ptr,
                         cq_ptr, ck_ptr, cv_ptr, co_ptr, cdo_ptr, clse_ptr, cbias_ptr, dk_ptr, dv_ptr,
                         seed, scale_hi, scale_lo, H, Tq, Tk, D, Dv, sb0, sb1, cb0, cb1, dseed, dp, dscale_hi,
                         dscale_lo, cdseed, cdp, cdscale_hi, cdscale_lo,
                         KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_CBIAS: tl.constexpr, DROPOUT: tl.constexpr, CDROPOUT: tl.constexpr,
                         ACC: tl.constexpr, PREC: tl.constexpr, LOW_P: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr):
        b64, h64, bh64, offs_n, offs_d, offs_dv, scale = _program(H, scale_hi, scale_lo, ACC, BLOCK_N, BLOCK_D,
                                                                  BLOCK_DV)
        dscale, cdscale = _eps(dscale_hi, dscale_lo, ACC), _eps(cdscale_hi, cdscale_lo, ACC)
        k = _load_rows(k_ptr, bh64, offs_n, Tk, offs_d, D)
        v = _load_rows(v_ptr, bh64, offs_n, Tk, offs_dv, Dv)
        dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
        lo = 0
        if CAUSAL:
            lo = (tl.program_id(1) * BLOCK_N // BLOCK_M) * BLOCK_M  # queries i >= the block's first key
        for i0 in range(lo, Tq, BLOCK_M):
            offs_m = i0 + tl.arange(0, BLOCK_M)
            q = _load_rows(q_ptr, bh64, offs_m, Tq, offs_d, D)
            do = _load_rows(do_ptr, bh64, offs_m, Tq, offs_dv, Dv)
            lse, delta = _row_stats(lse_ptr, delta_ptr, bh64, offs_m, Tq)
            coef = _row_coef(coef_ptr, bh64, offs_m, Tq, KIND, ACC, BLOCK_M)
            s, allowed, _ = _scores_block(
                q, k, km_ptr, bias_ptr, coef, dense_ptr, seed, cq_ptr, ck_ptr, cv_ptr, co_ptr, cdo_ptr, clse_ptr,
                cbias_ptr, b64, h64, bh64, offs_m, offs_n, offs_d, offs_dv, Tq, Tk, D, Dv, scale, sb0, sb1, cb0,
                cb1, cdseed, cdp, cdscale, KIND, CAUSAL, HAS_KM, HAS_BIAS, HAS_CBIAS, CDROPOUT, ACC, PREC)
            mult = dscale
            if DROPOUT:
                mult = _dropout_mult(dseed, dp, dscale, bh64, offs_m, offs_n, ACC)
            p, ds = _p_ds(s, allowed, lse, delta, do, v, mult, ACC, PREC, DROPOUT)
            dv += _dot_p(tl.trans(p), do, ACC, PREC, LOW_P)
            dk += _dot_p(tl.trans(ds), q, ACC, PREC, LOW_P)
        in_n = offs_n < Tk
        tl.store(dk_ptr + (bh64 * Tk + offs_n[:, None]) * D + offs_d[None, :],
                 _cast(dk * scale, dk_ptr.dtype.element_ty), mask=in_n[:, None] & (offs_d[None, :] < D))
        tl.store(dv_ptr + (bh64 * Tk + offs_n[:, None]) * Dv + offs_dv[None, :],
                 _cast(dv, dv_ptr.dtype.element_ty), mask=in_n[:, None] & (offs_dv[None, :] < Dv))

    @triton.jit
    def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, km_ptr, bias_ptr, coef_ptr, dense_ptr,
                       cq_ptr, ck_ptr, cv_ptr, co_ptr, cdo_ptr, clse_ptr, cbias_ptr, dq_ptr, gsq_ptr, dbias_ptr,
                       seed, scale_hi, scale_lo, H, Tq, Tk, D, Dv, sb0, sb1, cb0, cb1, dseed, dp, dscale_hi,
                       dscale_lo, cdseed, cdp, cdscale_hi, cdscale_lo,
                       KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_CBIAS: tl.constexpr, DROPOUT: tl.constexpr, CDROPOUT: tl.constexpr,
                       BIAS_GRAD: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       LOW_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr):
        b64, h64, bh64, offs_m, offs_d, offs_dv, scale = _program(H, scale_hi, scale_lo, ACC, BLOCK_M, BLOCK_D,
                                                                  BLOCK_DV)
        in_m = offs_m < Tq
        dscale, cdscale = _eps(dscale_hi, dscale_lo, ACC), _eps(cdscale_hi, cdscale_lo, ACC)
        q = _load_rows(q_ptr, bh64, offs_m, Tq, offs_d, D)
        do = _load_rows(do_ptr, bh64, offs_m, Tq, offs_dv, Dv)
        lse, delta = _row_stats(lse_ptr, delta_ptr, bh64, offs_m, Tq)
        coef = _row_coef(coef_ptr, bh64, offs_m, Tq, KIND, ACC, BLOCK_M)
        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        gsq = tl.zeros([BLOCK_M], ACC)
        for j0 in range(0, _key_end(Tk, CAUSAL, BLOCK_M), BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            k = _load_rows(k_ptr, bh64, offs_n, Tk, offs_d, D)
            v = _load_rows(v_ptr, bh64, offs_n, Tk, offs_dv, Dv)
            s, allowed, _ = _scores_block(
                q, k, km_ptr, bias_ptr, coef, dense_ptr, seed, cq_ptr, ck_ptr, cv_ptr, co_ptr, cdo_ptr, clse_ptr,
                cbias_ptr, b64, h64, bh64, offs_m, offs_n, offs_d, offs_dv, Tq, Tk, D, Dv, scale, sb0, sb1, cb0,
                cb1, cdseed, cdp, cdscale, KIND, CAUSAL, HAS_KM, HAS_BIAS, HAS_CBIAS, CDROPOUT, ACC, PREC)
            mult = dscale
            if DROPOUT:
                mult = _dropout_mult(dseed, dp, dscale, bh64, offs_m, offs_n, ACC)
            _, ds = _p_ds(s, allowed, lse, delta, do, v, mult, ACC, PREC, DROPOUT)
            gsq += tl.sum(ds * ds, 1)
            if BIAS_GRAD:
                tl.store(dbias_ptr + (bh64 * Tq + offs_m[:, None]) * Tk + offs_n[None, :], ds,
                         mask=in_m[:, None] & (offs_n[None, :] < Tk))
            dq += _dot_p(ds, k, ACC, PREC, LOW_P)
        tl.store(dq_ptr + (bh64 * Tq + offs_m[:, None]) * D + offs_d[None, :],
                 _cast(dq * scale, dq_ptr.dtype.element_ty), mask=in_m[:, None] & (offs_d[None, :] < D))
        tl.store(gsq_ptr + bh64 * Tq + offs_m, gsq, mask=in_m)

    @triton.jit
    def _rowsq_kernel(km_ptr, bias_ptr, dense_ptr, rows_ptr, seed, H, Tq, Tk, sb0, sb1,
                      KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        b64, h64, bh64, offs_m = _program_ids(H, BLOCK_M)
        rows = tl.zeros([BLOCK_M], ACC)
        for j0 in range(0, Tk, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            _, allowed = _mask_scores(tl.zeros([BLOCK_M, BLOCK_N], ACC), km_ptr, bias_ptr, b64, h64, offs_m,
                                      offs_n, Tq, Tk, sb0, sb1, CAUSAL, HAS_KM, HAS_BIAS)
            if KIND == 1:
                x = tl.load(dense_ptr + (bh64 * Tq + offs_m[:, None]) * Tk + offs_n[None, :], mask=allowed,
                            other=0).to(ACC)
            else:
                x = _noise(seed, bh64, offs_m[:, None] + 0 * offs_n[None, :],
                           offs_n[None, :] + 0 * offs_m[:, None]).to(ACC)
            rows += tl.sum(tl.where(allowed, x * x, 0.0), 1)
        tl.store(rows_ptr + bh64 * Tq + offs_m, rows, mask=offs_m < Tq)

    @triton.jit
    def _dropout_mask_kernel(out_ptr, dseed, dp, dscale_hi, dscale_lo, Tq, Tk, ACC: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh64 = tl.program_id(0).to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        z = _dropout_mult(dseed, dp, _eps(dscale_hi, dscale_lo, ACC), bh64, offs_m, offs_n, ACC)
        tl.store(out_ptr + (bh64 * Tq + offs_m[:, None]) * Tk + offs_n[None, :], z,
                 mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))

    @triton.jit
    def _rp_noise_kernel(out_ptr, seed, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh64 = tl.program_id(0).to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        z = _noise(seed, bh64, offs_m[:, None] + 0 * offs_n[None, :], offs_n[None, :] + 0 * offs_m[:, None])
        tl.store(out_ptr + (bh64 * Tq + offs_m[:, None]) * Tk + offs_n[None, :], z,
                 mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


# -------------------------------------------------------------------------------------------- launchers


def _prec(dtype: torch.dtype) -> str:
    return "ieee"  # float32 without TF32; half precision and float64 ignore it


def _pert_args(q, kind, coef, dense, cq, ck, cv, co, cdo, clse, cbias):
    """The perturbation's kernel arguments: (tensors..., cb0, cb1, has_cbias), with placeholders where unused."""
    acc = _acc_dtype(q.dtype)
    coef_t = coef.to(acc).contiguous() if coef is not None else q
    dense_t = dense.contiguous() if dense is not None and kind == KIND_DENSE else q
    if kind == KIND_CLEAN:
        cq, ck, cv, cdo = (x.to(q.dtype).contiguous() for x in (cq, ck, cv, cdo))
        co = _row_dot(cdo, co, acc)
        clse = clse.to(acc).contiguous()
        cb, cb0, cb1, has_cbias = _bias_arg(cbias, q)
    else:
        cq = ck = cv = co = cdo = clse = cb = q
        cb0 = cb1 = 0
        has_cbias = False
    return (coef_t, dense_t, cq, ck, cv, co, cdo, clse, cb), (cb0, cb1, has_cbias)


def _row_dot(dout: torch.Tensor, out: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """delta = rowsum(dO * O) [B, nh, Tq] in `acc`; `out` may already be that delta (what a record keeps)."""
    if out.dim() == 3:
        return out.to(acc).contiguous()
    return (dout.to(acc) * out.to(acc)).sum(-1).contiguous()


def _check_kind(kind, coef, dense, clean) -> None:
    if kind not in (KIND_NONE, KIND_DENSE, KIND_HASH, KIND_CLEAN):
        raise ValueError(f"kind must be 0 (none), 1 (dense direction), 2 (hashed noise) or 3 (clean-pass G), "
                         f"got {kind}")
    if kind != KIND_NONE and coef is None:
        raise ValueError(f"kind {kind} needs coef [B, nh, Tq]")
    if kind == KIND_DENSE and dense is None:
        raise ValueError("kind 1 needs dense [B, nh, Tq, Tk]")
    if kind == KIND_CLEAN and any(x is None for x in clean[:6]):
        raise ValueError("kind 3 needs the clean pass's cq, ck, cv, co, cdo and clse")


def _raise_if_nonfinite(flags: torch.Tensor) -> None:
    """As triton_attention_pool._raise_if_nonfinite: a ValueError in eager on CPU tensors (the interpreter), a
    device-side assertion otherwise (CUDA, or while torch.compile traces the op)."""
    if flags.device.type == "cpu" and _is_eager_tensor(flags):
        if bool(flags.any()):
            raise ValueError(_SCORES_MESSAGE)
        return
    torch._assert_async(flags.eq(0).all(), _SCORES_MESSAGE)


def _dropout_args(dropout_p, dropout_seed, cdropout_p, cdropout_seed, kind):
    """The kernels' dropout scalars (seed, p, 1 / (1 - p) as two float32 parts) of the call and of the clean call
    (kind 3 only), and their DROPOUT / CDROPOUT flags."""
    def one(p, seed):
        if not 0 <= p < 1:
            raise ValueError(f"dropout_p must be in [0, 1), got {p}")
        return (int(seed), float(p), *_eps_parts(1.0 / (1.0 - p)))
    cp = cdropout_p if kind == KIND_CLEAN else 0.0
    return (*one(dropout_p, dropout_seed), *one(cp, cdropout_seed)), dict(DROPOUT=dropout_p > 0, CDROPOUT=cp > 0)


def _forward(q, k, v, key_mask, bias, causal, scale, kind, coef, dense, seed, cq, ck, cv, co, cdo, clse, cbias,
             dropout_p=0.0, dropout_seed=0, cdropout_p=0.0, cdropout_seed=0):
    clean = (cq, ck, cv, co, cdo, clse, cbias)
    drop, drop_flags = _dropout_args(dropout_p, dropout_seed, cdropout_p, cdropout_seed, kind)
    _check_kind(kind, coef, dense, clean)
    B, H, Tq, D = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    acc = _acc_dtype(q.dtype)
    out = torch.empty((B, H, Tq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=acc, device=q.device)
    if _skip_launch(q) or B * H * Tq == 0:
        return out, lse
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    p = _launch_params(q.dtype, q.device, D, Dv)
    km, has_km = _key_mask_arg(key_mask, q)
    b, sb0, sb1, has_bias = _bias_arg(bias, q)
    tensors, (cb0, cb1, has_cbias) = _pert_args(q, kind, coef, dense, cq, ck, cv, co, cdo, clse, cbias)
    grid = (B * H, triton.cdiv(Tq, p["block_m"]))
    flags = torch.zeros(grid, dtype=torch.int32, device=q.device)
    torch.library.wrap_triton(_fwd_kernel)[grid](
        q, k, v, km, b, *tensors, out, lse, flags, int(seed), *_eps_parts(scale), H, Tq, Tk, D, Dv, sb0, sb1,
        cb0, cb1, *drop, **drop_flags, KIND=kind, CAUSAL=causal, HAS_KM=has_km, HAS_BIAS=has_bias,
        HAS_CBIAS=has_cbias,
        ACC=_TL_ACC[acc], PREC=_prec(q.dtype), LOW_P=bool(p["low_p"]), BLOCK_M=p["block_m"], BLOCK_N=p["block_n"],
        BLOCK_D=_block_d(D),
        BLOCK_DV=_block_d(Dv), num_warps=p["num_warps"], num_stages=p["num_stages"])
    _raise_if_nonfinite(flags)
    return out, lse


def _backward(dout, q, k, v, out, lse, key_mask, bias, causal, scale, bias_grad, kind, coef, dense, seed, cq, ck,
              cv, co, cdo, clse, cbias, dropout_p=0.0, dropout_seed=0, cdropout_p=0.0, cdropout_seed=0):
    clean = (cq, ck, cv, co, cdo, clse, cbias)
    drop, drop_flags = _dropout_args(dropout_p, dropout_seed, cdropout_p, cdropout_seed, kind)
    _check_kind(kind, coef, dense, clean)
    if bias_grad and bias is None:
        raise ValueError("bias_grad=True needs a bias")
    B, H, Tq, D = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    acc = _acc_dtype(q.dtype)
    dq = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Tk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, Tk, Dv), dtype=v.dtype, device=q.device)
    gsq = torch.empty((B, H, Tq), dtype=acc, device=q.device)
    dbias_full = torch.zeros((B, H, Tq, Tk) if bias_grad else (0,), dtype=acc, device=q.device)
    if _skip_launch(q):
        dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty((0,))
        return dq, dk, dv, dbias, gsq
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    lse = lse.to(acc).contiguous()
    delta = _row_dot(dout, out, acc)  # rowsum(dO * O), [B, nh, Tq] (or `out` itself when it is that)
    p = _launch_params(q.dtype, q.device, D, Dv)
    km, has_km = _key_mask_arg(key_mask, q)
    b, sb0, sb1, has_bias = _bias_arg(bias, q)
    tensors, (cb0, cb1, has_cbias) = _pert_args(q, kind, coef, dense, cq, ck, cv, co, cdo, clse, cbias)
    common = dict(KIND=kind, CAUSAL=causal, HAS_KM=has_km, HAS_BIAS=has_bias, HAS_CBIAS=has_cbias, **drop_flags,
                  ACC=_TL_ACC[acc], PREC=_prec(q.dtype), LOW_P=bool(p["low_p"]), BLOCK_M=p["block_m"],
                  BLOCK_N=p["block_n"],
                  BLOCK_D=_block_d(D), BLOCK_DV=_block_d(Dv), num_warps=p["num_warps"], num_stages=p["num_stages"])
    sizes = (int(seed), *_eps_parts(scale), H, Tq, Tk, D, Dv, sb0, sb1, cb0, cb1, *drop)
    if B * H * Tk:
        if Tq:
            torch.library.wrap_triton(_bwd_dkdv_kernel)[(B * H, triton.cdiv(Tk, p["block_n"]))](
                q, k, v, dout, lse, delta, km, b, *tensors, dk, dv, *sizes, **common)
        else:
            dk.zero_()
            dv.zero_()
    if B * H * Tq:
        torch.library.wrap_triton(_bwd_dq_kernel)[(B * H, triton.cdiv(Tq, p["block_m"]))](
            q, k, v, dout, lse, delta, km, b, *tensors, dq, gsq, dbias_full if bias_grad else q, *sizes,
            BIAS_GRAD=bias_grad, **common)
    if bias_grad:
        dims = [i for i in (0, 1) if bias.shape[i] == 1 and dbias_full.shape[i] != 1]
        dbias = (dbias_full.sum(dims, keepdim=True) if dims else dbias_full).to(bias.dtype)
    else:
        dbias = q.new_empty((0,))
    return dq, dk, dv, dbias, gsq


def _rowsq(q, k, key_mask, bias, causal, dense, seed):
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    rows = torch.empty((B, H, Tq), dtype=acc, device=q.device)
    if _skip_launch(q) or rows.numel() == 0:
        return rows
    p = _launch_params(q.dtype, q.device, q.shape[3], 0)
    km, has_km = _key_mask_arg(key_mask, q)
    b, sb0, sb1, has_bias = _bias_arg(bias, q)
    d = dense.contiguous() if dense is not None else q
    torch.library.wrap_triton(_rowsq_kernel)[(B * H, triton.cdiv(Tq, p["block_m"]))](
        km, b, d, rows, int(seed), H, Tq, Tk, sb0, sb1, KIND=KIND_DENSE if dense is not None else KIND_HASH,
        CAUSAL=causal, HAS_KM=has_km, HAS_BIAS=has_bias, ACC=_TL_ACC[acc], BLOCK_M=p["block_m"],
        BLOCK_N=p["block_n"], num_warps=p["num_warps"])
    return rows


def _dropout_mask(q, k, dropout_p, dropout_seed):
    B, H, Tq, _ = q.shape
    acc = _acc_dtype(q.dtype)
    z = torch.ones((B, H, Tq, k.shape[2]), dtype=acc, device=q.device)
    dseed, p, *scale = _dropout_args(dropout_p, dropout_seed, 0.0, 0, KIND_NONE)[0][:4]
    if not _skip_launch(q) and z.numel() and dropout_p > 0:
        bm, bn = 32, 128
        grid = (B * H, triton.cdiv(Tq, bm), triton.cdiv(k.shape[2], bn))
        torch.library.wrap_triton(_dropout_mask_kernel)[grid](z, dseed, p, *scale, Tq, k.shape[2],
                                                              ACC=_TL_ACC[acc], BLOCK_M=bm, BLOCK_N=bn)
    return z


def _rp_noise(q, k, seed):
    B, H, Tq, _ = q.shape
    z = torch.empty((B, H, Tq, k.shape[2]), dtype=torch.float32, device=q.device)
    if not _skip_launch(q) and z.numel():
        bm, bn = 32, 128
        grid = (B * H, triton.cdiv(Tq, bm), triton.cdiv(k.shape[2], bn))
        torch.library.wrap_triton(_rp_noise_kernel)[grid](z, int(seed), Tq, k.shape[2], BLOCK_M=bm, BLOCK_N=bn)
    return z.to(_acc_dtype(q.dtype))


# -------------------------------------------------------------------------------------- torch.library ops


if AVAILABLE:

    @_define_op("sa_fwd")
    def sa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], causal: bool, scale: float, kind: int, coef: Optional[torch.Tensor],
               dense: Optional[torch.Tensor], seed: int, cq: Optional[torch.Tensor], ck: Optional[torch.Tensor],
               cv: Optional[torch.Tensor], co: Optional[torch.Tensor], cdo: Optional[torch.Tensor],
               clse: Optional[torch.Tensor], cbias: Optional[torch.Tensor], dropout_p: float = 0.0,
               dropout_seed: int = 0, cdropout_p: float = 0.0, cdropout_seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [B, nh, Tq, dv] in q's dtype, lse [B, nh, Tq] in the accumulation dtype)."""
        with _device_guard(q.device):
            return _forward(q, k, v, key_mask, bias, causal, scale, kind, coef, dense, seed, cq, ck, cv, co, cdo,
                            clse, cbias, dropout_p, dropout_seed, cdropout_p, cdropout_seed)

    @_define_op("sa_bwd")
    def sa_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, key_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], causal: bool,
               scale: float, bias_grad: bool, kind: int, coef: Optional[torch.Tensor],
               dense: Optional[torch.Tensor], seed: int, cq: Optional[torch.Tensor], ck: Optional[torch.Tensor],
               cv: Optional[torch.Tensor], co: Optional[torch.Tensor], cdo: Optional[torch.Tensor],
               clse: Optional[torch.Tensor], cbias: Optional[torch.Tensor], dropout_p: float = 0.0,
               dropout_seed: int = 0, cdropout_p: float = 0.0, cdropout_seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv, dbias (bias's shape, or [0] without bias_grad), gsq [B, nh, Tq] = sum_j dS^2); `out` may
        be O [B, nh, Tq, dv] or rowsum(dout * O) [B, nh, Tq]."""
        with _device_guard(q.device):
            return _backward(dout, q, k, v, out, lse, key_mask, bias, causal, scale, bias_grad, kind, coef, dense,
                             seed, cq, ck, cv, co, cdo, clse, cbias, dropout_p, dropout_seed, cdropout_p,
                             cdropout_seed)

    @_define_op("sa_rowsq")
    def sa_rowsq(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 causal: bool, dense: Optional[torch.Tensor], seed: int) -> torch.Tensor:
        """sum over the allowed keys of X^2 [B, nh, Tq] (X = dense, or the in-kernel noise of `seed`)."""
        with _device_guard(q.device):
            return _rowsq(q, k, key_mask, bias, causal, dense, seed)

    @_define_op("sa_dropout_mask")
    def sa_dropout_mask(q: torch.Tensor, k: torch.Tensor, dropout_p: float, dropout_seed: int) -> torch.Tensor:
        """The dropout multipliers [B, nh, Tq, Tk] (0 or 1 / (1 - p)) the kernels generate from `dropout_seed`
        (float32, float64 for float64 q)."""
        with _device_guard(q.device):
            return _dropout_mask(q, k, dropout_p, dropout_seed)

    @_define_op("sa_rp_noise")
    def sa_rp_noise(q: torch.Tensor, k: torch.Tensor, seed: int) -> torch.Tensor:
        """The noise [B, nh, Tq, Tk] the kernels generate from `seed` (float32, float64 for float64 q)."""
        with _device_guard(q.device):
            return _rp_noise(q, k, seed)

    _sa_fwd_backward, _sa_fwd_setup = sa_fwd_autograd(sa_bwd)
    sa_fwd.register_autograd(_sa_fwd_backward, setup_context=_sa_fwd_setup)
    register_no_second_derivative(sa_bwd)
    for _op in (sa_rowsq, sa_rp_noise, sa_dropout_mask):
        register_not_differentiable(_op)


def why_unavailable(device: torch.device) -> str | None:
    """None when the triton backend can run tensors on `device`, else why not (the reasons of _backend.py)."""
    from .._backend import why_unavailable as backend_why_unavailable

    return backend_why_unavailable("triton", device)


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"the triton self-attention backend is not available: {UNAVAILABLE_REASON}")


# ---------------------------------------------------------------------------------------------------------
# The clean pass of an AT step


class TritonCleanPass(FusedCleanPass):
    """CleanPassRecord.fused of a clean call of this backend: the cpu backend's FusedCleanPass (clean Q, K, V, O,
    log-sum-exp, bias, masks; after the backward dO, rowsum(dO * O) and G's squared row norms, O dropped), with
    the norms recomputed by these ops."""

    __slots__ = ()

    @staticmethod
    def _sa_bwd(*args):
        return sa_bwd(*args)

    @staticmethod
    def _dropout_mask(q, k, dropout_p, dropout_seed):
        return dropout_mask(q, k, dropout_p, dropout_seed)


_CleanPass = clean_pass_function(lambda *a: sa_fwd(*a), lambda *a: sa_bwd(*a), TritonCleanPass)


# ---------------------------------------------------------------------------------------------------------
# The backend-module calls of fused_attn_at.self_attention

_TRITON = FusedBackend("triton", lambda *a: sa_fwd(*a), lambda *a: sa_rowsq(*a), lambda *a: _CleanPass.apply(*a),
                       lambda dtype: dtype, _require)


def perturbed_attention(q, k, v, key_mask, causal, bias, scale, kind, grad, noise, eps, norm, attn_mask, query_mask,
                        dropout_p, generator, record, iat_max_bytes):
    """(O [B, nh, Tq, dv], None); `grad` is a tensor G or the CleanPassRecord of the same layer's clean call."""
    return run_fused(_TRITON, q, k, v, key_mask, causal, bias, scale, kind, grad, noise, eps, norm, attn_mask,
                     query_mask, dropout_p, generator, record, iat_max_bytes)


def rp_noise(q: torch.Tensor, k: torch.Tensor, seed: int) -> torch.Tensor:
    """The standard normal noise [B, nh, Tq, Tk] the kernels generate from `seed` (materialised: for tests)."""
    _require()
    return sa_rp_noise(q, k, int(seed))


def dropout_mask(q: torch.Tensor, k: torch.Tensor, dropout_p: float, dropout_seed: int) -> torch.Tensor:
    """The attention-dropout multipliers [B, nh, Tq, Tk] the kernels generate from `dropout_seed` (for tests)."""
    _require()
    return sa_dropout_mask(q, k, float(dropout_p), int(dropout_seed))
