"""Issue 15 (reproduction fidelity): default pretrained vectors for every task, the QA/NLI training budget
(patience, resumable), Miyato et al.'s normalised embeddings for the word methods, Sato et al.'s normalised
word-iAT coefficients, the extra importance definitions, the released SST recipe, the rerun grids and the
summary RESULTS.md opens with. Tiny runs only (a few dozen SST sentences, one to a few epochs)."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))

import python_ref  # noqa: E402
from paper import interpret, methods  # noqa: E402
from paper.data import Example, Vocab, load_embeddings, load_task  # noqa: E402
from paper.metrics import attention_gradient_correlation  # noqa: E402
from paper.models import AttentionClassifier  # noqa: E402
from test_models_methods import SMALL, V, make_batch  # noqa: E402

TRAIN = REPO / "experiments" / "train.py"
GLOVE_DIR = REPO / "experiments" / "data" / "glove"
TINY = ["--max-train-examples", "48", "--max-eval-examples", "24", "--batch-size", "16", "--hidden-size", "8",
        "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def script(name: str):
    return importlib.import_module(name)


def run_train(*args, check=True) -> subprocess.CompletedProcess:
    from test_cli import env

    result = subprocess.run([sys.executable, str(TRAIN), *map(str, args)], capture_output=True, text=True,
                            env=env(), timeout=300, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr}")
    return result


def resolved(*argv) -> dict:
    train = script("train")
    parser = train.build_parser()
    return train.resolve_config(parser.parse_args(list(argv)), parser)


# ----------------------------------------------------------------------------------------------- 1. vectors

def test_every_task_defaults_to_the_shipped_glove(tmp_path):
    from paper.training import SHIPPED_GLOVE

    assert SHIPPED_GLOVE.is_file() and SHIPPED_GLOVE.parent == GLOVE_DIR
    assert "top20k" in SHIPPED_GLOVE.name
    for dataset in ("sst", "babi1", "snli", "imdb"):
        extra = [] if dataset == "sst" else ["--data-dir", str(tmp_path)]
        assert resolved("--dataset", dataset, *extra)["embeddings"] == str(SHIPPED_GLOVE), dataset
        assert resolved("--dataset", dataset, "--embeddings", "glove", *extra)["embeddings"] == str(SHIPPED_GLOVE)
        assert resolved("--dataset", dataset, "--embeddings", "none", *extra)["embeddings"] is None


def test_shipped_file_is_the_top_20k_glove_lines_with_attribution():
    import gzip

    with gzip.open(GLOVE_DIR / "glove.6B.50d.top20k.txt.gz", "rt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert len(lines) == 20000
    assert lines[0].split(" ")[0] == "the" and len(lines[0].split(" ")) == 51
    readme = (GLOVE_DIR / "README.md").read_text(encoding="utf-8")
    assert "glove.6B.50d.top20k.txt.gz" in readme and "PDDL" in readme and "Pennington" in readme


def test_for_sst_the_top20k_file_gives_exactly_the_sst_subset_vectors():
    """The design decision (one file for every task) rests on this: SST's default vectors did not change."""
    vocab = Vocab.build_for_task(load_task("sst"))
    found_old, found_new = set(), set()
    old, n_old = load_embeddings(GLOVE_DIR / "glove.6B.50d.sst.txt.gz", vocab, seed=3, found_indices=found_old)
    new, n_new = load_embeddings(GLOVE_DIR / "glove.6B.50d.top20k.txt.gz", vocab, seed=3, found_indices=found_new)
    assert n_old == n_new == len(found_old) > 7000 and found_old == found_new
    assert torch.equal(old, new)


def test_config_records_vectors_and_coverage(tmp_path):
    out = tmp_path / "run"
    run_train("--method", "vanilla", "--epochs", "1", *TINY, "--output-dir", out)
    config = json.loads((out / "config.json").read_text())
    assert config["embeddings"].endswith("glove.6B.50d.top20k.txt.gz")
    assert "GloVe 6B 50d" in config["embeddings_name"]
    coverage = config["embeddings_coverage"]
    assert coverage["words"] == config["embeddings_found"] > 0
    assert coverage["vocabulary_words"] == config["vocab_size"] - 2
    assert 0.5 < coverage["vocabulary_fraction"] < 1.0 and coverage["train_token_fraction"] > coverage["vocabulary_fraction"]
    assert config["embed_size"] == 50


# ----------------------------------------------------------------------------------------------- 2. budget

def test_task_defaults_for_budget_batch_and_hidden(tmp_path):
    babi = resolved("--dataset", "babi1", "--data-dir", str(tmp_path))
    assert (babi["epochs"], babi["patience"], babi["batch_size"], babi["hidden_size"]) == (100, 30, 50, 32)
    snli = resolved("--dataset", "snli", "--data-dir", str(tmp_path))
    assert (snli["epochs"], snli["patience"], snli["batch_size"], snli["hidden_size"]) == (100, 10, 32, 128)
    sst = resolved("--dataset", "sst")
    assert (sst["epochs"], sst["patience"], sst["batch_size"], sst["hidden_size"]) == (8, None, 32, 128)
    assert resolved("--dataset", "babi2", "--data-dir", str(tmp_path), "--patience", "0")["patience"] is None
    assert resolved("--max-epochs", "5", "--patience", "2")["epochs"] == 5


def test_patience_stops_and_survives_resume(tmp_path):
    """lr 1e-12: the dev accuracy never changes after epoch 1, so patience 2 stops after epoch 3. A run cut
    after 2 epochs and resumed must stop at the same epoch with the same metrics (the patience state is in
    last.pt)."""
    common = ["--method", "attention_at", "--lr", "1e-12", "--embeddings", "none", "--embed-size", "8", *TINY]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_train(*common, "--epochs", "20", "--patience", "2", "--output-dir", whole)
    metrics = json.loads((whole / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 3 and metrics["best_epoch"] == 1
    assert metrics["stopped_early"] is True and metrics["patience"] == 2 and metrics["max_epochs"] == 20
    assert json.loads((whole / "config.json").read_text())["patience"] == 2

    run_train(*common, "--epochs", "2", "--patience", "2", "--output-dir", cut)
    first = json.loads((cut / "metrics.json").read_text())
    assert len(first["epochs"]) == 2 and first["stopped_early"] is False
    last = torch.load(cut / "last.pt", weights_only=True)
    assert last["best"]["epoch"] == 1 and last["epochs_without_improvement"] == 1
    (cut / "metrics.json").unlink()  # as if killed before the end
    run_train("--resume", "--epochs", "20", "--output-dir", cut, "--threads", "1", "--no-progress")
    resumed = json.loads((cut / "metrics.json").read_text())
    assert len(resumed["epochs"]) == 3 and resumed["stopped_early"] is True
    assert resumed["test"] == metrics["test"] and resumed["best_dev"] == metrics["best_dev"]


def test_patience_helper():
    from paper.training import patience_exhausted

    assert not patience_exhausted({"epoch": 3}, 12, None)
    assert not patience_exhausted({"epoch": 3}, 12, 10) and patience_exhausted({"epoch": 3}, 13, 10)
    assert not patience_exhausted({"epoch": None}, 0, 1)


# ----------------------------------------------------------------------------------------------- 3. word methods

def test_normalised_embeddings_have_weighted_mean_0_and_variance_1():
    from paper.models import normalize_embeddings

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64) * 3 + 5
    frequency = torch.tensor([0.0, 3, 1, 10, 2, 5, 1], dtype=torch.float64)
    normed = normalize_embeddings(weight, frequency)
    p = frequency / frequency.sum()
    mean = (p[:, None] * normed).sum(0)
    var = (p[:, None] * (normed - mean) ** 2).sum(0)
    assert torch.allclose(mean, torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(var, torch.ones(4, dtype=torch.float64), atol=1e-5)
    # the unweighted moments are not 0 / 1: the weighting matters
    assert not torch.allclose(normed.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-3)


def test_vocab_token_counts():
    vocab = Vocab(["<pad>", "<unk>", "a", "b"])
    counts = vocab.token_counts([Example(tokens=["a", "a", "zz"], label=0, query=["b"]), Example(["b"], 1)])
    assert counts.tolist() == [0.0, 1.0, 2.0, 2.0]


def test_model_reads_normalised_embeddings_in_clean_and_adversarial_pass():
    from paper.models import normalize_embeddings

    torch.manual_seed(0)
    frequency = torch.arange(V, dtype=torch.float32) + 1.0
    model = AttentionClassifier(V, kind="bc", embedding_norm="frequency", word_frequency=frequency, **SMALL)
    batch = make_batch("bc")
    table = model.embedding_table()
    assert torch.equal(table[0], torch.zeros_like(table[0]))  # padding stays zero
    expected = normalize_embeddings(model.embedding.weight, model.word_frequency)
    assert torch.allclose(table[1:], expected[1:])
    assert torch.allclose(model.embed(batch.tokens), table[batch.tokens])
    # the word AT step's clean loss is the model's loss on the normalised embeddings, not on the raw ones
    step = methods.Objective(model, "word_at", eps=0.5)(batch)
    with torch.no_grad():
        clean = model.loss(model(batch).logits, batch)
        raw = model.loss(model(batch, model.embedding(batch.tokens)).logits, batch)
    assert torch.allclose(step.clean_loss, clean) and not torch.allclose(step.clean_loss, raw)
    # gradients reach the raw table through the normalisation
    step.loss.backward()
    assert model.embedding.weight.grad.abs().sum() > 0


def test_word_methods_default_to_normalised_embeddings():
    assert resolved("--method", "word_at")["word_embedding_norm"] == "frequency"
    assert resolved("--method", "word_iat")["word_embedding_norm"] == "frequency"
    assert resolved("--method", "word_iat")["word_iat_norm"] == "coefficients"
    assert resolved("--method", "attention_at")["word_embedding_norm"] == "none"
    assert resolved("--method", "word_at", "--word-embedding-norm", "none")["word_embedding_norm"] == "none"
    assert resolved("--method", "word_iat", "--word-iat-norm", "perturbation")["word_iat_norm"] == "perturbation"


def word_iat_loop(embedded, grad, neighbours, mask, eps):
    """Sato et al. (2018) as their public code computes it, written out: d_tk = (w_k - w_t) / ||w_k - w_t||, the
    coefficient gradients k_tk = <g_t, d_tk>, alpha_t = k_t / ||k_t|| per token over its K neighbours,
    u_t = sum_k alpha_tk d_tk, r_b = eps * u_b / ||u_b|| over the example's valid tokens (SPEC)."""
    B, T, K, E = neighbours.shape
    r = torch.zeros(B, T, E, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            d = [(neighbours[b, t, j] - embedded[b, t]).double() for j in range(K)]
            d = [x / x.norm() for x in d]
            k = [float(grad[b, t].double() @ x) for x in d]
            norm_k = sum(v * v for v in k) ** 0.5
            for j in range(K):
                r[b, t] += k[j] / norm_k * d[j]
        r[b] = eps * r[b] / r[b].norm()
    return r


def test_word_iat_coefficients_match_the_loop_definition():
    g = torch.Generator().manual_seed(1)
    B, T, K, E = 3, 5, 4, 6
    embedded = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    grad = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    neighbours = torch.randn(B, T, K, E, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    got = python_ref.word_iat_perturbation(embedded, grad, neighbours, mask, eps=0.7, normalize="coefficients")
    want = word_iat_loop(embedded, grad, neighbours, mask, 0.7)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.all(got[~mask] == 0)
    assert torch.allclose(got.flatten(1).norm(dim=-1), torch.full((B,), 0.7, dtype=torch.float64))
    # not the same as normalising the perturbation alone (the older default): the per-token coefficient norm
    # weighs each token's direction equally, whatever its gradient's size
    old = python_ref.word_iat_perturbation(embedded, grad, neighbours, mask, eps=0.7, normalize="perturbation")
    assert not torch.allclose(old, want, atol=1e-3)
    assert torch.allclose(old.flatten(1).norm(dim=-1), torch.full((B,), 0.7, dtype=torch.float64))


def test_word_iat_step_uses_the_configured_normalisation():
    torch.manual_seed(0)
    model = AttentionClassifier(V, kind="bc", **SMALL)
    batch = make_batch("bc")
    a = methods.Objective(model, "word_iat", eps=1.0, neighbours=3, word_iat_norm="coefficients")(batch)
    b = methods.Objective(model, "word_iat", eps=1.0, neighbours=3, word_iat_norm="perturbation")(batch)
    assert torch.allclose(a.clean_loss, b.clean_loss) and not torch.allclose(a.adversarial_loss, b.adversarial_loss)


# ----------------------------------------------------------------------------------------------- 5. importance

@pytest.mark.parametrize("kind", ["bc", "qa"])
def test_importance_definitions_match_explicit_per_example_gradients(kind):
    torch.manual_seed(0)
    model = AttentionClassifier(V, kind=kind, n_labels=3, **SMALL).double().eval()
    batch = make_batch(kind)
    found, held = interpret.importance_definitions(model, batch)
    assert torch.equal(found["gradient_x_input"], held.importance)
    for b in range(len(batch.tokens)):
        one = type(batch)(*[x[b:b + 1] if isinstance(x, torch.Tensor) else x for x in batch])
        e = model.embed(one.tokens).detach().requires_grad_(True)
        y = model.predicted_probability(model(one, e).logits).sum()  # full model: attention not held
        (g,) = torch.autograd.grad(y, e)
        n = int(one.mask.sum())
        norm = g[0, :n].norm(dim=-1)
        gxi = (g[0, :n] * e[0, :n].detach()).sum(-1).abs()
        # a row whose y does not depend on its tokens (one allowed answer: y = 1) has importance 0, not 0/0
        assert torch.allclose(found["gradient_norm"][b, :n], norm / norm.sum() if norm.sum() > 0 else norm)
        assert torch.allclose(found["gradient_x_input_through_attention"][b, :n], gxi / gxi.sum() if gxi.sum() > 0 else gxi)
        assert torch.all(found["gradient_norm"][b, n:] == 0)
    # holding the attention constant changes the answer (the two gradient x input definitions differ)
    assert not torch.allclose(found["gradient_x_input"], found["gradient_x_input_through_attention"])


def test_kendall_is_jain_and_wallace_mean_of_per_instance_kendalltau():
    g = np.random.default_rng(0)
    att = [g.random(n) for n in (4, 7, 9)]
    imp = [g.random(n) for n in (4, 7, 9)]
    result = attention_gradient_correlation(att, imp)
    want = np.mean([scipy.stats.kendalltau(a, i)[0] for a, i in zip(att, imp)])
    assert result["kendall_mean"] == pytest.approx(want)


def test_metrics_and_evaluate_write_every_definition(tmp_path):
    out = tmp_path / "run"
    run_train("--method", "attention_at", "--epochs", "1", *TINY, "--output-dir", out)
    test = json.loads((out / "metrics.json").read_text())["test"]["test"]
    assert set(test["correlations"]) == set(interpret.IMPORTANCE_DEFINITIONS)
    assert test["correlation"] == test["correlations"]["gradient_x_input"]
    # an older run's metrics.json without the new fields: evaluate.py writes them where report.py reads them
    metrics = json.loads((out / "metrics.json").read_text())
    del metrics["test"]["test"]["correlations"]
    (out / "metrics.json").write_text(json.dumps(metrics))
    from test_cli import env

    subprocess.run([sys.executable, str(REPO / "experiments" / "evaluate.py"), str(out), "--threads", "1"],
                   check=True, capture_output=True, env=env(), timeout=300, cwd=REPO)
    report = script("report")
    from sweep import Run

    root, name = out.parent, out.name
    run = Run("sst", "attention_at", 1, 1.0)
    results = report.Results(root)
    (root / run.name).parent.mkdir(parents=True, exist_ok=True)
    (root / run.name).symlink_to(out)
    m = results.metrics(run)
    for definition in interpret.IMPORTANCE_DEFINITIONS:
        value = report.pearson_by_definition(m, definition)
        assert value == test["correlations"][definition]["pearson_mean"], (definition, name)


# ----------------------------------------------------------------------------------------------- SST recipe

def test_sst_released_recipe():
    ours = load_task("sst")
    released = load_task("sst", recipe="released")
    for split in (released.train, released.dev, released.tests["test"]):
        assert all(len(e.tokens) > 5 for e in split)
        assert all(t.isalnum() or "_" in t for e in split for t in e.tokens)
    assert len(released.train) < len(ours.train) and len(released.dev) < len(ours.dev)
    assert any(len(e.tokens) <= 5 for e in ours.train)
    assert not any("qqq" in e.tokens for e in released.train) and any("qqq" in e.tokens for e in ours.train)
    with pytest.raises(ValueError):
        load_task("sst", recipe="nope")


def test_sst_recipe_switch(tmp_path):
    out = tmp_path / "run"
    run_train("--method", "vanilla", "--sst-recipe", "released", "--epochs", "1", *TINY, "--output-dir", out)
    config = json.loads((out / "config.json").read_text())
    assert config["sst_recipe"] == "released"
    vocab = torch.load(out / "best.pt", weights_only=True)["vocab"]["itos"]
    assert "," not in vocab and "." not in vocab and "qqq" not in vocab
    bad = run_train("--dataset", "babi1", "--data-dir", str(tmp_path), "--sst-recipe", "released", check=False)
    assert bad.returncode == 2 and "--sst-recipe" in bad.stderr


# ----------------------------------------------------------------------------------------------- grids

REPRO_GRIDS = ("repro_babi", "repro_released_iat", "repro_eps_word", "repro_picked_eps", "repro_embeddings",
               "repro_sst_released", "repro_babi_eps", "repro_reruns")


def test_rerun_grids_list_and_name_their_new_settings():
    from sweep import load_grid

    runs = {name: load_grid(name) for name in REPRO_GRIDS}
    # repro_released_iat: vanilla and the released iAT, seeds 1-8 each
    assert len(runs["repro_babi"]) == 3 * 6 * 3 and len(runs["repro_released_iat"]) == 2 * 8
    assert len(runs["repro_eps_word"]) == 16 and len(runs["repro_picked_eps"]) == 9 + 3
    assert len(runs["repro_embeddings"]) == 12 and len(runs["repro_sst_released"]) == 6
    # the small-eps probe: the repro_babi setting but eps, so only eps differs from the eps-1 runs
    babi_setting = {k: v for k, v in runs["repro_babi"][0].args}
    assert len(runs["repro_babi_eps"]) == 2 * 2 * 2
    assert all(dict(r.args) == babi_setting and r.eps in (0.1, 0.5) for r in runs["repro_babi_eps"])
    for run in runs["repro_babi"]:
        args = dict(run.args)
        assert (args["patience"], args["epochs"], args["batch-size"], args["hidden-size"], args["embeddings"]) == \
            (30, 100, 50, 32, "glove")
        if run.method.startswith("word_"):
            assert args["word-embedding-norm"] == "frequency"
    assert {dict(r.args).get("compat") for r in runs["repro_released_iat"] if r.method == "attention_iat"} == {"released"}
    assert all(dict(r.args)["sst-recipe"] == "released" for r in runs["repro_sst_released"])
    assert all(r.eps == 0.5 for r in runs["repro_picked_eps"])
    # the report's views of the reruns: the main grid and the eps grid under the new defaults
    repro_main, repro_eps = load_grid("repro_main"), load_grid("repro_eps")
    assert len(repro_main) == 12 + 6 + 54 + 12 and len(repro_eps) == 24 + 16
    # the reruns' own report: repro_main without SST, the same runs as repro_babi and repro_embeddings
    assert [r.name for r in runs["repro_reruns"]] == [r.name for r in repro_main if r.dataset != "sst"]
    assert {r.name for r in runs["repro_reruns"]} == {r.name for r in runs["repro_babi"] + runs["repro_embeddings"]}
    assert all(dict(r.args).get("word-embedding-norm") == "frequency" for r in repro_main + repro_eps
               if r.method.startswith("word_"))
    # none of them lands in a run directory of the older grids (trained under the old defaults) by accident,
    # except where the settings are truly the same (SST, default vectors unchanged)
    old = {r.name for g in ("main", "eps", "compat") for r in load_grid(g)}
    for name, rs in runs.items():
        for run in rs:
            if run.name in old:
                assert run.dataset == "sst" and not run.method.startswith("word_"), (name, run.name)
    for name in REPRO_GRIDS:
        listed = subprocess.run([sys.executable, str(REPO / "experiments" / "sweep.py"), "--grid", name, "--list"],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert listed.returncode == 0 and len(listed.stdout.splitlines()) == len(runs[name]), listed.stderr


# ----------------------------------------------------------------------------------------------- report summary

def fake_run(root: Path, run, accuracy: float, pearson: float, definitions: dict | None = None):
    folder = root / run.name
    folder.mkdir(parents=True, exist_ok=True)
    test = {"accuracy": accuracy, "correlation": {"pearson_mean": pearson, "pearson_std": 0.1,
                                                  "kendall_mean": pearson / 2, "kendall_std": 0.1},
            "robustness": {"eps": 1.0, "accuracy": accuracy, "attention_tv_mean": 0.1}}
    if definitions is not None:
        test["correlations"] = {k: {"pearson_mean": v} for k, v in definitions.items()}
    (folder / "metrics.json").write_text(json.dumps({"kind": "bc", "test": {"test": test}, "best_dev": {"accuracy": accuracy},
                                                     "best_epoch": 1, "epochs": [{"seconds": 1.0}, {"seconds": 1.0}],
                                                     "total_seconds": 2.0, "total_cpu_seconds": 2.0}))
    (folder / "config.json").write_text("{}")


def test_report_summary_opens_with_each_claims_verdict(tmp_path):
    report = script("report")
    from sweep import Run

    main = [Run("sst", m, 1, None if m == "vanilla" else 1.0) for m in
            ("vanilla", "attention_at", "attention_iat", "attention_rp", "word_at", "word_iat")]
    eps_runs = [Run("sst", m, 1, e) for m in ("attention_at", "word_at") for e in (0.1, 10.0)]
    accuracy = {"vanilla": 0.80, "attention_at": 0.85, "attention_iat": 0.79, "attention_rp": 0.8, "word_at": 0.81,
                "word_iat": 0.8}
    pearson = {"vanilla": 0.7, "attention_at": 0.3, "attention_iat": 0.4, "attention_rp": 0.7, "word_at": 0.6,
               "word_iat": 0.6}
    for run in main:
        norm = {"gradient_x_input": pearson[run.method], "gradient_norm": 0.9 if run.method in report.ADVERSARIAL else 0.5,
                "gradient_x_input_through_attention": 0.1}
        fake_run(tmp_path, run, accuracy[run.method], pearson[run.method], norm if run.method != "word_iat" else None)
    for run, acc in zip(eps_runs, (0.85, 0.84, 0.81, 0.5)):
        fake_run(tmp_path, run, acc, 0.5)
    results = report.Results(tmp_path)
    lines = report.summary(results, main, eps_runs)
    text = "\n".join(lines)
    assert lines[0] == "## Summary"
    rows = [line for line in lines if line.startswith("| 1.") or line.startswith("| 2.") or line.startswith("| 3.")]
    assert len(rows) == 3
    assert "supported: best on 1 of 1 tasks" in rows[0] and "sst attention_at 0.850" in rows[0]
    assert "not supported: above vanilla in 0 of 2 comparisons" in rows[1]
    assert "gradient norm (Simonyan et al.): 2/2" in rows[1] and "1 runs lack it" in rows[1]
    assert "supported" in rows[2] and "at most 0.010" in rows[2] and "at least 0.310" in rows[2]
    assert all(row.count("|") == 5 for row in rows)  # claim | verdict | evidence | what would change it
    assert len(text.splitlines()) < 20  # one screen
    table = report.importance_table(results, main)
    word_iat_row = next(line for line in table if line.startswith("| sst | word_iat |"))
    assert report.MISSING in word_iat_row
    at_row = next(line for line in table if line.startswith("| sst | attention_at |"))
    assert "0.900 (beats vanilla)" in at_row and "0.300 (below vanilla)" in at_row
    assert any("evaluate.py" in line for line in table)


def test_report_pairs_released_iat_with_vanilla_by_seed(tmp_path):
    """Issue 15 item 4: the per-seed differences, their mean and a 95% t interval (here by hand: differences
    0.10, 0.02, 0.06 -> mean 0.06, sd 0.04, half width t(0.975, 2) * 0.04 / sqrt(3) = 0.0994); a seed without
    its partner is left out."""
    report = script("report")
    from sweep import Run

    vanilla = [Run("sst", "vanilla", s, None) for s in (1, 2, 3, 4)]
    released = [Run("sst", "attention_iat", s, 1.0, (("compat", "released"),)) for s in (1, 2, 3)]
    for run, r in zip(vanilla, (0.70, 0.75, 0.72, 0.9)):
        fake_run(tmp_path, run, 0.80, r)
    for run, r in zip(released, (0.80, 0.77, 0.78)):
        fake_run(tmp_path, run, 0.81, r)
    lines = report.released_iat_paired(report.Results(tmp_path), vanilla + released)
    row = next(line for line in lines if line.startswith("| attention-gradient Pearson r |"))
    assert "| 3 (1, 2, 3) |" in row
    assert "+0.060 [-0.039, +0.159]" in row and "includes 0" in row
    accuracy = next(line for line in lines if line.startswith("| test accuracy |"))
    assert "+0.010 [+0.010, +0.010]" in accuracy
    assert any("showcase, not a test set" in line for line in lines)
    assert report.released_iat_paired(report.Results(tmp_path), vanilla[:1] + released[:1]) == []


def test_report_compares_a_rerun_setting_with_its_baseline_by_seed(tmp_path):
    """Issue 15 items 6 and 'Also': the picked-eps and released-recipe tables put each method's reruns next to the
    same method's baseline runs, with the mean paired difference and its 95% t interval (2+ seeds), the single
    difference (1 seed), or n/a (no partner); no finished rerun: no table."""
    report = script("report")
    from sweep import Run

    base = [Run("sst", "attention_at", s, 1.0) for s in (1, 2, 3)] + [Run("sst", "vanilla", 1, None)]
    picked = [Run("sst", "attention_at", s, 0.5) for s in (1, 2, 3)]
    recipe = [Run("sst", "vanilla", 1, None, (("sst-recipe", "released"),)),
              Run("sst", "word_at", 1, 1.0, (("sst-recipe", "released"),))]
    assert report.rerun_comparison(report.Results(tmp_path), picked, base, "picked eps", "eps 1") == []
    for run, r in zip(base, (0.70, 0.75, 0.72, 0.8)):
        fake_run(tmp_path, run, 0.80, r)
    for run, r in zip(picked, (0.80, 0.77, 0.78)):
        fake_run(tmp_path, run, 0.81, r)
    for run in recipe:
        fake_run(tmp_path, run, 0.75, 0.6)
    results = report.Results(tmp_path)
    lines = report.rerun_comparison(results, picked, base, "picked eps", "eps 1")
    assert lines[0].startswith("| method | seeds done | picked eps: test accuracy |")
    row = next(line for line in lines if line.startswith("| attention_at |"))
    assert "| 3/3 |" in row and "+0.010 [+0.010, +0.010]" in row and "+0.060 [-0.039, +0.159]" in row
    lines = report.rerun_comparison(results, recipe, base, "released recipe", "ours")
    vanilla = next(line for line in lines if line.startswith("| vanilla |"))
    assert "-0.050 (seed 1)" in vanilla and "-0.200 (seed 1)" in vanilla
    word_at = next(line for line in lines if line.startswith("| word_at |"))
    assert word_at.endswith("| n/a | n/a |") and "not run" in word_at


def test_report_refuses_to_shrink_a_report_built_from_more_runs(tmp_path):
    """A fresh machine without the run folders must not silently replace RESULTS.md (built from 125 runs) with a
    report of the few runs it has: report.py stops before writing anything, unless --force."""
    report = script("report")
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nGenerated by `python experiments/report.py` on X from 125 finished runs of the 125\n")
    with pytest.raises(SystemExit, match="built from 125 finished runs, but .* holds 3"):
        report.refuse_to_shrink(out, 3, tmp_path, force=False)
    report.refuse_to_shrink(out, 3, tmp_path, force=True)
    report.refuse_to_shrink(out, 125, tmp_path, force=False)
    report.refuse_to_shrink(tmp_path / "absent.md", 0, tmp_path, force=False)
