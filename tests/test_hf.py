"""fused_attn_at.hf: attn_implementation="fused_attn_at" in Hugging Face Transformers models built from small
configs with random weights (nothing is downloaded): a BERT-like encoder and a Llama-like decoder (causal,
grouped-query attention). With no perturbation it equals the model's eager/sdpa attention on padded batches
for every mask format the library passes; an AT/iAT step of fused_attn_at.SelfAttentionAT through the model
equals the step written out with materialised maps, in float64. Skipped, with the reason, where transformers
is not installed (pip install ".[transformers]")."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install '.[transformers]' to test fused_attn_at.hf")

import fused_attn_at  # noqa: E402
import fused_attn_at.hf as hf  # noqa: E402
import python_ref  # noqa: E402
from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

VOCAB = 40


def bert_config(**kw):
    return BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=3, **kw)


def llama_config(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32, pad_token_id=0,
                       num_labels=3, **kw)


CONFIGS = {"bert": bert_config, "llama": llama_config}


def build(cfg, impl, dtype=torch.float32, seed=0):
    """from_config writes attn_implementation into the config: each model gets its own deep copy."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(copy.deepcopy(cfg), attn_implementation=impl)
    return model.to(dtype).eval()


def pair(name, other="eager", dtype=torch.float32):
    cfg = CONFIGS[name]()
    ref = build(cfg, other, dtype)
    ours = build(cfg, "fused_attn_at", dtype)
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "fused_attn_at"
    return ref, ours


def inputs(name, B=3, T=7, padding="right", seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    lengths = [T, T - 3, 2][:B]
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, n:] = 0
        else:
            mask[b, :T - n] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(0, 3, (B,), generator=g)
    return ids, mask, labels


def compare(ref, ours, real, **batch):
    """Logits, every layer's hidden states at real positions, and parameter gradients agree to fp32 rounding."""
    a = ref(**batch, output_hidden_states=True)
    b = ours(**batch, output_hidden_states=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-6)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(y[real], x[real], rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.logits.square().sum(), list(ref.parameters()), allow_unused=True)
    gb = torch.autograd.grad(b.logits.square().sum(), list(ours.parameters()), allow_unused=True)
    for (n, _), x, y in zip(ref.named_parameters(), ga, gb):
        if x is None:
            assert y is None or (y == 0).all(), n
            continue
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=n)


def test_register_is_idempotent_and_registers_a_mask_builder():
    assert hf.register() == "fused_attn_at"
    assert hf.register() == "fused_attn_at"
    assert AttentionInterface._global_mapping["fused_attn_at"] is hf.attention_forward
    assert AttentionMaskInterface._global_mapping["fused_attn_at"] is sdpa_mask


def test_register_checks_the_transformers_version(monkeypatch):
    """Before 4.53 (no mask interface) register() raises, naming the versions; 4.53-4.x registers with a warning
    (their BERT never calls a registered attention: a KeyError at model build; their Llama does)."""
    monkeypatch.setattr(transformers, "__version__", "4.52.4")
    with pytest.raises(ImportError, match=r"needs transformers >= 4\.53 .* found 4\.52\.4"):
        hf.register()
    monkeypatch.setattr(transformers, "__version__", "4.57.0")
    with pytest.warns(UserWarning, match="BERT-class encoders keep their own attention classes before 5.0"):
        assert hf.register() == "fused_attn_at"
    monkeypatch.setattr(transformers, "__version__", "5.0.0.dev0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.register()


@pytest.mark.parametrize("name,padding", [("bert", "right"), ("llama", "right"), ("llama", "left")])
def test_no_perturbation_equals_eager_on_padded_batches(name, padding):
    ref, ours = pair(name)
    ids, mask, _ = inputs(name, padding=padding)
    compare(ref, ours, mask.bool(), input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_no_padding_mask_formats(name):
    """attention_mask None and all ones: the mask builder returns None (BERT: no mask; Llama: is_causal)."""
    ref, ours = pair(name)
    ids, mask, _ = inputs(name, B=2)
    ids = ids.clamp_min(1)
    every = torch.ones_like(mask, dtype=torch.bool)
    compare(ref, ours, every, input_ids=ids)
    compare(ref, ours, every, input_ids=ids, attention_mask=torch.ones_like(mask))


def spy_on_op(monkeypatch):
    """The (attn_mask, causal, bias) of every call fused_attn_at.hf makes to the op."""
    calls = []

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("causal"), kwargs.get("bias")))
        return fused_attn_at.perturbed_attention(*args, **kwargs)

    monkeypatch.setattr(hf, "perturbed_attention", spy)
    return calls


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("fmt", ["bool4d", "float4d", "prefix_bool4d", "prefix_float4d"])
def test_user_4d_masks_equal_sdpa(name, fmt, monkeypatch):
    """A 4D mask given by the user (bool, True = attend; or additive float with the dtype's minimum where
    masked) gives sdpa's answer. Key padding (and causality) reach the op as key_mask (and causal=True), with no
    [B, 1, T, T] map; another pattern (a decoder's bidirectional prefix of 3 tokens, an encoder's local window)
    reaches it as attn_mask."""
    calls = spy_on_op(monkeypatch)
    ref, ours = pair(name, other="sdpa")
    ids, mask, _ = inputs(name)
    T = ids.shape[1]
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, T, T)
    if name == "llama":
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    if fmt.startswith("prefix") and name == "llama":  # a bidirectional prefix
        allowed = allowed | (mask.bool()[:, None, None, :] & (torch.arange(T) < 3))
    elif fmt.startswith("prefix"):  # an encoder: a local window of 2 on either side
        i = torch.arange(T)
        allowed = allowed & ((i[:, None] - i[None, :]).abs() <= 2)
    if fmt.endswith("bool4d"):
        m4 = allowed
    else:
        m4 = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    real = mask.bool()
    compare(ref, ours, real, input_ids=ids, attention_mask=m4)
    assert calls and all(b is None for _, _, b in calls)
    if fmt.startswith("prefix"):
        assert all(m is not None and not c for m, c, _ in calls)
    else:
        assert all(m is None and c == (name == "llama") for m, c, _ in calls)


def test_inference_mode_and_a_mask_changed_in_place():
    """Under torch.inference_mode (masks without a version counter) the answers are eager's; a user mask
    changed in place between calls is read again, also through .data (which leaves the tensor's version as it
    is); against sdpa, which takes bool 4D masks."""
    ref, ours = pair("bert", other="sdpa")
    ids, mask, _ = inputs("bert")
    with torch.inference_mode():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)
    T = ids.shape[1]
    m4 = mask.bool()[:, None, None, :].expand(-1, 1, T, T).clone()
    with torch.no_grad():
        first = ours(input_ids=ids, attention_mask=m4).logits
        m4[0, 0, :, 1:3] = False  # now not key padding alone
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=m4).logits,
                                   ref(input_ids=ids, attention_mask=m4).logits, rtol=1e-5, atol=1e-6)
        m4.data[1, 0, :2, 0] = False  # the version counter does not move
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=m4).logits,
                                   ref(input_ids=ids, attention_mask=m4).logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, ours(input_ids=ids, attention_mask=m4).logits)


@pytest.mark.parametrize("name,padding", [("bert", "right"), ("llama", "right"), ("llama", "left")])
def test_padding_masks_reach_the_op_as_key_masks(name, padding, monkeypatch):
    """The mask transformers builds for a padded batch (bool [B, 1, T, T]) is key padding (and causality): the
    op gets key_mask and causal, so no [B, 1, T, T] bias is formed or kept in an AT record."""
    calls = spy_on_op(monkeypatch)
    model = build(CONFIGS[name](), "fused_attn_at").train()
    ids, mask, labels = inputs(name, padding=padding)
    fused_attn_at.SelfAttentionAT(model, "at").step(lambda: model(input_ids=ids, attention_mask=mask,
                                                                 labels=labels).loss)
    assert len(calls) == 4  # 2 layers, clean and adversarial
    assert all(m is None and b is None and c == (name == "llama") for m, c, b in calls)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_sliding_window_decoder_equals_eager(padding):
    """A Mistral-like decoder with a 3-token sliding window at T=7: the window is in the mask the registered
    mask builder makes (the attention function ignores its sliding_window argument, as sdpa does)."""
    from transformers import MistralConfig

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32, pad_token_id=0,
                        num_labels=3, sliding_window=3)
    ref, ours = build(cfg, "eager"), build(cfg, "fused_attn_at")
    ours.load_state_dict(ref.state_dict())
    ids, mask, _ = inputs("llama", padding=padding)
    compare(ref, ours, mask.bool(), input_ids=ids, attention_mask=mask)
    # the window matters here: without it (a plain causal mask) the hidden states differ
    wide = build(MistralConfig(**{**cfg.to_dict(), "sliding_window": None}), "fused_attn_at")
    wide.load_state_dict(ref.state_dict())
    assert not torch.allclose(wide(input_ids=ids, attention_mask=mask).logits,
                              ours(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


@pytest.mark.parametrize("name", sorted(hf.UNSUPPORTED_KWARGS))
def test_arguments_that_change_the_attention_raise(name):
    """An argument the op cannot honour (attention sinks, soft-capping, sparse key selection) raises, naming it,
    rather than being ignored."""
    q = torch.randn(1, 2, 3, 4)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match=f"does not support `{name}`"):
        hf.attention_forward(module, q, q, q, None, **{name: torch.zeros(2)})
    hf.attention_forward(module, q, q, q, None, **{name: None})  # None: the model does not use it


def test_attention_sink_model_raises():
    """gpt-oss passes its per-head sink logits as s_aux on every call: a clear error, not a silently sinkless
    attention."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=4, intermediate_size=24, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=32, sliding_window=8,
                       layer_types=["full_attention"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny config's RoPE scaling remark
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fused_attn_at")
    with pytest.raises(ValueError, match="does not support `s_aux`"):
        model(torch.randint(1, VOCAB, (2, 5)))


def test_from_pretrained_and_output_attentions(tmp_path):
    cfg = bert_config()
    build(cfg, "eager").save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="fused_attn_at").eval()
    eager = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "fused_attn_at"
    ids, mask, _ = inputs("bert")
    a = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    b = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-6)
    for x, y in zip(a.attentions, b.attentions):
        real = mask.bool()[:, None, :, None].expand_as(x)
        torch.testing.assert_close(y[real.expand_as(y)], x[real], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# An AT/iAT step through the model against the step written out with materialised maps


class ManualAttention:
    """A second attention implementation, registered under another name: the SPEC step by hand. Phase
    "clean" keeps every layer's S (retained); phase "adv" adds r[layer] to S."""

    def __init__(self, key_mask, causal):
        self.key_mask, self.causal = key_mask, causal
        self.phase, self.scores, self.valids, self.rs, self.calls = "clean", [], [], {}, 0

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        n_rep = getattr(module, "num_key_value_groups", 1)
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
        B, nh, T, _ = query.shape
        m = self.key_mask
        allowed = m[:, None, None, :].expand(B, nh, T, T)
        if self.causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
        valid = allowed & m[:, None, :, None]
        s = (query @ key.transpose(-1, -2)) * scaling
        if self.phase == "clean":
            self.scores.append(s)
            self.valids.append(valid)
        else:
            s = s + self.rs.get(self.calls, 0.0)
            self.calls += 1
        p = python_ref.masked_softmax(s, allowed)
        return (p @ value).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("name,kind,layers", [("bert", "at", None), ("llama", "at", None),
                                              ("bert", "iat", ["*.layer.1.*"]), ("llama", "rp", [0])])
def test_step_through_hf_equals_reference_step(name, kind, layers, monkeypatch):
    if kind == "rp":
        # the cpu kernels hash RP's Gaussian numbers from a seed, the written-out step below draws torch.randn:
        # the same distribution, other numbers; the reference backend draws as the written-out step does
        monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", "reference")
    cfg = CONFIGS[name]()
    ours = build(cfg, "fused_attn_at", torch.float64)
    ids, mask, labels = inputs(name, padding="left" if name == "llama" else "right")
    eps, lam = 0.6, 0.8
    manual = ManualAttention(mask.bool(), causal=name == "llama")
    AttentionInterface.register("fa_test_manual", manual)
    AttentionMaskInterface.register("fa_test_manual", sdpa_mask)
    ref = build(cfg, "fa_test_manual", torch.float64)
    ref.load_state_dict(ours.state_dict())

    gen = torch.Generator().manual_seed(5)
    at = fused_attn_at.SelfAttentionAT(ours, kind, eps=eps, lam=lam, layers=layers, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = at.step(lambda: ours(input_ids=ids, attention_mask=mask, labels=labels).loss)
    got = {n: p.grad for n, p in ours.named_parameters()}

    l_clean = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    n_layers = len(manual.scores)
    chosen = list(range(n_layers)) if layers is None else ([1] if name == "bert" else [0])
    grads = torch.autograd.grad(l_clean, manual.scores, retain_graph=True)
    gen = torch.Generator().manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manual.rs = {i: python_ref.self_attention_perturbation(kind, manual.scores[i].detach(), manual.valids[i],
                                                               grad=grads[i], eps=eps, generator=gen)
                     for i in chosen}
    manual.phase = "adv"
    l_adv = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss = l_clean + lam * l_adv
    want = dict(zip([n for n, _ in ref.named_parameters()],
                    torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True)))
    torch.testing.assert_close(step.loss, loss.detach(), rtol=1e-12, atol=1e-12)
    assert step.adversarial_loss != step.clean_loss
    assert len(step.layers) == len(chosen)
    if name == "bert" and layers is not None:
        assert step.layers == ("bert.encoder.layer.1.attention.self",)
    for n, w in want.items():
        if w is None:
            continue
        torch.testing.assert_close(got[n], w, rtol=1e-9, atol=1e-11, msg=n)


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_step_with_gradient_checkpointing_equals_step_without(name, use_reentrant):
    """model.activation_checkpointing_enable() (gradient_checkpointing_enable() before): each layer's forward re-runs in the backward, and the AT step's
    losses and gradients are those without checkpointing (float64, attention dropout 0.2 in training)."""
    cfg = CONFIGS[name]()
    setattr(cfg, "attention_dropout" if name == "llama" else "attention_probs_dropout_prob", 0.2)
    ids, mask, labels = inputs(name, padding="left" if name == "llama" else "right")
    results = []
    for checkpointing in (False, True):
        model = build(cfg, "fused_attn_at", torch.float64).train()
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        torch.manual_seed(11)
        at = fused_attn_at.SelfAttentionAT(model, "at", eps=0.7, lam=0.5)
        step = at.step(lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        results.append((step, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=1e-12, atol=1e-12)
    assert ckpt.layers == plain.layers and len(plain.layers) == 2
    for n, g in plain_grads.items():
        if g is not None:
            torch.testing.assert_close(ckpt_grads[n], g, rtol=1e-9, atol=1e-11, msg=n)


def test_readme_example_runs(capsys):
    """The README's Hugging Face example, as written (a BERT in training mode, dropout 0.1, padded batch)."""
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Self-attention (Transformers)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "attn_implementation=\"fused_attn_at\"" in code and "SelfAttentionAT" in code
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("L=")]
    assert len(lines) == 3, lines
    for line in lines:
        fields = dict(part.split("=", 1) for part in line.split()[:3])
        total, clean, adv = (float(fields[k]) for k in ("L", "clean", "adv"))
        assert all(map(torch.isfinite, map(torch.tensor, (total, clean, adv))))
        assert abs(total - (clean + adv)) < 1e-3  # lam = 1
        assert "bert.encoder.layer.0.attention.self" in line and "bert.encoder.layer.1.attention.self" in line


@pytest.mark.parametrize("kind", ["at", "iat", "rp"])
def test_eps_zero_step_in_training_mode_replays_the_clean_pass(kind):
    """A BERT with its default dropout 0.1 in training mode: at eps = 0 the adversarial loss equals the clean
    loss exactly (the step replays the clean pass's dropout masks, hidden and attention), while two plain
    forwards differ (dropout is on)."""
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, num_labels=3)
    assert cfg.attention_probs_dropout_prob == 0.1 and cfg.hidden_dropout_prob == 0.1
    model = build(cfg, "fused_attn_at").train()
    ids, mask, labels = inputs("bert")

    def loss():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    assert loss().item() != loss().item()
    step = fused_attn_at.SelfAttentionAT(model, kind, eps=0.0).step(loss)
    assert step.adversarial_loss == step.clean_loss
