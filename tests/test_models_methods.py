"""The paper's models and the six training methods on small synthetic batches (experiments/paper)."""
from __future__ import annotations

import collections
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))

import fused_attn_at  # noqa: E402
import python_ref  # noqa: E402
from paper import interpret, methods  # noqa: E402
from paper.models import AttentionClassifier  # noqa: E402

# The fields of paper.data.Batch; a local stand-in keeps these tests independent of the data loaders.
Batch = collections.namedtuple(
    "Batch", "tokens mask query query_mask labels candidate_mask lengths index")

V, E, HIDDEN = 23, 8, 5
SMALL = dict(embed_size=E, hidden_size=HIDDEN, cnn_channels=3, kernel_sizes=(1, 3), decoder_size=6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which turns into long
    waits when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(kind: str = "bc", B: int = 6, T: int = 7, Tq: int = 4, n_labels: int = 3, seed: int = 0,
               empty_row: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # the batch's longest row sets T
    if empty_row:
        lengths[-1] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    tokens = torch.randint(2, V, (B, T), generator=g).masked_fill(~mask, 0)
    query = query_mask = candidate_mask = None
    if kind == "bc":
        labels = torch.randint(0, 2, (B,), generator=g)
    else:
        qlen = torch.randint(1, Tq + 1, (B,), generator=g)
        query_mask = torch.arange(Tq)[None, :] < qlen[:, None]
        query = torch.randint(2, V, (B, Tq), generator=g).masked_fill(~query_mask, 0)
        labels = torch.randint(0, n_labels, (B,), generator=g)
        if kind == "qa":  # each example allows the true answer and one or two others
            candidate_mask = torch.rand(B, n_labels, generator=g) < 0.5
            candidate_mask[torch.arange(B), labels] = True
    return Batch(tokens, mask, query, query_mask, labels, candidate_mask, lengths, torch.arange(B))


def make_model(kind="bc", encoder="lstm", attention="additive", seed=0, **kw) -> AttentionClassifier:
    torch.manual_seed(seed)
    n_labels = 1 if kind == "bc" else 3
    return AttentionClassifier(V, kind=kind, n_labels=n_labels, encoder=encoder, attention=attention,
                               **{**SMALL, **kw}).double()


def double(batch: Batch) -> Batch:
    return batch  # token/mask tensors carry no float dtype; the model is float64


def param_grads(model, loss) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_grads_close(a, b, rtol=1e-9, atol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


CONFIGS = [("bc", "lstm", "additive"), ("bc", "cnn", "dot"), ("nli", "lstm", "dot"), ("qa", "cnn", "additive")]


@pytest.mark.parametrize("kind,encoder,attention", CONFIGS)
def test_model_shapes_and_masking(kind, encoder, attention):
    model = make_model(kind, encoder, attention).eval()
    batch = make_batch(kind, empty_row=True)
    out = model(batch)
    B, T = batch.tokens.shape
    assert out.logits.shape == ((B,) if kind == "bc" else (B, 3))
    assert out.attention.shape == (B, T)
    assert torch.isfinite(out.logits).all()
    assert (out.attention[~batch.mask] == 0).all()
    torch.testing.assert_close(out.attention[:-1].sum(-1), torch.ones(B - 1, dtype=torch.float64))
    assert (out.attention[-1] == 0).all()  # the empty row
    enc = model.encode(batch)
    assert (enc.h[~batch.mask] == 0).all()  # padded states are zeroed
    if kind == "qa":  # non-candidate answers get no probability
        assert (model.probabilities(out.logits)[~batch.candidate_mask] == 0).all()


def test_lstm_states_ignore_padding():
    """An example's states do not depend on how far it is padded (packed BiLSTM, zeroed CNN padding)."""
    for encoder in ("lstm", "cnn"):
        model = make_model("bc", encoder).eval()
        batch = make_batch("bc", B=3, T=6)
        wider = batch._replace(tokens=torch.cat([batch.tokens, torch.zeros(3, 4, dtype=torch.long)], 1),
                               mask=torch.cat([batch.mask, torch.zeros(3, 4, dtype=torch.bool)], 1))
        a, b = model(batch), model(wider)
        torch.testing.assert_close(a.logits, b.logits)
        torch.testing.assert_close(a.attention, b.attention[:, :6])


def test_lstm_encoder_equals_packed_bilstm():
    """The two-direction LSTM over right-padded rows gives the packed BiLSTM's states and final states."""
    from paper.models import LSTMEncoder

    torch.manual_seed(3)
    encoder = LSTMEncoder(E, HIDDEN).double()
    packed_lstm = torch.nn.LSTM(E, HIDDEN, batch_first=True, bidirectional=True).double()
    with torch.no_grad():
        for name, p in encoder.forward_rnn.named_parameters():
            getattr(packed_lstm, name).copy_(p)
        for name, p in encoder.backward_rnn.named_parameters():
            getattr(packed_lstm, name + "_reverse").copy_(p)
    batch = make_batch(B=5, T=9)
    x = torch.randn(5, 9, E, dtype=torch.float64)
    states, final = encoder(x, batch.mask)
    lengths = batch.mask.sum(1)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, (h_n, _) = packed_lstm(packed)
    expected, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=9)
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(final, torch.cat([h_n[0], h_n[1]], -1))


def test_pretrained_embeddings_are_copied_and_trainable():
    vectors = torch.randn(V, 4, dtype=torch.float64)
    model = AttentionClassifier(V, pretrained=vectors, **{**SMALL, "embed_size": 99}).double()
    assert model.embedding.weight.shape == (V, 4)
    torch.testing.assert_close(model.embedding.weight[1:], vectors[1:])
    assert (model.embedding.weight[0] == 0).all() and model.embedding.weight.requires_grad


@pytest.mark.parametrize("method", methods.METHODS)
@pytest.mark.parametrize("kind,encoder,attention", [CONFIGS[0], CONFIGS[1], CONFIGS[3]])
def test_every_method_lowers_the_loss(method, kind, encoder, attention):
    model = make_model(kind, encoder, attention, dropout=0.0)
    objective = methods.Objective(model, method, eps=0.5, generator=torch.Generator().manual_seed(0))
    batch = make_batch(kind, B=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        step = objective(batch)
        step.loss.backward()
        optimizer.step()
        losses.append(step.loss.item())
        assert torch.isfinite(step.loss)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("kind", ["bc", "nli"])
@pytest.mark.parametrize("method,passes", [("vanilla", 1), ("attention_rp", 1), ("attention_at", 1),
                                           ("attention_iat", 1), ("word_at", 2), ("word_iat", 2)])
def test_encoder_passes_per_step(kind, method, passes):
    model = make_model(kind)
    calls = count_calls(model.encoder)
    objective = methods.Objective(model, method)
    objective(make_batch(kind)).loss.backward()
    assert calls[0] == passes
    if kind != "bc":  # the question encoder runs with the passage encoder
        query_calls = count_calls(model.query_encoder)
        objective(make_batch(kind)).loss.backward()
        assert query_calls[0] == passes


@pytest.mark.parametrize("method", methods.COMPAT_METHODS)
def test_released_compat_runs_three_network_passes(method):
    model = make_model()
    calls = count_calls(model.encoder)
    methods.Objective(model, method, compat="released")(make_batch()).loss.backward()
    assert calls[0] == 3


def _two_pass_loss(model, batch, kind, eps, lam, generator=None, clean_weight=1.0, negate_iat=False):
    """The slow objective: a clean network pass for g, a second full pass for the adversarial loss."""
    enc = model.encode(batch)
    clean = fused_attn_at.attention_pool(enc.h, enc.scores, enc.mask, backend="reference")
    clean_loss = model.loss(model.head(clean.context, enc.query, batch.candidate_mask), batch)
    grad = None
    if kind in ("at", "iat"):
        (grad,) = torch.autograd.grad(clean_loss, enc.scores, retain_graph=True)
    enc2 = model.encode(batch)
    if negate_iat:  # the released iAT: the AT perturbation of -g
        kind, grad = "at", -grad
    r = python_ref.perturbation(kind, enc2.scores.detach(), enc2.mask, grad=grad, eps=eps, generator=generator)
    a = python_ref.masked_softmax(enc2.scores + r, enc2.mask)
    context = torch.bmm(a[:, None, :], enc2.h).squeeze(1)
    adv_loss = model.loss(model.head(context, enc2.query, batch.candidate_mask), batch)
    return clean_weight * clean_loss + lam * adv_loss, a


@pytest.mark.parametrize("method", ["attention_at", "attention_iat", "attention_rp"])
@pytest.mark.parametrize("kind,encoder,attention", [CONFIGS[0], CONFIGS[2]])
def test_one_pass_gradient_equals_two_pass_gradient(method, kind, encoder, attention):
    model = make_model(kind, encoder, attention)
    batch = make_batch(kind)
    eps, lam = 0.7, 1.3
    step = methods.Objective(model, method, eps=eps, lam=lam, generator=torch.Generator().manual_seed(5))(batch)
    slow_loss, slow_attention = _two_pass_loss(model, batch, methods.ATTENTION_PERTURBATION[method], eps, lam,
                                               generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(step.loss, slow_loss)
    torch.testing.assert_close(step.adversarial_attention, slow_attention)
    assert_grads_close(param_grads(model, step.loss), param_grads(model, slow_loss))


@pytest.mark.parametrize("method", methods.COMPAT_METHODS)
def test_released_compat_quirks(method):
    model = make_model()
    batch = make_batch()
    eps, lam = 0.9, 0.6
    step = methods.Objective(model, method, eps=eps, lam=lam, compat="released")(batch)
    # Quirk 1: the parameter gradient is that of 2 L_clean + lam L_adv.
    slow_loss, slow_attention = _two_pass_loss(model, batch, "at", eps, lam, clean_weight=2.0,
                                               negate_iat=(method == "attention_iat"))
    torch.testing.assert_close(step.loss, slow_loss)
    assert_grads_close(param_grads(model, step.loss), param_grads(model, slow_loss))
    # ... which is the library's one-pass released objective.
    enc = model.encode(batch)
    library = fused_attn_at.adversarial_attention_loss(
        enc.h, enc.scores, enc.mask, model.head, lambda z: model.loss(z, batch),
        perturbation=methods.ATTENTION_PERTURBATION[method], eps=eps, lam=lam, compat="released")
    assert_grads_close(param_grads(model, step.loss), param_grads(model, library.loss))
    # Quirk 2: the released iAT direction is minus the AT direction.
    torch.testing.assert_close(step.adversarial_attention, slow_attention)
    if method == "attention_iat":
        at_step = methods.Objective(model, "attention_at", eps=eps, lam=lam, compat="released")(batch)
        s = enc.scores.detach()
        clean = fused_attn_at.attention_pool(enc.h, enc.scores, enc.mask)
        (g,) = torch.autograd.grad(model.loss(model.head(clean.context), batch), enc.scores, retain_graph=True)
        r_at = python_ref.at_perturbation(g, batch.mask, eps)
        torch.testing.assert_close(at_step.adversarial_attention, python_ref.masked_softmax(s + r_at, batch.mask))
        torch.testing.assert_close(step.adversarial_attention, python_ref.masked_softmax(s - r_at, batch.mask))
        paper = methods.Objective(model, "attention_iat", eps=eps, lam=lam)(batch)
        assert not torch.allclose(paper.adversarial_attention, step.adversarial_attention)


def test_word_at_perturbs_embeddings_along_the_gradient():
    model = make_model()
    batch = make_batch()
    eps = 0.3
    step = methods.Objective(model, "word_at", eps=eps, lam=1.0)(batch)
    embedded = model.embed(batch.tokens)
    enc = model.encode(batch, embedded)
    clean = fused_attn_at.attention_pool(enc.h, enc.scores, enc.mask)
    (g,) = torch.autograd.grad(model.loss(model.head(clean.context), batch), embedded, retain_graph=True)
    r = python_ref.word_at_perturbation(g, batch.mask, eps)
    torch.testing.assert_close(step.adversarial_attention, model(batch, embedded + r).attention)
    norms = r.flatten(1).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, eps))


def test_word_iat_uses_nearest_neighbours():
    model = make_model()
    objective = methods.Objective(model, "word_iat", neighbours=4)
    objective.refresh_neighbours()
    nn_idx = objective._neighbours
    assert nn_idx.shape == (V, 4)
    torch.testing.assert_close(nn_idx, python_ref.nearest_neighbours(model.embedding.weight, 4))
    step = objective(make_batch())
    assert torch.isfinite(step.loss)


def test_bad_method_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="method must be one of"):
        methods.Objective(model, "attention_xx")
    with pytest.raises(ValueError, match="eps"):
        methods.Objective(model, "attention_at", eps=-1.0)
    with pytest.raises(ValueError, match="lam"):
        methods.Objective(model, "attention_at", lam=-1.0)
    with pytest.raises(ValueError, match="compat"):
        methods.Objective(model, "word_at", compat="released")
    with pytest.raises(ValueError, match="compat"):
        methods.Objective(model, "attention_at", compat="paper")


@pytest.mark.parametrize("kind,encoder,attention", [CONFIGS[0], CONFIGS[3]])
def test_gradient_importance_holds_attention_constant(kind, encoder, attention):
    model = make_model(kind, encoder, attention).eval()
    batch = make_batch(kind, empty_row=True)
    got = interpret.gradient_importance(model, batch)
    # By hand, one example at a time, with the attention frozen as a constant weight vector.
    for i in range(batch.tokens.shape[0]):
        one = Batch(*[None if x is None else x[i:i + 1] for x in batch])
        e = model.embed(one.tokens).detach().requires_grad_(True)
        enc = model.encode(one, e)
        a = python_ref.masked_softmax(enc.scores, one.mask).detach()
        logits = model.head((a[:, None, :] @ enc.h).squeeze(1), enc.query, one.candidate_mask)
        (g,) = torch.autograd.grad(model.predicted_probability(logits).sum(), e)
        raw = (g * e).sum(-1).abs()[0] * one.mask[0]
        expected = raw / raw.sum() if raw.sum() > 0 else raw
        torch.testing.assert_close(got.importance[i], expected)
        torch.testing.assert_close(got.attention[i], python_ref.masked_softmax(enc.scores, one.mask)[0].detach())
    assert (got.importance[-1] == 0).all()  # the empty row


def test_perturbed_predictions():
    model = make_model().eval()
    batch = make_batch(B=10)
    zero = interpret.perturbed_predictions(model, batch, 0.0)
    torch.testing.assert_close(zero.attention, zero.clean_attention)
    torch.testing.assert_close(zero.logits, zero.clean_logits)
    big = interpret.perturbed_predictions(model, batch, 5.0)
    tv = interpret.total_variation(big.attention, big.clean_attention)
    assert (tv >= 0).all() and (tv <= 1 + 1e-12).all() and tv.mean() > 0.05
    small = interpret.perturbed_predictions(model, batch, 1e-3)
    # The AT direction increases the loss to first order.
    assert model.loss(small.logits, batch) > model.loss(small.clean_logits, batch)
