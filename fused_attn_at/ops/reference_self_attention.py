"""The reference as the self-attention backend: python_ref's definitions with materialised maps, plus the
CleanPassRecord protocol (the clean call keeps G = dL_clean/dS by a hook on S; the adversarial call reads it)."""
from __future__ import annotations

import python_ref
from python_ref.self_attention import (
    _check_finite_at,
    attend,
    checked_scores,
    self_attention_perturbation,  # noqa: F401  (this backend's perturbation)
)
import torch


def perturbed_attention(q, k, v, key_mask, causal, bias, scale, kind, grad, noise, eps, norm, attn_mask, query_mask,
                        dropout_p, generator, record, iat_max_bytes):
    """(O [B, nh, Tq, dv], P [B, nh, Tq, Tk]); `grad` is a tensor G or the CleanPassRecord of the clean call."""
    s, allowed, valid = checked_scores(q, k, key_mask, causal=causal, bias=bias, scale=scale, attn_mask=attn_mask,
                                       query_mask=query_mask, noise=noise)
    if record is not None:
        record.clear()
        record.shape = tuple(s.shape)
        if record.keep_scores:
            record.scores = s.detach()
        if s.requires_grad:
            s.register_hook(record._set_grad)
    if kind is not None:
        clean_scores = s.detach()
        if kind != "rp" and not isinstance(grad, torch.Tensor):  # a CleanPassRecord
            grad.check_shape(s.shape)
            g = grad.gradient()
            if kind == "iat" and grad.has_gradient():  # else G = 0: r = 0 whatever the scores
                clean_scores = grad.clean_scores().to(device=s.device, dtype=s.dtype)
            grad = g.to(device=s.device, dtype=s.dtype)
        if grad is not None:
            _check_finite_at("grad", grad, valid)
        s = s + python_ref.self_attention_perturbation(kind, clean_scores, valid, grad=grad, noise=noise, eps=eps,
                                                       norm=norm, generator=generator, max_bytes=iat_max_bytes)
    return attend(s, allowed, v, dropout_p)
