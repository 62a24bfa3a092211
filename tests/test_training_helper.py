"""fused_attn_at.adversarial_attention_loss on a tiny real model (embedding -> BiLSTM -> additive scorer ->
linear head): its parameter gradients equal the slow way's (the whole model run twice), it runs the encoder
once per step, it touches no parameter .grad, and compat="released" reproduces the released code's objective."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_attn_at
import python_ref
from _helpers import require_backend

VOCAB, EMBED, HIDDEN = 40, 8, 6


class TinyClassifier(nn.Module):
    """The paper's binary classifier in miniature; token 0 is padding."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, EMBED, padding_idx=0)
        self.encoder = nn.LSTM(EMBED, HIDDEN, batch_first=True, bidirectional=True)
        self.scorer = fused_attn_at.AdditiveScorer(2 * HIDDEN)
        self.head = nn.Linear(2 * HIDDEN, 1)

    def encode(self, tokens: torch.Tensor):
        """tokens [B, T] -> h [B, T, 2 HIDDEN], scores [B, T], mask [B, T]"""
        h, _ = self.encoder(self.embedding(tokens))
        return h, self.scorer(h), tokens != 0


class EncoderCounter:
    """Counts the encoder's forward calls, and backward passes through its output."""

    def __init__(self, encoder: nn.Module):
        self.forward = self.backward = 0
        encoder.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        self.forward += 1
        output[0].register_hook(self._on_backward)

    def _on_backward(self, grad):
        self.backward += 1


def _batch():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 4, 7, 1, 9, 5])
    tokens = torch.randint(1, VOCAB, (6, 9), generator=generator)
    tokens[torch.arange(9)[None, :] >= lengths[:, None]] = 0
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    return tokens, labels


def _model():
    torch.manual_seed(0)
    return TinyClassifier().double()


def _loss_fn(labels):
    def loss_fn(logits):  # [B, 1] -> scalar
        return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), labels)
    return loss_fn


EPS, LAM, SEED = 0.7, 0.5, 1234


def _fast_step(model, tokens, labels, kind, compat, backend):
    counter = EncoderCounter(model.encoder)
    h, scores, mask = model.encode(tokens)
    out = fused_attn_at.adversarial_attention_loss(
        h, scores, mask, model.head, _loss_fn(labels), perturbation=kind, eps=EPS, lam=LAM, compat=compat,
        generator=torch.Generator().manual_seed(SEED), backend=backend)
    return out, counter, (h, scores, mask)


def _slow_step(model, tokens, labels, kind, compat):
    """The plain way, all in python_ref: a clean pass of the whole model, g = dL_clean/dscores, then a
    second whole-model pass with the perturbed attention; back-propagate w L_clean + lam L_adv."""
    counter = EncoderCounter(model.encoder)
    loss_fn = _loss_fn(labels)
    h, scores, mask = model.encode(tokens)
    clean_loss = loss_fn(model.head(python_ref.attention_pool(h, scores, mask).context))
    grad = None
    if kind in ("at", "iat"):
        (grad,) = torch.autograd.grad(clean_loss, scores, retain_graph=True)
    if compat == "released" and kind == "iat":
        kind, grad = "at", -grad  # the released iAT is eps * normalize(-g)
    h2, scores2, _ = model.encode(tokens)
    adversarial = python_ref.attention_pool(h2, scores2, mask, perturbation=kind, grad=grad, eps=EPS,
                                            generator=torch.Generator().manual_seed(SEED))
    adversarial_loss = loss_fn(model.head(adversarial.context))
    clean_weight = 2.0 if compat == "released" else 1.0
    (clean_weight * clean_loss + LAM * adversarial_loss).backward()
    return clean_loss, adversarial_loss, adversarial, counter


def _cases():
    cases = [pytest.param("cpu", kind, compat, id=f"cpu-{kind}-{compat}")
             for kind in ("at", "iat", "rp") for compat in (None, "released")]
    # The helper is backend-agnostic and the kernels are checked elsewhere: one Triton case (under the slow
    # interpreter) shows that it runs there too.
    cases.append(pytest.param("triton", "iat", None, id="triton-iat"))
    return cases


@pytest.mark.parametrize("backend_name, kind, compat", _cases())
def test_matches_the_slow_way(backend_name, kind, compat):
    require_backend(backend_name)
    tokens, labels = _batch()

    model = _model()
    for p in model.parameters():  # gradients accumulated earlier must be left alone until backward
        p.grad = torch.full_like(p, 3.0)
    out, counter, (h, scores, mask) = _fast_step(model, tokens, labels, kind, compat, backend_name)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, torch.full_like(p, 3.0)), f"{name}.grad was touched before backward"
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    fast = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert (counter.forward, counter.backward) == (1, 1), "the encoder must run once forward, once backward"

    slow_model = _model()
    clean_loss, adversarial_loss, adversarial, slow_counter = _slow_step(slow_model, tokens, labels, kind, compat)
    assert (slow_counter.forward, slow_counter.backward) == (2, 2)  # the counter does count

    torch.testing.assert_close(out.clean_loss, clean_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.adversarial_loss, adversarial_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.adversarial.attention, adversarial.attention, rtol=1e-10, atol=1e-14)
    assert not torch.equal(out.adversarial.attention, out.clean.attention), "the perturbation had no effect"
    for name, p in slow_model.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-8, atol=1e-12, msg=lambda m: f"{name}: {m}")
        assert p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_released_iat_is_the_normalised_negative_gradient():
    """compat="released", iat: r = eps * normalize(-g) with g = dL_clean/dscores; the objective is
    2 L_clean + lam L_adv (its loss value says so)."""
    tokens, labels = _batch()
    model = _model()
    out, _, (h, scores, mask) = _fast_step(model, tokens, labels, "iat", "released", None)
    (g,) = torch.autograd.grad(out.clean_loss, scores, retain_graph=True)
    r = EPS * python_ref.normalize_rows(-g, mask)
    torch.testing.assert_close(out.adversarial.attention, python_ref.masked_softmax(scores + r, mask),
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out.loss, 2 * out.clean_loss + LAM * out.adversarial_loss, rtol=1e-14, atol=0)
    # and it is not the paper's iAT
    paper_r = python_ref.iat_perturbation(scores, g, mask, EPS)
    assert not torch.allclose(paper_r, r, atol=1e-3)


def test_no_perturbation_is_the_clean_loss():
    tokens, labels = _batch()
    out, counter, (h, scores, mask) = _fast_step(_model(), tokens, labels, None, None, None)
    assert out.adversarial is None and out.adversarial_loss is None
    assert out.loss is out.clean_loss
    assert counter.forward == 1


def test_bad_arguments():
    tokens, labels = _batch()
    model = _model()
    h, scores, mask = model.encode(tokens)
    with pytest.raises(ValueError, match=r"compat must be None or 'released', got 'paper'"):
        fused_attn_at.adversarial_attention_loss(h, scores, mask, model.head, _loss_fn(labels), compat="paper")
    with pytest.raises(ValueError, match=r"scores must require grad .*perturbation='at'"):
        fused_attn_at.adversarial_attention_loss(h, scores.detach(), mask, model.head, _loss_fn(labels))


# ---------------------------------------------------------------------------------------------------------
# issue 17: the step with the pair op (5 passes over h for at/iat, 3 for rp) equals the two-op step (11, 9)

def _stepped(model, tokens, labels, kind, compat, backend, step, dropout):
    """One step of `step` (fused_attn_at.training._pair_step or _two_op_step) on `model` (the head behind a
    dropout in train mode when `dropout`, seeded alike for both steps), backward included:
    (AdversarialLoss, {parameter: grad}, (h.grad-free) dL/dh)."""
    h, scores, mask = model.encode(tokens)
    h.retain_grad()
    drop = nn.Dropout(0.3).train()

    def head(c):
        return model.head(drop(c) if dropout else c)

    torch.manual_seed(99)
    out = step(h, scores, mask, head, _loss_fn(labels), kind, EPS, LAM, compat,
               torch.Generator().manual_seed(SEED), backend)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}, h.grad


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("dropout", [False, True], ids=["plain_head", "dropout_head"])
@pytest.mark.parametrize("compat", [None, "released"])
@pytest.mark.parametrize("kind", ["at", "iat", "rp"])
def test_pair_step_equals_the_two_op_step(backend_name, kind, compat, dropout):
    """float64: the loss, its parts, the attentions and every parameter gradient of the pair step equal
    those of the two-op step (the path before issue 17). With a dropout in the head, the head's two runs
    on the clean context see one dropout sample, as the two-op step's single run did."""
    require_backend(backend_name)
    from fused_attn_at import training

    tokens, labels = _batch()
    model = _model()
    new, new_grads, new_dh = _stepped(model, tokens, labels, kind, compat, backend_name, training._pair_step, dropout)
    old, old_grads, old_dh = _stepped(model, tokens, labels, kind, compat, backend_name, training._two_op_step, dropout)

    for name in ("loss", "clean_loss", "adversarial_loss", "clean_logits"):
        torch.testing.assert_close(getattr(new, name), getattr(old, name), rtol=1e-12, atol=1e-14,
                                   msg=lambda m: f"{name}: {m}")
    for branch in ("clean", "adversarial"):
        for field in ("context", "attention"):
            torch.testing.assert_close(getattr(getattr(new, branch), field), getattr(getattr(old, branch), field),
                                       rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new_dh, old_dh, rtol=1e-10, atol=1e-14)
    for name, grad in old_grads.items():
        torch.testing.assert_close(new_grads[name], grad, rtol=1e-10, atol=1e-14, msg=lambda m: f"{name}: {m}")
        assert grad.abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("backend_name, pair", [("cpu", True), ("reference", True), ("triton", True)])
def test_helper_takes_the_pair_path_where_the_backend_has_it(monkeypatch, backend_name, pair):
    """adversarial_attention_loss runs the pair step where the backend has the pair op (cpu, reference,
    triton; two single ops elsewhere), and its result is the pair step's."""
    require_backend(backend_name)
    from fused_attn_at import training

    calls = []
    real = training.attention_pool_pair
    monkeypatch.setattr(training, "attention_pool_pair", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokens, labels = _batch()
    model = _model()
    out = fused_attn_at.adversarial_attention_loss(
        *model.encode(tokens), model.head, _loss_fn(labels), perturbation="iat", eps=EPS, lam=LAM,
        backend=backend_name)
    assert len(calls) == (1 if pair else 0)
    if pair:
        direct = training._pair_step(*model.encode(tokens), model.head, _loss_fn(labels), "iat", EPS, LAM, None,
                                     None, backend_name)
        torch.testing.assert_close(out.loss, direct.loss, rtol=0, atol=0)
