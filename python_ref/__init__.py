"""The pure-PyTorch reference of fused_attn_at: plain PyTorch ops, no compiled code. It defines the truth
every backend is tested against (see SPEC.md)."""
from .attention import AttentionPoolOutput, additive_scores, attention_pool, dot_scores, masked_softmax
from .checks import PERTURBATIONS, check_attention_inputs, check_perturbation_inputs
from .perturbations import (
    DELTA,
    at_perturbation,
    iat_perturbation,
    nearest_neighbours,
    normalize_rows,
    perturbation,
    rp_perturbation,
    word_at_perturbation,
    word_iat_perturbation,
)
from .self_attention import (
    SelfAttentionOutput,
    attention_scores,
    check_self_attention_inputs,
    perturbed_attention,
    self_attention_masks,
    self_attention_perturbation,
)

__all__ = [
    "AttentionPoolOutput", "DELTA", "PERTURBATIONS", "additive_scores", "at_perturbation", "attention_pool",
    "check_attention_inputs", "check_perturbation_inputs", "dot_scores", "iat_perturbation", "masked_softmax",
    "nearest_neighbours", "normalize_rows", "perturbation", "rp_perturbation", "word_at_perturbation",
    "word_iat_perturbation",
    # self-attention (SPEC "Self-attention")
    "SelfAttentionOutput", "attention_scores", "check_self_attention_inputs", "perturbed_attention",
    "self_attention_masks", "self_attention_perturbation",
]
