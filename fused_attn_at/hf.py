"""Hugging Face Transformers drop-in: fused_attn_at.perturbed_attention as an attention implementation.

    import fused_attn_at.hf                      # registers "fused_attn_at" (fused_attn_at.hf.register() again is a no-op)
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="fused_attn_at")
    at = fused_attn_at.SelfAttentionAT(model, "at", eps=1.0)
    step = at.step(lambda: model(**batch, labels=labels).loss)

Needs the optional extra: pip install ".[transformers]" (transformers >= 5.0, the first in which BERT-class models
call the AttentionInterface; tested with 5.0.0 and 5.24.0). 4.53-4.x registers with a warning (decoders such as
Llama call it there); older versions raise ImportError.
register() registers the attention function AND a mask builder for the same name (transformers' sdpa one, a
bool [B, 1, Tq, Tk] mask, or None where the model may rely on is_causal): without a mask builder a custom
implementation is handed attention_mask=None on padded batches and attends to the padding.
With perturbation=None this computes what the model's eager/sdpa attention computes (up to rounding); a query
that may attend no key (e.g. a left-padded position in a causal model) gives zeros where eager gives a uniform
average: such rows are padding, which no loss reads.
"""
from __future__ import annotations

import warnings

import torch

from .self_attention import perturbed_attention

NAME = "fused_attn_at"

# Arguments some models pass to their attention function that change what it computes; ignoring one would be a
# silent wrong answer. (Others, e.g. sliding_window or cu_seq_lens_q, are already in the mask the registered
# mask builder makes, or are flash-attention metadata, as for sdpa.)
UNSUPPORTED_KWARGS = {
    "softcap": "tanh soft-capping of the scores",
    "s_aux": "per-head attention-sink logits in the softmax",
    "sinks": "per-head attention-sink logits in the softmax",
    "indices": "a sparse top-k selection of the keys",
    "block_indices": "a sparse block selection of the keys",
}


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, nkv, T, d] -> [B, nkv * n_rep, T, d] (grouped-query attention), like transformers' repeat_kv."""
    if n_rep == 1:
        return x
    B, nkv, T, d = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, T, d).reshape(B, nkv * n_rep, T, d)


def _masks_from_hf(attention_mask: torch.Tensor | None, B: int, dtype: torch.dtype):
    """(key_mask [B, Tk], attn_mask bool 4D, bias float 4D) from the mask transformers passes: None, a bool
    [B|1, 1|nh, Tq, Tk] mask (True = attend) or an additive float mask (0 / large negative, possibly with a
    bias such as ALiBi in the non-masked entries)."""
    if attention_mask is None:
        return None, None, None
    if attention_mask.dim() == 2:  # a 2D padding mask [B, Tk] given straight through
        key_mask = attention_mask.bool()
        return key_mask, None, None
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be None, [B, Tk] or [B|1, nh|1, Tq, Tk], got {tuple(attention_mask.shape)}")
    bias = None
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        floor = torch.finfo(attention_mask.dtype).min / 2
        allowed = attention_mask > floor  # also False for -inf
        rest = attention_mask.masked_fill(~allowed, 0.0)
        if bool((rest != 0).any()):
            bias = rest.to(dtype)
    key_mask = allowed.any(dim=1).any(dim=1)  # [B|1, Tk]: a key no query may attend is padding
    key_mask = key_mask.expand(B, key_mask.shape[-1])
    return key_mask, allowed, bias


def _as_key_mask(key_mask: torch.Tensor, allowed: torch.Tensor) -> bool | None:
    """False when `allowed` [B|1, nh|1, Tq, Tk] is key padding alone (an encoder's mask), True when it is key
    padding and causality (a decoder's, Tq == Tk), else None. The op is then given key_mask (and causal) instead
    of the mask, so that no [B, 1, Tq, Tk] map reaches the kernels or an AT record."""
    pad = key_mask[:, None, None, :]  # [B, 1, 1, Tk]
    if bool((allowed == pad).all()):
        return False
    Tq, Tk = allowed.shape[-2:]
    if Tq == Tk:
        tril = torch.ones(Tq, Tk, dtype=torch.bool, device=allowed.device).tril()
        if bool((allowed == (pad & tril)).all()):
            return True
    return None


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers attention interface: query [B, nh, Tq, d], key/value [B, nkv, Tk, d] -> ([B, Tq, nh, dv],
    attention map or None). Calls fused_attn_at.perturbed_attention with layer=module, so that
    fused_attn_at.SelfAttentionAT can perturb it."""
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='fused_attn_at' does not support `{name}` "
                             f"({UNSUPPORTED_KWARGS[name]}), which this model passes; use 'eager'")
    n_rep = getattr(module, "num_key_value_groups", 1) or 1
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    B, _, Tq, _ = query.shape
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(Tq > 1 and attention_mask is None and is_causal)  # sdpa's rule: a mask, when given, says it all
    if causal and key.shape[2] > Tq:  # prefill of an empty static cache (as sdpa does)
        key, value = key[:, :, :Tq], value[:, :, :Tq]
    key_mask, attn_mask, bias = _masks_from_hf(attention_mask, B, query.dtype)
    if attn_mask is not None and bias is None and not torch.compiler.is_compiling():
        # checked per call (a few passes over bools, far below the attention's cost): a cache keyed on the tensor
        # would miss in-place writes that do not bump its version (.data, a shared numpy buffer)
        plain = _as_key_mask(key_mask, attn_mask)
        if plain is not None:
            attn_mask, causal = None, plain
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    if bias is not None:
        bias = bias.to(query.dtype)
    want_map = bool(kwargs.get("output_attentions", False))
    result = perturbed_attention(query, key, value, key_mask, causal=causal, bias=bias, scale=scaling,
                                 attn_mask=attn_mask, dropout_p=float(dropout) if module.training else 0.0,
                                 return_attention=want_map, layer=module)
    out, attn = (result.output, result.attention) if want_map else (result, None)
    return out.transpose(1, 2).contiguous(), attn


# 4.53 brought the mask interface (without a mask builder a custom attention gets no mask on padded batches);
# 5.0 made BERT-class encoders call the AttentionInterface (before, only decoders such as Llama did)
MIN_TRANSFORMERS = (4, 53)
ENCODERS_FROM = (5, 0)


def _version(text: str) -> tuple[int, int]:
    parts = (text.split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except ValueError:
        return 0, 0


def register(name: str = NAME) -> str:
    """Registers `name` (default "fused_attn_at") with transformers' AttentionInterface and, for its masks,
    AttentionMaskInterface (transformers' sdpa_mask). Idempotent. Returns the name for attn_implementation=."""
    import transformers

    found = _version(transformers.__version__)
    if found < MIN_TRANSFORMERS:
        raise ImportError(
            f"fused_attn_at.hf needs transformers >= 4.53 (its mask interface) and >= 5.0 for BERT-class models, "
            f"found {transformers.__version__}: pip install 'fused_attn_at[transformers]' (or pip install -U "
            "transformers)")
    if found < ENCODERS_FROM:
        warnings.warn(
            f"transformers {transformers.__version__}: decoder models (Llama, Mistral, ...) call "
            f"attn_implementation='{name}', but BERT-class encoders keep their own attention classes before 5.0 "
            "and fail to build with it; pip install -U transformers for those", UserWarning, stacklevel=2)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


register()
