"""fused_attn_at.SelfAttentionAT, the whole-model AT/iAT/RP step, against the step written out by hand with
materialised maps (python_ref): S per layer retained, G = dL_clean/dS by autograd, r per chosen layer from the
clean pass, the adversarial forward with every chosen layer perturbed, L = L_clean + lam * L_adv; in float64.
Also: choosing layers by index and name, records freed after the step, dropout replay, errors, and the step
under torchrun with DistributedDataParallel (2 CPU processes, gloo)."""
from __future__ import annotations

import gc
import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import fused_attn_at
import python_ref
from _helpers import require_backend

TESTS = pathlib.Path(__file__).resolve().parent


class Attention(torch.nn.Module):
    def __init__(self, dim, nh, causal, dropout=0.0):
        super().__init__()
        self.nh, self.causal, self.dropout = nh, causal, dropout
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.manual = None  # the hand-written reference step replaces the op by a function of (self, q, k, v, mask)
        self.name_layer = True  # pass layer=self (what matches a call recomputed by activation checkpointing)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.nh, D // self.nh).permute(2, 0, 3, 1, 4)
        if self.manual is not None:
            o = self.manual(self, q, k, v, mask)
        else:
            o = fused_attn_at.perturbed_attention(q, k, v, mask, causal=self.causal,
                                                  layer=self if self.name_layer else None,
                                                  dropout_p=self.dropout if self.training else 0.0)
        return x + self.out(o.transpose(1, 2).reshape(B, T, D))


class Toy(torch.nn.Module):
    """Embedding, n attention blocks (residual + tanh MLP), mean over real tokens, linear head."""

    def __init__(self, vocab=20, dim=8, nh=2, layers=2, classes=3, causal=True, dropout=0.0):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(Attention(dim, nh, causal, dropout) for _ in range(layers))
        self.mlp = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, classes)
        self.use_reentrant = None  # True/False: each attention block under torch.utils.checkpoint

    def forward(self, ids, mask):
        x = self.emb(ids)
        for att, mlp in zip(self.layers, self.mlp):
            if self.use_reentrant is None:
                x = att(x, mask)
            else:
                x = torch.utils.checkpoint.checkpoint(att, x, mask, use_reentrant=self.use_reentrant)
            x = x + torch.tanh(mlp(x))
        m = mask[..., None].to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1).clamp_min(1))


def batch(B=4, T=6, vocab=20, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    lengths = torch.tensor([T, T - 2, 3, T - 1][:B] + [T] * max(0, B - 4))
    mask = torch.arange(T)[None, :] < lengths[:, None]
    y = torch.randint(0, classes, (B,), generator=g)
    return ids, mask, y


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Toy(**kw).double()


def manual_step(model, ids, mask, y, kind, eps, lam, chosen, norm="example", seed=None):
    """The step by hand (SPEC "Self-attention"): returns (loss, grads of every parameter)."""
    atts = list(model.layers)
    scores, valids = [], []

    def clean(mod, q, k, v, m):
        allowed, valid = python_ref.self_attention_masks(q, k, m, causal=mod.causal)
        s = python_ref.attention_scores(q, k)
        scores.append(s)
        valids.append(valid)
        return python_ref.masked_softmax(s, allowed) @ v

    for a in atts:
        a.manual = clean
    try:
        l_clean = torch.nn.functional.cross_entropy(model(ids, mask), y)
        if kind is None:
            return l_clean.detach(), torch.autograd.grad(l_clean, list(model.parameters()))
        grads = torch.autograd.grad(l_clean, scores, retain_graph=True)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        rs = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, (s, valid, g) in enumerate(zip(scores, valids, grads)):
                if i in chosen:
                    rs[i] = python_ref.self_attention_perturbation(kind, s.detach(), valid, grad=g, eps=eps,
                                                                   norm=norm, generator=gen)
        counter = iter(range(len(atts)))

        def adversarial(mod, q, k, v, m):
            i = next(counter)
            allowed, _ = python_ref.self_attention_masks(q, k, m, causal=mod.causal)
            s = python_ref.attention_scores(q, k) + rs.get(i, 0.0)
            return python_ref.masked_softmax(s, allowed) @ v

        for a in atts:
            a.manual = adversarial
        l_adv = torch.nn.functional.cross_entropy(model(ids, mask), y)
        loss = l_clean + lam * l_adv
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))
    finally:
        for a in atts:
            a.manual = None


def helper_step(model, ids, mask, y, kind, eps, lam, layers=None, norm="example", seed=None):
    model.zero_grad()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    at = fused_attn_at.SelfAttentionAT(model, kind, eps=eps, lam=lam, layers=layers, norm=norm, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = at.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask), y))
    return step, [p.grad.clone() for p in model.parameters()], at


@pytest.mark.parametrize("kind,norm", [(None, "example")] + [(k, n) for k in ("at", "iat", "rp")
                                                             for n in ("example", "row")])
def test_step_equals_reference_step(kind, norm, monkeypatch):
    if kind == "rp":  # the cpu backend hashes its own noise (tests/test_self_attention_cpu.py checks it)
        monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", "reference")
    model = make_model()
    ids, mask, y = batch()
    step, got, at = helper_step(model, ids, mask, y, kind, 0.9, 0.7, norm=norm, seed=3)
    loss, want = manual_step(model, ids, mask, y, kind, 0.9, 0.7, chosen={0, 1}, norm=norm, seed=3)
    torch.testing.assert_close(step.loss, loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if kind is not None:
        assert step.layers == ("layers.0", "layers.1")
        assert step.adversarial_loss > 0 and not step.loss.requires_grad


@pytest.mark.parametrize("layers,chosen,names", [
    ([1], {1}, ("layers.1",)),
    (["layers.0", 2], {0, 2}, ("layers.0", "layers.2")),
    ("layers.[12]", {1, 2}, ("layers.1", "layers.2")),
])
def test_layers_by_index_and_name(layers, chosen, names):
    model = make_model(layers=3)
    ids, mask, y = batch()
    step, got, _ = helper_step(model, ids, mask, y, "at", 1.3, 1.0, layers=layers)
    _, want = manual_step(model, ids, mask, y, "at", 1.3, 1.0, chosen=chosen)
    assert step.layers == names
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["at", "iat"])
def test_records_are_freed_after_the_step(kind, backend, monkeypatch):
    """No record holds anything once the step is over: the reference's G and S, the fused backends' clean pass
    (checked before the step ends too, so that the check cannot pass on records that never held anything)."""
    if backend == "cpu":
        require_backend("cpu")
    monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", backend)
    model = make_model()
    ids, mask, y = batch()
    held, records = [], []
    original = fused_attn_at.SelfAttentionAT.clear

    def clear(self):
        held.extend(r.grad is not None or r.scores is not None or r.fused is not None
                    for r in self._records.values())
        records.extend(self._records.values())
        original(self)

    monkeypatch.setattr(fused_attn_at.SelfAttentionAT, "clear", clear)
    _, _, at = helper_step(model, ids, mask, y, kind, 1.0, 1.0)
    assert held and all(held)
    assert at._records == {} and at._names == []
    gc.collect()
    assert all(r.grad is None and r.scores is None and r.fused is None for r in records)
    assert not fused_attn_at.self_attention._INTERCEPTORS


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind,generator", [("at", False), ("at", True), ("iat", False), ("rp", True),
                                            ("rp", False)])
def test_dropout_is_replayed_in_the_adversarial_pass(kind, generator, backend, monkeypatch):
    """With eps = 0 the adversarial pass is the clean pass again when the random state is replayed, with or
    without a generator for RP's noise (the dropout masks come from the global generator, which the step
    replays; without a generator RP draws from one of the step's own, not from the global one)."""
    if backend == "cpu":
        require_backend("cpu")
    monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", backend)
    model = make_model(dropout=0.5)
    model.train()
    ids, mask, y = batch()
    gen = torch.Generator().manual_seed(4) if generator else None
    at = fused_attn_at.SelfAttentionAT(model, kind, eps=0.0, generator=gen)
    step = at.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask), y))
    assert step.adversarial_loss == step.clean_loss
    at = fused_attn_at.SelfAttentionAT(model, kind, eps=0.0, same_dropout=False, generator=gen)
    step = at.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask), y))
    assert step.adversarial_loss != step.clean_loss


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["at", "iat", "rp"])
def test_activation_checkpointing_gives_the_same_step(kind, backend, use_reentrant, monkeypatch):
    """Every attention block under torch.utils.checkpoint (its forward re-run in each backward), in training
    with attention dropout 0.3 and RP drawing from a generator: the step's losses and gradients equal the step
    without checkpointing. Before the helper matched recomputed calls, checkpoint raised (the recomputation ran
    the plain op and saved other tensors)."""
    if backend == "cpu":
        require_backend("cpu")
    _checkpointed_equals_plain(kind, backend, use_reentrant, monkeypatch)


@pytest.mark.parametrize("kind", ["at", "rp"])
def test_activation_checkpointing_on_triton(kind, monkeypatch):
    """As above on the triton backend (its interpreter here: one setting per kind, for time)."""
    require_backend("triton")
    _checkpointed_equals_plain(kind, "triton", False, monkeypatch)


def _checkpointed_equals_plain(kind, backend, use_reentrant, monkeypatch):
    monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", backend)
    ids, mask, y = batch()
    results = []
    for reentrant in (None, use_reentrant):
        model = make_model(dropout=0.3)
        model.train()
        model.use_reentrant = reentrant
        torch.manual_seed(7)
        step, grads, _ = helper_step(model, ids, mask, y, kind, 0.8, 0.6, seed=3)
        results.append((step, grads))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    assert plain.adversarial_loss != plain.clean_loss
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ckpt.adversarial_loss, plain.adversarial_loss, rtol=1e-13, atol=1e-13)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["at", "rp"])
def test_activation_checkpointing_without_the_model(kind):
    """SelfAttentionAT(None, ...) (no model to name the layers by) matches a recomputed call to its forward call
    by the module's identity: the step equals the one with the model given."""
    ids, mask, y = batch()
    losses, grads = [], []
    for given in (True, False):
        model = make_model(dropout=0.3)
        model.train()
        model.use_reentrant = False
        torch.manual_seed(5)
        at = fused_attn_at.SelfAttentionAT(model if given else None, kind, eps=0.8, lam=0.6)
        losses.append(at.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask), y)).loss)
        grads.append([p.grad for p in model.parameters()])
    assert losses[0] == losses[1]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_checkpointed_call_without_a_layer_module_raises():
    model = make_model()
    model.use_reentrant = False
    for att in model.layers:
        att.name_layer = False
    ids, mask, y = batch()
    at = fused_attn_at.SelfAttentionAT(model, "at")
    with pytest.raises(RuntimeError, match="cannot be matched to one call of the forward"):
        at.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask), y))
    assert not fused_attn_at.self_attention._INTERCEPTORS


def test_errors():
    model = make_model()
    ids, mask, y = batch()
    at = fused_attn_at.SelfAttentionAT(model, "at", layers=["encoder.*"])
    with pytest.raises(ValueError, match=r"'encoder.\*' matches none of the model's 2 attention calls"):
        at.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask), y))
    assert not fused_attn_at.self_attention._INTERCEPTORS
    at = fused_attn_at.SelfAttentionAT(torch.nn.Linear(2, 2), "at")
    with pytest.raises(RuntimeError, match="made no call to fused_attn_at.perturbed_attention"):
        at.step(lambda: torch.zeros((), requires_grad=True).sum())
    with pytest.raises(ValueError, match="perturbation must be"):
        fused_attn_at.SelfAttentionAT(model, "word_at")
    with pytest.raises(ValueError, match="layers must hold"):
        fused_attn_at.SelfAttentionAT(model, "at", layers=[-1])
    with pytest.raises(ValueError, match="layers must be None, a call index"):
        fused_attn_at.SelfAttentionAT(model, "at", layers=1.0)
    with pytest.raises(ValueError, match=r"layers=\[\] chooses no attention call"):
        fused_attn_at.SelfAttentionAT(model, "at", layers=[])
    for name, bad in (("eps", -1.0), ("lam", float("nan")), ("lam", "a"), ("eps", True)):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            fused_attn_at.SelfAttentionAT(model, "at", **{name: bad})
    at = fused_attn_at.SelfAttentionAT(model, "at")
    with torch.no_grad(), pytest.raises(RuntimeError, match="call it with gradients enabled"):
        at.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask), y))
    assert not fused_attn_at.self_attention._INTERCEPTORS


@pytest.mark.parametrize("kind", ["at", "iat"])
def test_a_loss_that_reaches_no_perturbed_layer_warns(kind):
    """If the clean loss does not depend on any perturbed call's scores, r = 0 everywhere and L_adv = L_clean:
    the step says so (a loss computed from a detached output, a frozen encoder)."""
    model = make_model()
    ids, mask, y = batch()
    at = fused_attn_at.SelfAttentionAT(model, kind)
    with pytest.warns(RuntimeWarning, match="reached none of the perturbed attention calls"):
        step = at.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask).detach().requires_grad_(), y))
    assert step.adversarial_loss == step.clean_loss
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        at.step(lambda: torch.nn.functional.cross_entropy(model(ids, mask), y))


DDP_SCRIPT = r"""
import json, os, sys, warnings
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_self_attention_training import batch, make_model
import fused_attn_at
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
model = make_model()
ids, mask, y = batch(B=4)
shard = slice(2 * rank, 2 * rank + 2)
ddp = torch.nn.parallel.DistributedDataParallel(model)
at = fused_attn_at.SelfAttentionAT(ddp, {kind!r}, eps=0.8, lam=0.5, layers=[1])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    step = at.step(lambda: torch.nn.functional.cross_entropy(ddp(ids[shard], mask[shard]), y[shard]))
if rank == 0:
    with open({out!r}, "w") as f:
        json.dump({{"grads": [p.grad.flatten().tolist() for p in model.parameters()], "layers": list(step.layers)}}, f)
# DDP's reducer (and its gloo work) must be gone before the group is: torn down the other way round at
# interpreter exit, a worker thread was left running and the process aborted ("terminate called without an
# active exception", seen once in CI)
del at, step, ddp
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("kind", ["at"])
def test_step_under_torchrun_ddp(tmp_path, kind):
    """torchrun, 2 processes on CPU (gloo), each with half the batch: the all-reduced gradient equals the mean
    of the two halves' hand-written steps (clean backward under no_sync, one all-reduce)."""
    out = tmp_path / "grads.json"
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), kind=kind, out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script)], capture_output=True, text=True, timeout=240,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["layers"] == ["layers.1"]
    model = make_model()
    ids, mask, y = batch(B=4)
    halves = [manual_step(model, ids[s], mask[s], y[s], kind, 0.8, 0.5, chosen={1})[1]
              for s in (slice(0, 2), slice(2, 4))]
    for got, a, b in zip(result["grads"], *halves):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), ((a + b) / 2).flatten(),
                                   rtol=1e-9, atol=1e-11)
