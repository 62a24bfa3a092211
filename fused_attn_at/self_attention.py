"""Multi-head (self-)attention with Attention AT / iAT / RP perturbations of each layer's scores (SPEC
"Self-attention"): the public op, its input checks and the dispatch to a backend.

    out = fused_attn_at.perturbed_attention(q, k, v, key_mask, causal=True)                  # [B, nh, Tq, dv]
    out = fused_attn_at.perturbed_attention(q, k, v, key_mask, perturbation="at", grad=G)    # G = dL_clean/dS

Backends: "reference" (materialised maps, `ops/reference_self_attention.py`), "cpu" (flash-style C++ kernels,
`ops/cpp_self_attention.py`, the default for CPU tensors when fused_attn_at._C has them) and "triton"
(flash-attention-2 style Triton kernels, `ops/triton_self_attention.py`, the default for CUDA tensors when triton
is importable; CPU tensors under TRITON_INTERPRET=1, as the tests run it). Both fused backends run the reference
for return_attention=True; iAT materialises a few [B, nh, Tq, Tk] maps (S, G, its direction u) and then runs the
kernels (attention dropout is fused: the kernels hash or Philox their mask). A model whose attention calls this op can be trained with
`fused_attn_at.SelfAttentionAT` (one AT/iAT/RP step over chosen layers) without ever handling G: the helper
gives each call of its clean pass a `CleanPassRecord`, which the backend fills with what the adversarial pass
needs (the reference: G itself, and the clean scores for iAT; the fused backends: what recomputes both), and passes the record back as `grad=`.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from python_ref.self_attention import (
    IAT_MAX_BYTES_ENV,
    NORMS,
    SelfAttentionOutput,
    check_self_attention_inputs,
)

SELF_ATTENTION_BACKENDS = ("cpu", "triton", "reference")
_NOT_BUILT = ("cuda",)


class CleanPassRecord:
    """What one attention call of the clean pass leaves for the perturbed call of the adversarial pass.

    Pass it as `record=` to the clean call and as `grad=` to the adversarial call (same layer, same masks).
    The backend fills it: the reference keeps G = dL_clean/dS [B, nh, Tq, Tk] (set by a hook when the clean
    loss is back-propagated) and, for iAT, the clean scores S; the fused backends (cpu, triton) keep what they
    need to recompute G block by block instead (`fused`). `clear()` frees it.
    """

    __slots__ = ("grad", "scores", "keep_scores", "backward_done", "shape", "fused", "call", "replaying")

    def __init__(self, keep_scores: bool = False):
        self.keep_scores = keep_scores  # iAT needs the clean S, AT and RP do not (the reference keeps it then)
        self.grad: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.shape: tuple | None = None
        self.backward_done = False  # set by whoever ran the clean backward: no grad then means G = 0
        # the cpu and triton backends: a FusedCleanPass (clean Q, K, V, O, log-sum-exp, bias; dO and G's row norms
        # after the backward), from which the adversarial call recomputes G block by block
        self.fused = None
        # the clean call's (causal, scale, key_mask, attn_mask, query_mask): the adversarial call must match them,
        # since G and the valid entries depend on them
        self.call: tuple | None = None
        # set by SelfAttentionAT for a call that activation checkpointing recomputes: that call may fill the
        # record again (any other second clean call with the same record raises)
        self.replaying = False

    def _set_grad(self, g: torch.Tensor) -> None:
        self.grad = g.detach() if self.grad is None else self.grad + g.detach()

    def clear(self) -> None:
        self.grad = self.scores = self.fused = self.call = None
        self.backward_done = False

    def _begin_clean_call(self, call: tuple) -> None:
        """Called by the op for a clean call with record=self: refuses a second clean call (the backends would
        disagree on what it means) unless it is a recomputation of the first, and keeps the call's settings."""
        if self.call is not None and not self.replaying:
            raise ValueError("this CleanPassRecord already holds a clean call: pass a fresh CleanPassRecord (or "
                             "one cleared with clear()) to each clean call")
        self.replaying = False
        self.call = call

    def check_call(self, call: tuple, shape: tuple) -> None:
        """ValueError unless an adversarial call's (causal, scale, key_mask, attn_mask, query_mask) are the clean
        call's: G is recomputed (fused backends) and normalised over the valid entries with them."""
        if self.call is None:
            return
        if self.shape is not None:
            self.check_shape(shape)  # the clearer message when the call is another layer's
        names = ("causal", "scale", "key_mask", "attn_mask", "query_mask")
        for name, mine, theirs in zip(names, self.call, call):
            if isinstance(mine, torch.Tensor) or isinstance(theirs, torch.Tensor):
                same = (isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor)
                        and mine.shape == theirs.shape and mine.device == theirs.device and torch.equal(mine, theirs))
            else:
                same = mine == theirs
            if not same:
                raise ValueError(f"{name} differs from the clean call this CleanPassRecord holds: the adversarial "
                                 "call must use the clean call's causal, scale and masks")

    def gradient(self) -> torch.Tensor:
        """G of the clean pass; zeros when the backward ran but reached no score of this call."""
        if self.grad is not None:
            return self.grad
        if self.fused is not None and self.fused.dout is not None:  # filled by a fused backend: materialise G
            return self.fused.grad_map()
        if self.shape is None:
            raise RuntimeError("this CleanPassRecord was never passed as record= to a clean perturbed_attention call")
        if not self.backward_done:
            raise RuntimeError("no gradient has reached the clean scores of this attention call: back-propagate the "
                               "clean loss (and mark_backward_done()) before the adversarial call")
        return torch.zeros(self.shape)

    def has_gradient(self) -> bool:
        """Whether the clean backward reached this call's scores (if not, G = 0 and r = 0)."""
        return self.grad is not None or (self.fused is not None and self.fused.dout is not None)

    def clean_scores(self) -> torch.Tensor:
        """The clean call's scores S [B, nh, Tq, Tk] (what iAT needs besides G): kept by the reference
        (keep_scores=True), or recomputed from a fused backend's record (scale Q K^T + bias)."""
        if self.scores is not None:
            return self.scores
        if self.fused is not None:
            return self.fused.scores()
        raise ValueError("perturbation='iat' with a CleanPassRecord needs the clean scores: with the reference "
                         "backend create it with CleanPassRecord(keep_scores=True)")

    def check_shape(self, shape) -> None:
        """ValueError unless the clean call this record came from had scores of `shape` [B, nh, Tq, Tk]."""
        if self.shape is not None and tuple(self.shape) != tuple(shape):
            raise ValueError(f"the CleanPassRecord holds a map of shape {tuple(self.shape)}; this call's scores are "
                             f"{tuple(shape)}: pass the record of the same layer's clean call")

    def mark_backward_done(self) -> None:
        self.backward_done = True

    def __repr__(self) -> str:
        g = None if self.grad is None else tuple(self.grad.shape)
        return f"CleanPassRecord(grad={g}, scores={'kept' if self.scores is not None else None})"


# A training helper in its clean or adversarial phase: gets every call made with perturbation=None.
_INTERCEPTORS: list = []


def _push_interceptor(fn: Callable) -> None:
    _INTERCEPTORS.append(fn)


def _pop_interceptor(fn: Callable) -> None:
    _INTERCEPTORS.remove(fn)


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run perturbed_attention on tensors on `device`, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        from .ops import cpp_self_attention

        return cpp_self_attention.why_unavailable(device)
    if backend == "triton":
        try:
            from .ops import triton_self_attention
        except Exception as exc:  # a broken triton install: unavailable, with the reason
            return f"fused_attn_at.ops.triton_self_attention does not import: {type(exc).__name__}: {exc}"
        return triton_self_attention.why_unavailable(device)
    if backend in _NOT_BUILT:
        return (f"the fused self-attention kernels are not built yet for {backend!r} (self-attention has 'cpu', "
                "'triton' and 'reference')")
    raise ValueError(f"backend must be None, 'cpu', 'triton' or 'reference' for perturbed_attention, got {backend!r}")


def _backend_module(backend: str | None, device: torch.device | None = None):
    """backend None: $FUSED_ATTN_AT_BACKEND when it names a self-attention backend ('cpu', 'triton' or
    'reference'; the attention_pool-only name 'cuda' is ignored here), else 'cpu' for CPU tensors when
    fused_attn_at._C has its kernels, 'triton' for CUDA tensors when triton is importable, else the reference."""
    if backend is None and os.environ.get("FUSED_ATTN_AT_BACKEND") in SELF_ATTENTION_BACKENDS:
        backend = os.environ["FUSED_ATTN_AT_BACKEND"]
    if backend is None:
        backend = "reference"
        if device is not None:
            preferred = "cpu" if device.type == "cpu" else "triton" if device.type == "cuda" else None
            if preferred is not None and why_unavailable(preferred, device) is None:
                backend = preferred
    if backend == "reference":
        from .ops import reference_self_attention

        return reference_self_attention
    reason = why_unavailable(backend, device if device is not None else torch.device("cpu"))
    if reason is not None:
        if backend in _NOT_BUILT:
            raise NotImplementedError(f"backend={backend!r}: {reason}; use backend=None, 'cpu', 'triton' or "
                                      "'reference'")
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if backend == "triton":
        from .ops import triton_self_attention

        return triton_self_attention
    from .ops import cpp_self_attention

    return cpp_self_attention


def perturbed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    perturbation: str | None = None,
    grad: "torch.Tensor | CleanPassRecord | None" = None,
    noise: torch.Tensor | None = None,
    eps: float = 1.0,
    norm: str = "example",
    attn_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_attention: bool = False,
    generator: torch.Generator | None = None,
    record: CleanPassRecord | None = None,
    layer=None,
    backend: str | None = None,
    iat_max_bytes: int | None = None,
):
    """Scaled dot-product attention O = masked_softmax(S + r) V, S = scale Q K^T + bias, r the perturbation.

    q [B, nh, Tq, d], k [B, nh, Tk, d], v [B, nh, Tk, dv] of one float dtype; key_mask [B, Tk] bool (True =
    token); causal: key j <= query i; bias float [B|1, nh|1, Tq, Tk] added to S (-inf entries are masked);
    scale defaults to 1/sqrt(d); attn_mask bool [B|1, nh|1, Tq, Tk] (True = may attend) for other patterns;
    query_mask [B, Tq] the real queries (default key_mask when Tq == Tk), used only for where r may be non-zero.
    A query with no key to attend gives zeros (no NaN, zero gradients).

    perturbation: None; "at" / "iat" with grad = dL_clean/dS [B, nh, Tq, Tk] (or the CleanPassRecord of the
    same layer's clean call); "rp" with noise [B, nh, Tq, Tk] standard normal, or drawn from `generator`.
    r has norm eps per example over the layer's valid entries (norm="row": per example, head and query row)
    and is a constant for autograd. iAT materialises maps (the reference [B, B, nh*Tq*Tk] differences, the
    fused backends a few [B, nh, Tq, Tk] maps and one chunk of differences): above iat_max_bytes (default
    $FUSED_ATTN_AT_IAT_MAX_BYTES, else 2 GiB) it raises MemoryError.
    dropout_p: dropout of the attention probabilities (the caller decides; pass 0 in eval).
    record: a CleanPassRecord to fill during this (clean) call. layer: a name or module identifying the
    calling layer to fused_attn_at.SelfAttentionAT (ignored otherwise).

    Returns O [B, nh, Tq, dv], or SelfAttentionOutput(output, attention) with return_attention=True.
    backend: None (the best for the device: "cpu" for CPU tensors when built, "triton" for CUDA tensors when
    triton is importable, else "reference"), "cpu", "triton" (CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1) or "reference". The fused backends run the reference for return_attention=True;
    their attention dropout draws its mask in the kernels from a seed drawn from the global generator (not
    torch.nn.functional.dropout's numbers; under torch.compile, dropout calls run the reference).
    """
    if _INTERCEPTORS and perturbation is None and grad is None and noise is None and record is None:
        kwargs = dict(causal=causal, bias=bias, scale=scale, norm=norm, attn_mask=attn_mask, query_mask=query_mask,
                      dropout_p=dropout_p, return_attention=return_attention, generator=generator, backend=backend,
                      iat_max_bytes=iat_max_bytes)

        def run(**overrides):
            return _perturbed_attention(q, k, v, key_mask, **{**kwargs, **overrides})

        run.device = q.device  # where a generator for this call must live (the reference draws RP's noise there)
        return _INTERCEPTORS[-1](run, layer)
    return _perturbed_attention(q, k, v, key_mask, causal=causal, bias=bias, scale=scale, perturbation=perturbation,
                                grad=grad, noise=noise, eps=eps, norm=norm, attn_mask=attn_mask,
                                query_mask=query_mask, dropout_p=dropout_p, return_attention=return_attention,
                                generator=generator, record=record, backend=backend, iat_max_bytes=iat_max_bytes)


def _perturbed_attention(q, k, v, key_mask=None, *, causal=False, bias=None, scale=None, perturbation=None,
                         grad=None, noise=None, eps=1.0, norm="example", attn_mask=None, query_mask=None,
                         dropout_p=0.0, return_attention=False, generator=None, record=None, backend=None,
                         iat_max_bytes=None):
    # the attention map is materialised by the reference only
    impl = _backend_module("reference" if return_attention else backend, q.device)
    is_record = isinstance(grad, CleanPassRecord)
    check_self_attention_inputs(q, k, v, key_mask, causal=causal, bias=bias, scale=scale, perturbation=perturbation,
                                grad=grad, noise=noise, eps=eps, norm=norm, attn_mask=attn_mask,
                                query_mask=query_mask, dropout_p=dropout_p, grad_is_tensor=not is_record)
    if record is not None and not isinstance(record, CleanPassRecord):
        raise TypeError(f"record must be a fused_attn_at.CleanPassRecord, got {type(record).__name__}")
    if record is not None or is_record:
        # the settings G and the valid entries depend on (the default scale as the number it stands for)
        call = (bool(causal), float(q.shape[-1] ** -0.5 if scale is None else scale), key_mask, attn_mask,
                query_mask)
        if record is not None:
            if perturbation is not None:
                raise ValueError("record= is for the clean call of an AT step (perturbation=None); pass the record "
                                 "as grad= to the adversarial call")
            record._begin_clean_call(call)
        else:
            grad.check_call(call, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    out, attention = impl.perturbed_attention(
        q, k, v, key_mask, causal, bias, scale, perturbation, grad, noise, float(eps), norm, attn_mask, query_mask,
        float(dropout_p), generator, record, iat_max_bytes)
    if record is not None:
        record.call = call  # a backend may have cleared the record before filling it
    return SelfAttentionOutput(out, attention) if return_attention else out


def self_attention_perturbation(kind: str, scores: torch.Tensor, valid: torch.Tensor | None = None, *,
                                grad: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                                eps: float = 1.0, norm: str = "example", generator: torch.Generator | None = None,
                                iat_max_bytes: int | None = None, backend: str | None = None) -> torch.Tensor:
    """The perturbation r [B, nh, Tq, Tk] that perturbed_attention adds to a layer's scores S [B, nh, Tq, Tk].
    valid: bool, broadcastable to S (python_ref.self_attention_masks gives it); no gradient."""
    impl = _backend_module(backend)
    with torch.no_grad():
        return impl.self_attention_perturbation(kind, scores, valid, grad=grad, noise=noise, eps=eps, norm=norm,
                                                generator=generator, max_bytes=iat_max_bytes)


__all__ = ["CleanPassRecord", "IAT_MAX_BYTES_ENV", "NORMS", "SELF_ATTENTION_BACKENDS", "SelfAttentionOutput",
           "perturbed_attention", "self_attention_perturbation"]
