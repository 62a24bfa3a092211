"""fused_attn_at: attention pooling with adversarial perturbations (Kitada & Iyatomi 2021) in one fused kernel.

    out = fused_attn_at.attention_pool(h, scores, mask, perturbation="at", grad=g, eps=1.0)
    out.context    # [B, H]
    out.attention  # [B, T]
    r = fused_attn_at.perturbation("iat", scores, mask, grad=g, eps=1.0)  # [B, T]
"""
import torch  # noqa: F401  (must be loaded before the compiled extension: it provides libc10)

from python_ref import AttentionPoolOutput

from ._backend import BACKENDS, available_backends, resolve_backend
from .functional import AttentionPoolPair, attention_pool, attention_pool_pair, perturbation
from .modules import AdditiveScorer, AttentionPool, DotScorer
from .training import AdversarialLoss, adversarial_attention_loss
from .self_attention import CleanPassRecord, SelfAttentionOutput, perturbed_attention, self_attention_perturbation
from .self_attention_training import SelfAttentionAT, SelfAttentionATStep
from .cpu_allocator import tune_glibc_malloc

__version__ = "0.1.0"

__all__ = [
    "AdditiveScorer", "AdversarialLoss", "AttentionPool", "AttentionPoolOutput", "BACKENDS", "DotScorer",
    "adversarial_attention_loss", "attention_pool", "available_backends", "perturbation", "resolve_backend",
    # the clean and perturbed pooling as one op (issue 17)
    "AttentionPoolPair", "attention_pool_pair",
    # self-attention (issue 18)
    "CleanPassRecord", "SelfAttentionAT", "SelfAttentionATStep", "SelfAttentionOutput", "perturbed_attention",
    "self_attention_perturbation",
    # CPU training: keep freed memory in the process (issue 17)
    "tune_glibc_malloc",
]
