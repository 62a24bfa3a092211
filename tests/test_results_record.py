"""The hand-written summary of RESULTS.md quotes numbers of the committed run record (results/runs): the bAbI
eps-probe table must say what the runs' metrics.json say, so an edit or a rerun cannot leave it stale."""
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "results" / "runs"
SUFFIX = "_seed1_batch-size-50_embeddings-glove_epochs-100_hidden-size-32_patience-30"


def _cell(task: str, method: str, eps: str) -> str:
    folder = RUNS / task / (f"{method}_eps{eps}{SUFFIX}" if method != "vanilla" else f"vanilla{SUFFIX}")
    if not (folder / "metrics.json").is_file():
        return "not run"
    test = json.loads((folder / "metrics.json").read_text())["test"]["test"]
    return f"{test['accuracy']:.3f} / {test['correlation']['pearson_mean']:.3f}"


def test_babi_eps_probe_table_matches_the_run_record():
    text = (REPO / "RESULTS.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\s*\| bAbI (\d) \| (attention_\w+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", text,
                      flags=re.M)
    assert len(rows) == 4, rows
    for task, method, *cells in rows:
        expected = [_cell(f"babi{task}", method, eps) for eps in ("0.1", "0.5", "1")]
        expected.append(_cell(f"babi{task}", "vanilla", ""))
        assert [c.strip() for c in cells] == expected, (task, method)
