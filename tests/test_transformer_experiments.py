"""experiments/train.py with --encoder transformer (issue 18 item 6) and --hf-model on a tiny local checkpoint
(item 5's code path without real weights; tests/test_minilm.py has the real ones): every method and every
--perturb-layers value through the real CLI on a few SST sentences, checkpoint + --resume equal to an
uninterrupted run, the usage errors, and what --perturb-layers all / self add to the step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_attn_at

from conftest import REPO
from test_cli import comparable, env, run

TRAIN = REPO / "experiments" / "train.py"
EXPERIMENTS = REPO / "experiments"
METHODS = ("vanilla", "word_at", "word_iat", "attention_rp", "attention_at", "attention_iat")
TINY = ["--encoder", "transformer", "--transformer-layers", "1", "--transformer-heads", "2", "--transformer-width",
        "8", "--transformer-ff-size", "8", "--embeddings", "none", "--embed-size", "8", "--max-train-examples", "24",
        "--max-eval-examples", "12", "--batch-size", "8", "--epochs", "1", "--threads", "1", "--no-progress"]


def run_many(argvs: list[list[str]], timeout: int = 600) -> list[int]:
    """train.main(argv) for each argv in ONE subprocess (the real CLI entry point, one interpreter start)."""
    script = ("import json, sys; sys.path.insert(0, %r); import train; "
              "print('RESULT', json.dumps([train.main(a) for a in json.loads(sys.argv[1])]))" % str(EXPERIMENTS))
    result = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], capture_output=True, text=True,
                            env=env(), timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_every_method_and_perturb_layers_value(tmp_path):
    argvs, dirs = [], []
    for method in METHODS:
        for layers in ("pooling", "self", "all"):
            out = tmp_path / f"{method}_{layers}"
            argvs.append([*TINY, "--method", method, "--perturb-layers", layers, "--output-dir", str(out)])
            dirs.append((method, layers, out))
    assert run_many(argvs) == [0] * len(argvs)
    for method, layers, out in dirs:
        config = json.loads((out / "config.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        assert config["encoder"] == "transformer" and config["perturb_layers"] == layers
        assert config["transformer_layers"] == 1 and config["transformer_width"] == 8
        test = metrics["test"]["test"]
        assert 0.0 <= test["accuracy"] <= 1.0 and test["n"] == 12
        assert "pearson_mean" in test["correlation"] and "accuracy" in test["robustness"]
        loss = metrics["epochs"][0]["train_loss"]
        assert loss == loss and loss < 10, (method, layers, loss)
        assert (metrics["epochs"][0]["train_adversarial_loss"] is None) == (method == "vanilla")
        assert (out / "best.pt").is_file() and (out / "heatmaps" / "heatmaps.html").is_file()


@pytest.mark.parametrize("method,layers", [("attention_rp", "self"), ("attention_iat", "all")])
def test_resume_equals_an_uninterrupted_run(tmp_path, method, layers):
    at = TINY.index("--epochs")
    base = TINY[:at] + TINY[at + 2:]
    argv = [*base, "--method", method, "--perturb-layers", layers, "--transformer-dropout", "0.2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    codes = run_many([[*argv, "--epochs", "2", "--output-dir", str(whole)],
                      [*argv, "--epochs", "1", "--output-dir", str(parts)],
                      [*argv, "--epochs", "2", "--output-dir", str(parts), "--resume"]])
    assert codes == [0, 0, 0]
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((parts / "metrics.json").read_text())
    assert comparable(a) == comparable(b)
    checkpoint = torch.load(parts / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["perturb_layers"] == layers


def test_usage_errors(tmp_path):
    result = run(TRAIN, "--perturb-layers", "self", "--output-dir", tmp_path / "a", check=False)
    assert result.returncode == 2 and "--perturb-layers self needs --encoder transformer" in result.stderr
    result = run(TRAIN, "--encoder", "transformer", "--transformer-width", "10", "--transformer-heads", "4",
                 "--output-dir", tmp_path / "b", check=False)
    assert result.returncode == 2 and "multiple of" in result.stderr
    result = run(TRAIN, "--hf-model", str(tmp_path), "--output-dir", tmp_path / "c", check=False)
    assert result.returncode == 2 and "not a Hugging Face checkpoint folder" in result.stderr
    result = run(TRAIN, *TINY, "--output-dir", tmp_path / "d", check=False)
    assert result.returncode == 0
    result = run(TRAIN, *TINY, "--transformer-layers", "2", "--output-dir", tmp_path / "d", "--resume", check=False)
    assert result.returncode == 2 and "--transformer-layers 2 contradicts the saved run (1)" in result.stderr


# ----------------------------------------------------------------------------------------------- in-process

@pytest.fixture(scope="module")
def paper():
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    from paper import data, models, transformer
    return data, models, transformer


def small_model_and_batch(paper, seed=0):
    data, models, transformer = paper
    task = data.load_task("sst", None, max_examples=16)
    vocab = data.Vocab.build_for_task(task)
    torch.manual_seed(seed)
    model = models.AttentionClassifier(len(vocab), embed_size=8, encoder="transformer",
                                       encoder_options={"layers": 2, "heads": 2, "width": 8, "ff_size": 8,
                                                        "dropout": 0.0}).double()
    batch = data.make_batches(task.train[:8], vocab, 8, shuffle=False)[0]
    return model, batch


@pytest.mark.parametrize("kind", ["attention_at", "attention_iat"])
def test_all_adds_the_pooling_perturbation_to_self(paper, kind):
    _, _, transformer = paper
    losses = {}
    for layers in ("pooling", "self", "all"):
        model, batch = small_model_and_batch(paper)
        for eps in (0.0, 2.0):
            model.zero_grad()
            objective = transformer.SelfAttentionObjective(model, kind, perturb_layers=layers, eps=eps, lam=1.0)
            step = objective(batch)
            assert not step.loss.requires_grad  # the objective left d(L_clean + L_adv) in .grad itself
            assert all(p.grad is not None for p in model.encoder.parameters())
            losses[layers, eps] = (float(step.clean_loss), float(step.adversarial_loss))
    clean = losses["pooling", 0.0][0]
    for layers in ("pooling", "self", "all"):  # eps 0: the adversarial pass is the clean pass
        assert losses[layers, 0.0] == pytest.approx((clean, clean), rel=1e-12)
        assert losses[layers, 2.0][0] == pytest.approx(clean, rel=1e-12)
    adv = {layers: losses[layers, 2.0][1] for layers in ("pooling", "self", "all")}
    assert adv["pooling"] > clean and adv["self"] > clean and adv["all"] > clean  # adversarial: the loss rises
    assert adv["all"] != pytest.approx(adv["self"], rel=1e-9)  # all = self + the pooling perturbation
    assert adv["all"] != pytest.approx(adv["pooling"], rel=1e-9)


def test_self_perturbs_every_self_attention_layer(paper):
    _, _, transformer = paper
    model, batch = small_model_and_batch(paper)
    objective = transformer.SelfAttentionObjective(model, "attention_at", perturb_layers="self", eps=1.0, lam=1.0)
    objective(batch)
    step = objective.self_at.step(lambda: model.loss(model(batch).logits, batch))
    names = step.layers
    assert names == ("encoder.layers.0.attention", "encoder.layers.1.attention")


# ----------------------------------------------------------------------------------------------- --hf-model PATH

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny BERT with a word-piece tokenizer over the first SST sentences' words, saved locally."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install "
                                       "'.[transformers]' to test --hf-model")
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    from paper import data

    folder = tmp_path_factory.mktemp("tiny_bert")
    task = data.load_task("sst", None, max_examples=40)
    words = sorted({w for split in (task.train, task.dev, *task.tests.values()) for e in split for w in e.tokens})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    cfg = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=16, max_position_embeddings=128,
                                  num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def test_hf_model_path_every_method_and_resume(tmp_path, tiny_checkpoint):
    common = ["--hf-model", str(tiny_checkpoint), "--max-train-examples", "16", "--max-eval-examples", "8",
              "--batch-size", "8", "--threads", "1", "--no-progress", "--lr", "1e-3"]
    argvs = [[*common, "--method", m, "--epochs", "1", "--output-dir", str(tmp_path / m)] for m in METHODS]
    argvs += [[*common, "--method", "attention_iat", "--epochs", "2", "--output-dir", str(tmp_path / "whole")],
              [*common, "--method", "attention_iat", "--epochs", "1", "--output-dir", str(tmp_path / "parts")],
              [*common, "--method", "attention_iat", "--epochs", "2", "--output-dir", str(tmp_path / "parts"),
               "--resume"]]
    assert run_many(argvs) == [0] * len(argvs)
    for m in METHODS:
        config = json.loads((tmp_path / m / "config.json").read_text())
        test = json.loads((tmp_path / m / "metrics.json").read_text())["test"]["test"]
        assert config["encoder"] == "hf" and config["hf_model_path"] == str(tiny_checkpoint.resolve())
        assert test["n"] == 8 and set(test["correlations"]) == {"gradient_x_input_through_attention", "gradient_norm"}
        assert test["robustness"]["eps"] == config["eps"]
        assert json.loads((tmp_path / m / "metrics.json").read_text())["epochs"][0]["train_loss"] < 10
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "parts" / "metrics.json").read_text())
    assert comparable(a) == comparable(b)
    result = run(TRAIN, *common, "--perturb-layers", "pooling", "--output-dir", tmp_path / "x", check=False)
    assert result.returncode == 2 and "no pooling attention" in result.stderr


@pytest.mark.parametrize("method", ["word_at", "word_iat"])
def test_hf_word_perturbation_in_standardised_coordinates(tiny_checkpoint, method):
    """--word-embedding-norm frequency on an --hf-model: eps is the norm in e_bar = e / sd coordinates (sd the
    training-set frequency-weighted per-dimension spread), the model still reads the raw rows plus sd * r_bar.
    Checked against an independent numpy sd and, for word AT, against its defining property: r maximises <g, r>
    over the ellipsoid ||r / sd|| = eps, whose maximum is eps * ||sd * g|| (Cauchy-Schwarz)."""
    import numpy as np

    from paper import data, hf_finetune

    vocab = hf_finetune.WordPieceVocab(str(tiny_checkpoint))
    task = data.load_task("sst", None, max_examples=40)
    torch.manual_seed(0)
    model = hf_finetune.HFClassifier(str(tiny_checkpoint), vocab.special).double()
    with torch.no_grad():  # a spread that differs per dimension, so sd is not a constant that eps could absorb
        model.embedding_table().mul_(torch.linspace(0.2, 3.0, model.embedding_table().shape[1],
                                                    dtype=torch.float64))
    batch = data.make_batches(task.train[:6], vocab, 6, shuffle=False)[0]
    eps = 0.7
    standardised = hf_finetune.make_objective(model, {"method": method, "eps": eps, "lam": 1.0,
                                                      "word_embedding_norm": "frequency",
                                                      "word_iat_norm": "coefficients"}, None, vocab, task)
    raw = hf_finetune.make_objective(model, {"method": method, "eps": eps, "lam": 1.0, "word_embedding_norm": "none",
                                             "word_iat_norm": "coefficients"}, None, vocab, task)
    counts = vocab.token_counts(task.train).numpy()
    counts[vocab.special] = 0
    table = model.embedding_table().detach().numpy()
    mean = np.average(table, axis=0, weights=counts)
    want_sd = np.sqrt(np.average((table - mean) ** 2, axis=0, weights=counts) + 1e-6)
    sd = standardised.embedding_scale()
    np.testing.assert_allclose(sd.numpy()[0], want_sd, rtol=1e-10)
    assert sd.max() / sd.min() > 5

    pieces = hf_finetune.word_piece_mask(batch, model.special)
    embedded = model.embed(batch.tokens)
    (grad,) = torch.autograd.grad(model.loss(model.run(batch, embedded)[0], batch), embedded)
    r = standardised.word_perturbation(embedded, grad, batch.tokens, pieces)  # [B, T, E]
    r_raw = raw.word_perturbation(embedded, grad, batch.tokens, pieces)
    assert (r[~pieces] == 0).all()
    torch.testing.assert_close((r / sd).flatten(1).norm(dim=1), torch.full((6,), eps, dtype=torch.float64))
    torch.testing.assert_close(r_raw.flatten(1).norm(dim=1), torch.full((6,), eps, dtype=torch.float64))
    if method == "word_at":
        g = grad * pieces[..., None]  # the word pieces' gradient: [CLS]/[SEP] are not perturbed
        torch.testing.assert_close((g * r).flatten(1).sum(1), eps * (g * sd).flatten(1).norm(dim=1))
    else:  # each token's r_bar lies in the span of its standardised neighbour directions
        neighbours = model.embedding_table().detach()[standardised._neighbours[batch.tokens]]  # [B, T, K, E]
        directions = (neighbours - embedded.detach()[:, :, None]) / sd  # [B, T, K, E]
        b, t = torch.nonzero(pieces)[0]
        coef = torch.linalg.lstsq(directions[b, t].T, (r / sd)[b, t]).solution
        torch.testing.assert_close(directions[b, t].T @ coef, (r / sd)[b, t])
    assert not torch.allclose(r, r_raw)


def test_hf_word_embedding_norm_defaults_and_errors(tmp_path, tiny_checkpoint):
    common = ["--hf-model", str(tiny_checkpoint), "--max-train-examples", "8", "--max-eval-examples", "4",
              "--batch-size", "8", "--threads", "1", "--no-progress", "--epochs", "1"]
    result = run(TRAIN, *common, "--method", "attention_at", "--word-embedding-norm", "frequency",
                 "--output-dir", tmp_path / "x", check=False)
    assert result.returncode == 2 and "perturbs no embedding" in result.stderr
    argvs = [[*common, "--method", "word_at", "--output-dir", str(tmp_path / "w")],
             [*common, "--method", "word_at", "--word-embedding-norm", "none", "--output-dir", str(tmp_path / "n")],
             [*common, "--method", "attention_rp", "--output-dir", str(tmp_path / "a")]]
    assert run_many(argvs) == [0, 0, 0]
    norms = [json.loads((tmp_path / d / "config.json").read_text())["word_embedding_norm"] for d in "wna"]
    assert norms == ["frequency", "none", "none"]


def test_hf_chosen_attention_attack_and_optimizer(tiny_checkpoint):
    """What the MiniLM table reports, recomputed independently on a tiny BERT: the chosen map is the last layer's
    [CLS] row of the eager attention, averaged over heads, kept at the word pieces and renormalised; attacked()
    is the adversarial pass of an AT step over every layer's map (its logits differ from the clean ones); the
    optimizer is AdamW with no weight decay on biases and LayerNorm weights; loading never reaches a hub."""
    import transformers

    from paper import data, hf_finetune

    vocab = hf_finetune.WordPieceVocab(str(tiny_checkpoint))
    task = data.load_task("sst", None, max_examples=40)
    model = hf_finetune.HFClassifier(str(tiny_checkpoint), vocab.special).double().eval()
    batch = data.make_batches(task.train[:5], vocab, 5, shuffle=False)[0]
    assert (~batch.mask).any()  # padded
    eager = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tiny_checkpoint), num_labels=2, local_files_only=True, attn_implementation="eager").double().eval()
    with torch.no_grad():
        logits, chosen = model.run(batch, attention=True)
        out = eager(input_ids=batch.tokens, attention_mask=batch.mask.long(), output_attentions=True)
    pieces = hf_finetune.word_piece_mask(batch, vocab.special)
    row = out.attentions[-1][:, :, 0, :].mean(1) * pieces
    torch.testing.assert_close(chosen, row / row.sum(-1, keepdim=True))
    torch.testing.assert_close(logits, out.logits[:, 1] - out.logits[:, 0])
    assert (chosen[~pieces] == 0).all() and (pieces.sum(-1) < batch.mask.sum(-1)).all()  # [CLS]/[SEP] left out

    adv_logits, adv_chosen = hf_finetune.attacked(model, batch, eps=1.0)
    assert all(p.grad is None for p in model.parameters())
    at = fused_attn_at.SelfAttentionAT(model.hf, "at", eps=1.0, lam=1.0)
    step = at.step(lambda: (lambda o: (model.loss(o[0], batch), o))(model.run(batch, attention=True)))
    assert len(step.layers) == 2
    torch.testing.assert_close(adv_logits, step.adversarial_output[0].detach())
    torch.testing.assert_close(adv_chosen, step.adversarial_output[1].detach())
    assert not torch.allclose(adv_logits, logits)

    optimizer = hf_finetune.make_optimizer(model, {"lr": 2e-5, "weight_decay": 1e-5})
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 2e-5
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"bias", "weight"}
    assert all(("LayerNorm" in names[id(p)]) or names[id(p)].endswith("bias") for p in no_decay["params"])


def test_objectives_refuse_torchrun(paper, tiny_checkpoint):
    """--perturb-layers self/all and --hf-model run their own backward passes and refuse a world size > 1 with a
    UsageError (README: single process only)."""
    _, _, transformer = paper
    from paper import hf_finetune
    from paper.training import UsageError

    model, _ = small_model_and_batch(paper)
    with pytest.raises(UsageError, match="not wired for torchrun"):
        transformer.SelfAttentionObjective(model, "attention_at", perturb_layers="self", eps=1.0, lam=1.0,
                                           world_size=2)
    vocab = hf_finetune.WordPieceVocab(str(tiny_checkpoint))
    hf = hf_finetune.HFClassifier(str(tiny_checkpoint), vocab.special)
    with pytest.raises(UsageError, match="not wired for torchrun"):
        hf_finetune.HFObjective(hf, "attention_at", eps=1.0, lam=1.0, world_size=2)


def test_transformer_defaults_are_the_readmes():
    """`--encoder transformer` alone resolves to the sizes the README lists (2 layers, 4 heads, width 128, ff 256,
    dropout 0.1) and --perturb-layers pooling."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    import train

    parser = train.build_parser()
    config = train.resolve_config(parser.parse_args(["--encoder", "transformer"]), parser)
    assert {k: config[k] for k in ("transformer_layers", "transformer_heads", "transformer_width",
                                   "transformer_ff_size", "transformer_dropout", "perturb_layers")} == {
        "transformer_layers": 2, "transformer_heads": 4, "transformer_width": 128, "transformer_ff_size": 256,
        "transformer_dropout": 0.1, "perturb_layers": "pooling"}
