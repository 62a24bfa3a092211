"""The "cpu" backend of fused_attn_at.perturbed_attention: flash-style C++ kernels (csrc/self_attention/), made
differentiable and traceable here.

Loading fused_attn_at._C registers (schemas in csrc/self_attention/self_attention_cpu.cpp):
    torch.ops.fused_attn_at.sa_fwd(q, k, v, key_mask?, bias?, causal, scale, kind, coef?, dense?, seed,
        cq?, ck?, cv?, co?, cdo?, clse?, cbias?, dropout_p=0, dropout_seed=0, cdropout_p=0, cdropout_seed=0)
        -> (out [B, nh, Tq, dv], lse [B, nh, Tq])
    torch.ops.fused_attn_at.sa_bwd(dout, q, k, v, out, lse, key_mask?, bias?, causal, scale, bias_grad,
        <the perturbation arguments of sa_fwd>) -> (dq, dk, dv, dbias, gsq [B, nh, Tq])
    torch.ops.fused_attn_at.sa_rowsq(q, k, key_mask?, bias?, causal, dense?, seed) -> [B, nh, Tq]
    torch.ops.fused_attn_at.sa_rp_noise(q, k, seed) -> [B, nh, Tq, Tk]      (the hashed RP noise, for tests)
    torch.ops.fused_attn_at.sa_dropout_mask(q, k, dropout_p, dropout_seed) -> [B, nh, Tq, Tk]  (the hashed
        dropout multipliers, 0 or 1 / (1 - p), for tests)
The perturbation is r[b, h, i, j] = coef[b, h, i] * X[b, h, i, j] on the allowed entries; kind says what X is:
0 none, 1 `dense` (a given [B, nh, Tq, Tk] tensor: the user's G or noise), 2 standard normal noise hashed from
(seed, b, h, i, j) (RP; the same numbers in the forward and the backward, never stored), 3 G = dL_clean/dS
recomputed block by block from the clean pass's cq, ck, cv, co (its O, or rowsum(dO * O) [B, nh, Tq]), cdo (its
dO), clse and cbias (AT through a CleanPassRecord). coef = eps / norm (zero at padded queries) is computed here
from the row sums of X^2 over the allowed keys: sa_rowsq for kinds 1 and 2, the clean backward's gsq output for
kind 3. No op allocates anything of size B * nh * Tq * Tk; their working set is a block of 64 queries x 512 keys
per thread. Attention dropout is fused too: the mask of entry (b, h, i, j) is hashed from (dropout_seed, b, h, i,
j) in the forward and again in the backward; an adversarial call recomputes the clean pass's G with the clean
pass's mask (cdropout_p, cdropout_seed, kept in its record).

sa_fwd's derivative (sa_bwd) is registered with torch.library.register_autograd; the clean call of an AT step
(record=CleanPassRecord) runs through an autograd.Function whose backward also keeps dO, rowsum(dO * O) and gsq in
the record (and drops O from it). sa_bwd's `out` may also be rowsum(dout * out) [B, nh, Tq].
Kernels compute in float32 (float16/bfloat16/float32 inputs) or float64.

iAT materialises maps (self_attention_iat.py: the clean S and G, recomputed from a fused record, and u, formed
from the differences of a chunk of examples at a time; O(B^2 nh Tq Tk) work, a few [B, nh, Tq, Tk] maps, never
[B, B, ...]; FUSED_ATTN_AT_IAT_MAX_BYTES / iat_max_bytes bounds them) and then runs the kernels as AT with G := u.
What this backend hands to the reference (materialised maps, python_ref): return_attention=True (the map is the
result), and under torch.compile dropout and RP without noise= (a kernel seed would be a traced host value).
"""
from __future__ import annotations

import math

import torch

from python_ref.perturbations import DELTA
from python_ref.self_attention import _check_finite_at, self_attention_masks
from python_ref.self_attention import attention_scores as _scores
from python_ref.self_attention import self_attention_perturbation  # noqa: F401  (materialises r by definition)

from . import cpp
from . import reference_self_attention as _reference
from .self_attention_iat import check_iat_memory, iat_direction

KIND_NONE, KIND_DENSE, KIND_HASH, KIND_CLEAN = 0, 1, 2, 3
_OPS = ("sa_fwd", "sa_bwd", "sa_rowsq", "sa_rp_noise", "sa_dropout_mask")
_NO_CLEAN = (None,) * 7


def _status() -> tuple[bool, str]:
    if cpp._C is None:
        return False, f"the C++ extension fused_attn_at._C is not importable ({cpp.UNAVAILABLE_REASON})"
    try:
        missing = [op for op in _OPS
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn_at::{op}", "CPU")]
    except RuntimeError:
        missing = list(_OPS)
    if missing:
        return False, (f"fused_attn_at._C has no CPU kernel for {', '.join(missing)} (built from older sources: "
                       "rebuild it, `python setup.py build_ext --inplace` or `pip install --no-build-isolation .`)")
    return True, ""


AVAILABLE, UNAVAILABLE_REASON = _status()


def why_unavailable(device: torch.device) -> str | None:
    """None when the cpu backend can run tensors on `device`, else why not (the style of _backend.py)."""
    if device.type != "cpu":
        return f"backend 'cpu' runs CPU tensors only; the inputs are on {device}"
    if not AVAILABLE:
        return UNAVAILABLE_REASON + ("; let the first import compile it (needs a C++ compiler and ninja; see README, "
                                     "Troubleshooting)" if cpp._C is None else "")
    return None


def sa_fwd_autograd(sa_bwd) -> tuple:
    """(backward, setup_context) that make a backend's sa_fwd op differentiable through its sa_bwd op, for
    register_autograd(backward, setup_context=setup_context)."""

    def setup_context(ctx, inputs, output):
        # dropout: (dropout_p, dropout_seed, cdropout_p, cdropout_seed), where the call gave them
        (q, k, v, key_mask, bias, causal, scale, kind, coef, dense, seed, cq, ck, cv, co, cdo, clse, cbias,
         *dropout) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_mask, bias, coef, dense, cq, ck, cv, co, cdo, clse, cbias)
        ctx.causal, ctx.scale, ctx.kind, ctx.seed, ctx.dropout = causal, scale, kind, seed, tuple(dropout)

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, key_mask, bias, coef, dense, cq, ck, cv, co, cdo, clse, cbias = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbias, _ = sa_bwd(dout, q, k, v, out, lse, key_mask, bias, ctx.causal, ctx.scale, bias_grad,
                                      ctx.kind, coef, dense, ctx.seed, cq, ck, cv, co, cdo, clse, cbias,
                                      *ctx.dropout)
        return (dq, dk, dv, None, dbias if bias_grad else None) + (None,) * (13 + len(ctx.dropout))

    return backward, setup_context


def register_not_differentiable(op) -> None:
    """Autograd of an op whose output carries no gradient (sa_rowsq's row sums of a constant perturbation, the
    materialised noise and dropout mask): the output is marked non-differentiable, so a q that requires grad
    neither makes it require grad nor reaches torch's "autograd kernel was not registered" fallback."""
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    def backward(ctx, grad):  # never runs: the output is not differentiable
        raise RuntimeError(f"{op} has no derivative")

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def register_no_second_derivative(op) -> None:
    """Autograd of a backward op (sa_bwd): under create_graph=True its outputs join the graph, and differentiating
    them again raises. Without it torch's fallback for an op with no autograd kernel warns and returns zeros: a
    gradient penalty would silently see a second derivative of 0."""
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError("perturbed_attention on the fused backends ('cpu', 'triton') has no second derivative "
                           "(double backward, e.g. create_graph=True for a gradient penalty): use "
                           "backend='reference', which is plain autograd")

    torch.library.register_autograd(op, backward, setup_context=setup_context)


if AVAILABLE:
    _ops = torch.ops.fused_attn_at

    @torch.library.register_fake("fused_attn_at::sa_fwd")
    def _sa_fwd_fake(q, k, v, key_mask, bias, causal, scale, kind, coef, dense, seed, cq, ck, cv, co, cdo, clse,
                     cbias, dropout_p=0.0, dropout_seed=0, cdropout_p=0.0, cdropout_seed=0):
        B, H, Tq, _ = q.shape
        return q.new_empty((B, H, Tq, v.shape[3])), q.new_empty((B, H, Tq))

    @torch.library.register_fake("fused_attn_at::sa_bwd")
    def _sa_bwd_fake(dout, q, k, v, out, lse, key_mask, bias, causal, scale, bias_grad, kind, coef, dense, seed, cq,
                     ck, cv, co, cdo, clse, cbias, dropout_p=0.0, dropout_seed=0, cdropout_p=0.0, cdropout_seed=0):
        B, H, Tq, _ = q.shape
        dbias = q.new_empty(bias.shape) if bias_grad else q.new_empty((0,))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, q.new_empty((B, H, Tq))

    @torch.library.register_fake("fused_attn_at::sa_rowsq")
    def _sa_rowsq_fake(q, k, key_mask, bias, causal, dense, seed):
        return q.new_empty(q.shape[:3])

    @torch.library.register_fake("fused_attn_at::sa_rp_noise")
    def _sa_rp_noise_fake(q, k, seed):
        return q.new_empty((*q.shape[:3], k.shape[2]))

    @torch.library.register_fake("fused_attn_at::sa_dropout_mask")
    def _sa_dropout_mask_fake(q, k, dropout_p, dropout_seed):
        return q.new_empty((*q.shape[:3], k.shape[2]))

    _sa_fwd_backward, _sa_fwd_setup = sa_fwd_autograd(lambda *a: _ops.sa_bwd(*a))
    torch.library.register_autograd("fused_attn_at::sa_fwd", _sa_fwd_backward, setup_context=_sa_fwd_setup)
    register_no_second_derivative("fused_attn_at::sa_bwd")
    for _name in ("sa_rowsq", "sa_rp_noise", "sa_dropout_mask"):
        register_not_differentiable(f"fused_attn_at::{_name}")


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"the cpu self-attention backend is not available: {UNAVAILABLE_REASON}")


# ---------------------------------------------------------------------------------------------------------
# The clean pass of an AT step: what the adversarial pass needs to recompute G = dL_clean/dS block by block


class FusedCleanPass:
    """Kept in CleanPassRecord.fused by a clean call of the cpu backend: the clean pass's Q, K, V, O, log-sum-exp,
    bias (with attn_mask folded in as -inf), masks, and - set by its backward - dO, delta = rowsum(dO * O)
    [B, nh, Tq] and the squared norms of G's rows. Once the backward has run, O is dropped (`out` is None): G
    needs it only through delta. O(B nh T d) memory: per layer Q, K, V, dO (the floor: G = P (dO V^T - delta) with
    P from Q, K; nothing of T x T).

    clean_args() -> (q, k, v, delta, dout, lse, bias): what the kernels take as (cq, ck, cv, co, cdo, clse,
    cbias); co may be O [B, nh, Tq, dv] or delta [B, nh, Tq]."""

    __slots__ = ("q", "k", "v", "out", "lse", "bias", "key_mask", "causal", "scale", "dout", "gsq", "delta",
                 "share", "dropout", "versions")

    def __init__(self, q, k, v, out, lse, bias, key_mask, causal, scale, dropout=(0.0, 0)):
        self.q, self.k, self.v, self.out, self.lse = q, k, v, out, lse
        self.bias, self.key_mask, self.causal, self.scale = bias, key_mask, causal, scale
        # the record keeps the clean call's tensors, not copies: an in-place change of one before the adversarial
        # call (an optimizer step, a model's own in-place op) would silently change G, so it is detected
        self.versions = self._versions()
        self.dropout = dropout  # (dropout_p, dropout_seed) of the clean call: G sees its mask
        self.dout = self.gsq = self.delta = None
        # set by an owner that uses the record for one adversarial call and then frees it (SelfAttentionAT):
        # share_inputs may then alias the adversarial call's inputs
        self.share = False

    def _add_dout(self, dout: torch.Tensor, gsq: torch.Tensor, delta: torch.Tensor) -> None:
        if self.dout is None:
            self.dout, self.gsq, self.delta = dout, gsq, delta
        else:  # a second backward through the clean call: G is linear in dO (and delta), its norm is not
            self.dout, self.delta, self.gsq = self.dout + dout, self.delta + delta, None
        self.out = None  # G needs O only through delta

    def _versions(self) -> tuple:
        def version(x):
            if x is None or x.is_inference():  # an inference tensor has no version counter (and no backward)
                return None
            return x._version

        return tuple(version(x) for x in (self.q, self.k, self.v, self.bias, self.key_mask))

    def check_unchanged(self) -> None:
        """RuntimeError when a clean-call tensor the record holds was changed in place since the clean call."""
        if self._versions() != self.versions:
            changed = [name for name, a, b in zip(("q", "k", "v", "bias", "key_mask"), self._versions(),
                                                   self.versions) if a != b]
            raise RuntimeError(f"the clean call's {', '.join(changed)} changed in place after the clean call (e.g. "
                               "an optimizer step between the clean and the adversarial call): the CleanPassRecord "
                               "keeps those tensors, not copies, and would give another G")

    def row_sq_norms(self) -> torch.Tensor:
        """sum_j G[b, h, i, j]^2, [B, nh, Tq]."""
        self.check_unchanged()
        if self.gsq is None:
            with torch.no_grad():
                self.gsq = self._sa_bwd(self.dout, self.q, self.k, self.v, self.delta, self.lse, self.key_mask,
                                        self.bias, self.causal, self.scale, False, KIND_NONE, None, None, 0,
                                        *_NO_CLEAN, *self.dropout, 0.0, 0)[4]
        return self.gsq

    @staticmethod
    def _sa_bwd(*args):
        """The backend's sa_bwd op (a subclass of another backend names its own)."""
        return _ops.sa_bwd(*args)

    @staticmethod
    def _dropout_mask(q, k, dropout_p, dropout_seed):
        """The backend's dropout multipliers (a subclass of another backend names its own)."""
        return dropout_mask(q, k, dropout_p, dropout_seed)

    def clean_args(self) -> tuple:
        self.check_unchanged()
        return (self.q, self.k, self.v, self.delta, self.dout, self.lse, self.bias)

    def share_inputs(self, q, k, v) -> None:
        """Drops the record's own Q, K, V for q, k, v when they hold the same numbers (the adversarial call of the
        first perturbed layer sees the clean pass's inputs again, bit for bit, when nothing before it is
        perturbed): G is unchanged, and the clean copies (often a whole fused qkv projection) are freed. Only when
        `share` is set: a record that is used again could see the aliased tensors change in place."""
        if not self.share or (self.q is q and self.k is k and self.v is v):
            return
        same = all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                   for a, b in ((self.q, q), (self.k, k), (self.v, v)))
        if same:
            self.check_unchanged()
            self.q, self.k, self.v = q, k, v
            self.versions = self._versions()

    def scores(self) -> torch.Tensor:
        """The clean scores S = scale Q K^T + bias [B, nh, Tq, Tk] materialised (iAT's other input)."""
        self.check_unchanged()
        with torch.no_grad():
            return _scores(self.q, self.k, self.bias, self.scale)

    def grad_map(self, with_scores: bool = False):
        """G [B, nh, Tq, Tk] materialised (for a consumer that wants the map: the reference backend, iAT), or
        (S, G) with_scores (S is formed on the way). In place where it can: every map here is as large as the
        attention, and a fresh one faults its pages in."""
        self.check_unchanged()
        with torch.no_grad():
            s = _scores(self.q, self.k, self.bias, self.scale)
            acc = torch.promote_types(s.dtype, self.lse.dtype)  # half inputs: the softmax statistics' float32
            s = s.to(acc)
            scores = s.clone() if with_scores else None
            allowed, _ = self_attention_masks(self.q, self.k, self.key_mask, causal=self.causal, bias=self.bias)
            p = s.sub_(self.lse[..., None]).exp_().masked_fill_(~allowed, 0.0)  # a row with no key: 0, not NaN
            dp = (self.dout @ self.v.transpose(-1, -2)).to(acc)
            if self.dropout[0] > 0:
                dp.mul_(self._dropout_mask(self.q, self.k, *self.dropout).to(acc))
            g = p.mul_(dp.sub_(self.delta[..., None]))
            return (scores, g) if with_scores else g


def _own(x: torch.Tensor) -> torch.Tensor:
    """x, or a compact copy when x is a view into a larger buffer (what a record keeps should not hold more)."""
    return x if x.untyped_storage().nbytes() <= x.numel() * x.element_size() else x.contiguous()


def clean_pass_function(sa_fwd, sa_bwd, record_type) -> type:
    """The autograd.Function of a fused backend's clean call of an AT step (record=CleanPassRecord), from the
    backend's sa_fwd and sa_bwd ops and its FusedCleanPass type: the forward keeps the clean pass in
    record.fused; the backward also keeps dO, rowsum(dO * O) and gsq there (and drops O from it)."""

    class _CleanPass(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, bias, key_mask, causal, scale, record, dropout_p=0.0, dropout_seed=0):
            dropout = (dropout_p, dropout_seed)
            out, lse = sa_fwd(q, k, v, key_mask, bias, causal, scale, KIND_NONE, None, None, 0, *_NO_CLEAN,
                              *dropout, 0.0, 0)
            ctx.save_for_backward(q, k, v, out, lse, bias, key_mask)
            ctx.causal, ctx.scale, ctx.record, ctx.dropout = causal, scale, record, dropout
            record.fused = record_type(q.detach(), k.detach(), v.detach(), out.detach(), lse,
                                       None if bias is None else bias.detach(), key_mask, causal, scale, dropout)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse, bias, key_mask = ctx.saved_tensors
            bias_grad = bias is not None and ctx.needs_input_grad[3]
            dout = _own(dout)  # the kernels read dO's rows in place (last dim contiguous) or copy it themselves
            # rowsum(dO * O) [B, nh, Tq] in the softmax statistics' dtype: all the backward (and G) needs of O
            delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
            dq, dk, dv, dbias, gsq = sa_bwd(dout, q, k, v, delta, lse, key_mask, bias, ctx.causal, ctx.scale,
                                            bias_grad, KIND_NONE, None, None, 0, *_NO_CLEAN, *ctx.dropout, 0.0, 0)
            fused = ctx.record.fused
            if fused is not None and fused.lse is lse:  # the record was not reused by a later clean call meanwhile
                fused._add_dout(dout.detach(), gsq, delta)
            return dq, dk, dv, (dbias if bias_grad else None), None, None, None, None, None, None

    return _CleanPass


_CleanPass = clean_pass_function(lambda *a: _ops.sa_fwd(*a), lambda *a: _ops.sa_bwd(*a), FusedCleanPass)


# ---------------------------------------------------------------------------------------------------------
# The backend-module calls of fused_attn_at.self_attention


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _effective_bias(bias, attn_mask, dtype):
    """The additive bias with attn_mask folded in (-inf where attention is not allowed): the kernels' one map."""
    if bias is not None:
        bias = bias.to(dtype)
    if attn_mask is None:
        return bias
    base = bias if bias is not None else torch.zeros((), dtype=dtype, device=attn_mask.device)
    return torch.where(attn_mask, base, float("-inf"))


def _query_valid(key_mask, query_mask, Tq, Tk):
    if query_mask is None and key_mask is not None and Tq == Tk:
        query_mask = key_mask
    return query_mask


def perturbation_coefficients(rows: torch.Tensor, query_valid, eps: float, norm: str) -> torch.Tensor:
    """coef [B, nh, Tq] = eps / max(||X||, delta) with ||X||^2 summed from `rows` (sum over allowed keys of X^2,
    [B, nh, Tq]) over the valid queries of each example (norm="example") or per row (norm="row"); 0 at padded
    queries."""
    if query_valid is not None:
        rows = rows * query_valid[:, None, :].to(rows.dtype)
    sq = rows.sum((1, 2), keepdim=True) if norm == "example" else rows
    coef = eps / sq.sqrt().clamp_min(DELTA)
    coef = coef.expand(rows.shape)
    if query_valid is not None:
        coef = coef * query_valid[:, None, :].to(rows.dtype)
    return coef.contiguous()


def _draw_seed(generator) -> int:
    """A kernel seed from `generator` (a CUDA generator draws on its device), or from the global CPU generator."""
    device = "cpu" if generator is None else generator.device
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def _check_dense_finite(name, x, q, k, key_mask, causal, bias, query_mask):
    if torch.compiler.is_compiling() or bool(torch.isfinite(x).all()):
        return
    _, valid = self_attention_masks(q, k, key_mask, causal=causal, bias=bias, query_mask=query_mask)
    _check_finite_at(name, x, valid)


class FusedBackend:
    """What differs between the fused self-attention backends (cpu here, triton): their ops, their clean-pass
    autograd.Function, and the dtype their kernels read (the cpu kernels compute in float32 for half inputs, so
    they are given float32 copies; the triton kernels read half precision themselves)."""

    def __init__(self, name, sa_fwd, sa_rowsq, clean_pass, kernel_dtype, require):
        self.name, self.sa_fwd, self.sa_rowsq, self.clean_pass = name, sa_fwd, sa_rowsq, clean_pass
        self.kernel_dtype, self.require = kernel_dtype, require


def run_fused(impl: FusedBackend, q, k, v, key_mask, causal, bias, scale, kind, grad, noise, eps, norm, attn_mask,
              query_mask, dropout_p, generator, record, iat_max_bytes):
    """The backend-module call of a fused backend `impl`: (O [B, nh, Tq, dv], None); `grad` is a tensor G or the
    CleanPassRecord of the same layer's clean call. What the kernels do not fuse runs the reference."""
    # under torch.compile a kernel seed would be a traced .item(): dropout, and RP's noise when none is given, are
    # torch's there, in the reference
    traced_seed = torch.compiler.is_compiling() and (dropout_p > 0 or (kind == "rp" and noise is None))
    if traced_seed:
        return _reference.perturbed_attention(q, k, v, key_mask, causal, bias, scale, kind, grad, noise, eps, norm,
                                              attn_mask, query_mask, dropout_p, generator, record, iat_max_bytes)
    impl.require()
    # The dropout seed comes from the global CPU generator, as torch's dropout draws from the global one (not from
    # `generator`, which is RP's): SelfAttentionAT's same_dropout replays that state, so an adversarial call draws
    # its clean call's mask when the calls before it drew the same numbers (RP from the global generator draws
    # more, so with RP pass a generator to keep the masks of later layers).
    dropout = (float(dropout_p), _draw_seed(None) if dropout_p > 0 else 0)
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    dtype = impl.kernel_dtype(q.dtype)
    acc = _compute_dtype(q.dtype)  # of the bias, the given G / noise and the coefficients
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    b = _effective_bias(bias, attn_mask, acc)
    bd = None if b is None else b.detach()
    km = None if key_mask is None else key_mask.contiguous()
    if record is not None:
        record.clear()
        record.shape = (B, H, Tq, Tk)
        needs_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (qc, kc, vc, b))
        if needs_grad:
            out = impl.clean_pass(qc, kc, vc, b, km, causal, scale, record, *dropout)
        else:  # no backward will run: the record stays empty
            out, _ = impl.sa_fwd(qc, kc, vc, km, b, causal, scale, KIND_NONE, None, None, 0, *_NO_CLEAN, *dropout,
                                 0.0, 0)
        return out.to(q.dtype), None

    pkind, dense, seed, clean, rows, clean_dropout = KIND_NONE, None, 0, _NO_CLEAN, None, (0.0, 0)
    if kind == "at":
        fused = getattr(grad, "fused", None)
        if fused is not None:  # a CleanPassRecord filled by a fused backend: recompute G block by block
            grad.check_shape((B, H, Tq, Tk))
            if fused.dout is None:
                if not grad.backward_done:
                    raise RuntimeError("no gradient has reached the clean scores of this attention call: "
                                       "back-propagate the clean loss (and mark_backward_done()) before the "
                                       "adversarial call")
                # the clean loss does not depend on this call: G = 0, r = 0
            else:
                if fused.q.dtype != qc.dtype:
                    raise TypeError(f"the CleanPassRecord was filled by a clean call computing in {fused.q.dtype}; "
                                    f"this adversarial call computes in {qc.dtype}: run both calls in one dtype")
                fused.share_inputs(qc.detach(), kc.detach(), vc.detach())
                pkind, rows, clean = KIND_CLEAN, fused.row_sq_norms(), fused.clean_args()
                clean_dropout = fused.dropout
        else:
            if not isinstance(grad, torch.Tensor):  # a reference record (a tensor's shape is checked on entry)
                grad.check_shape((B, H, Tq, Tk))
            g = grad if isinstance(grad, torch.Tensor) else grad.gradient()
            dense = g.detach().to(device=q.device, dtype=acc)
    elif kind == "iat":  # u from S and G (a few maps, no [B, B, ...]), then normalised as AT normalises G
        dense = _iat_direction(q, k, key_mask, causal, b, scale, attn_mask, query_mask, grad, norm, iat_max_bytes,
                               (B, H, Tq, Tk))
    elif kind == "rp":
        if noise is not None:
            dense = noise.detach().to(acc)
        else:
            pkind, seed = KIND_HASH, _draw_seed(generator)
            rows = impl.sa_rowsq(qc.detach(), kc.detach(), km, bd, causal, None, seed)
    if dense is not None:
        if kind != "iat":  # iAT's u is finite when its G is, checked in _iat_direction
            _check_dense_finite("noise" if kind == "rp" else "grad", dense, qc.detach(), kc.detach(), km, causal,
                                bd, query_mask)
        pkind = KIND_DENSE
        rows = impl.sa_rowsq(qc.detach(), kc.detach(), km, bd, causal, dense, 0)
    coef = None
    if pkind != KIND_NONE:
        coef = perturbation_coefficients(rows, _query_valid(key_mask, query_mask, Tq, Tk), float(eps), norm)
        coef = coef.to(acc)
    out, _ = impl.sa_fwd(qc, kc, vc, km, b, causal, scale, pkind, coef, dense, seed, *clean, *dropout,
                         *clean_dropout)
    return out.to(q.dtype), None


def _iat_direction(q, k, key_mask, causal, bias, scale, attn_mask, query_mask, grad, norm, iat_max_bytes, shape):
    """iAT's u [B, nh, Tq, Tk] in the accumulation dtype: from this call's scores and a given G, or from the clean
    scores and G of a CleanPassRecord (materialised from a fused record: S = scale Q K^T + bias, G block formula)."""
    acc = _compute_dtype(q.dtype)
    is_record = not isinstance(grad, torch.Tensor)
    if is_record:
        grad.check_shape(shape)
    # before any map exists; a fused record's G is recomputed through a few more maps (S, P, dP)
    check_iat_memory(shape, acc, iat_max_bytes, extra_maps=3 if is_record else 0)
    with torch.no_grad():
        if is_record:
            if not grad.has_gradient():
                grad.gradient()  # raises unless the clean backward ran
                # it ran and did not reach this call: G = 0, so u = 0 and r = 0
                return torch.zeros(shape, dtype=acc, device=q.device)
            if grad.grad is None:  # filled by a fused backend: S is formed on the way to G
                scores, g = grad.fused.grad_map(with_scores=True)
            else:
                g, scores = grad.grad, grad.clean_scores()
        else:
            g, scores = grad, _scores(q.detach(), k.detach(), None if bias is None else bias.detach(), scale)
        g = g.to(q.device)  # its shape: a record's was checked above, a tensor's by check_self_attention_inputs
        _, valid = self_attention_masks(q, k, key_mask, causal=causal, attn_mask=attn_mask, query_mask=query_mask,
                                        bias=bias)
        _check_finite_at("grad", g, valid)
        return iat_direction(scores.to(q.device), g, valid, norm, iat_max_bytes).to(acc)


_CPU = FusedBackend("cpu", lambda *a: _ops.sa_fwd(*a), lambda *a: _ops.sa_rowsq(*a),
                    lambda *a: _CleanPass.apply(*a), _compute_dtype, _require)


def perturbed_attention(q, k, v, key_mask, causal, bias, scale, kind, grad, noise, eps, norm, attn_mask, query_mask,
                        dropout_p, generator, record, iat_max_bytes):
    """(O [B, nh, Tq, dv], None); `grad` is a tensor G or the CleanPassRecord of the same layer's clean call."""
    return run_fused(_CPU, q, k, v, key_mask, causal, bias, scale, kind, grad, noise, eps, norm, attn_mask,
                     query_mask, dropout_p, generator, record, iat_max_bytes)


def rp_noise(q: torch.Tensor, k: torch.Tensor, seed: int) -> torch.Tensor:
    """The standard normal noise [B, nh, Tq, Tk] the kernels hash from `seed` (materialised: for tests)."""
    _require()
    return _ops.sa_rp_noise(q, k, int(seed))


def dropout_mask(q: torch.Tensor, k: torch.Tensor, dropout_p: float, dropout_seed: int) -> torch.Tensor:
    """The attention-dropout multipliers [B, nh, Tq, Tk] (0, or 1 / (1 - dropout_p)) the kernels hash from
    `dropout_seed` (materialised: for tests and grad_map)."""
    _require()
    return _ops.sa_dropout_mask(q, k, float(dropout_p), int(dropout_seed))
