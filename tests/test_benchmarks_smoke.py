"""The benchmark tooling without timing anything: the ideal byte counts, the case sets, and report.py on a
hand-made pytest-benchmark JSON whose ratios are known. (The benchmarks themselves run in CI as
`pytest benchmarks/ --benchmark-disable --bench-set smoke`.)"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import benchlib  # noqa: E402


def _load_by_path(name: str, path: pathlib.Path):
    # experiments/report.py is imported as `report` by test_sweep.py; a plain `import report` here would let
    # whichever test module runs first shadow the other's module in sys.modules.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_by_path("benchmarks_report", BENCHMARKS / "report.py")


def test_ideal_bytes_by_hand():
    # B=2, T=3, H=4 float32, AT: h 96 B + scores 24 + mask 6 + direction 24 + context 32 + attention 24.
    assert benchlib.ideal_bytes(2, 3, 4, "float32", "at", "fwd") == 96 + 24 + 6 + 24 + 32 + 24
    # backward: dcontext 32 + h 96 + attention 24 + dh 96 + dscores 24.
    assert benchlib.ideal_bytes(2, 3, 4, "float32", "none", "bwd") == 32 + 96 + 24 + 96 + 24
    assert benchlib.ideal_bytes(2, 3, 4, "bfloat16", "none", "fwd") == 48 + 12 + 6 + 16 + 12
    fwdbwd = benchlib.ideal_bytes(64, 256, 256, "float32", "iat", "fwdbwd")
    assert fwdbwd == (benchlib.ideal_bytes(64, 256, 256, "float32", "iat", "fwd")
                      + benchlib.ideal_bytes(64, 256, 256, "float32", "iat", "bwd"))


def test_sets_cover_the_goal_rows_and_smoke_is_small():
    goal = benchlib.make_cases(**benchlib.set_axes("goal"))
    keys = {(c.device, c.dtype, c.shape, c.perturbation, c.mode, c.backend) for c in goal}
    for pert in benchlib.PERTURBATIONS:
        for backend in ("eager", "compile", "cpu"):
            assert ("cpu", "float32", benchlib.GOAL_SHAPE, pert, "fwdbwd", backend) in keys
    assert any(c.T >= benchlib.GOAL_LONG_T and c.backend == "cpu" for c in goal)
    smoke = benchlib.make_cases(smoke=True, **benchlib.set_axes("smoke"))
    assert {c.mode for c in smoke} == set(benchlib.MODES)
    assert {c.perturbation for c in smoke} == set(benchlib.PERTURBATIONS)
    assert len({c.compile_key for c in smoke if c.backend == "compile" and c.device == "cpu"}) <= 2  # seconds each
    full = benchlib.make_cases(**benchlib.set_axes("full"))
    assert len({c.shape for c in full}) == 45
    # Cases of one compile key are consecutive, so each torch.compile graph is built once.
    seen, previous = set(), None
    for c in (c for c in full if c.backend == "compile"):
        if c.compile_key != previous:
            assert c.compile_key not in seen
            seen.add(c.compile_key)
            previous = c.compile_key


def test_parse_shapes_rejects_bad_items():
    assert benchlib.parse_shapes("64x256x256, 1x16x128") == ((64, 256, 256), (1, 16, 128))
    with pytest.raises(ValueError, match="BxTxH"):
        benchlib.parse_shapes("64x256")


def _entry(device, dtype, B, T, H, pert, mode, backend, median):
    info = dict(device=device, dtype=dtype, B=B, T=T, H=H, perturbation=pert, mode=mode, backend=backend,
                ideal_bytes=benchlib.ideal_bytes(B, T, H, dtype, pert, mode))
    return {"group": "g", "name": "n", "extra_info": info, "stats": {"median": median, "rounds": 10, "iterations": 1}}


def _fake_json(tmp_path):
    B, T, H = benchlib.GOAL_SHAPE
    benches = []
    for pert in benchlib.PERTURBATIONS:
        benches += [_entry("cpu", "float32", B, T, H, pert, "fwdbwd", "eager", 6e-3),
                    _entry("cpu", "float32", B, T, H, pert, "fwdbwd", "compile", 3e-3),
                    _entry("cpu", "float32", B, T, H, pert, "fwdbwd", "cpu", 1e-3)]
    # A long case at exactly 40% of a 10 GB/s read bandwidth, and a tiny case where fused loses to eager.
    long_bytes = benchlib.ideal_bytes(64, 1024, 256, "float32", "none", "fwd")
    benches += [_entry("cpu", "float32", 64, 1024, 256, "none", "fwd", "cpu", long_bytes / 4e9),
                _entry("cpu", "float32", 64, 1024, 256, "none", "fwd", "eager", long_bytes / 1e9),
                _entry("cpu", "float32", 1, 16, 128, "none", "fwd", "eager", 10e-6),
                _entry("cpu", "float32", 1, 16, 128, "none", "fwd", "cpu", 20e-6)]
    for method, median in (("vanilla", 0.100), ("attention_at", 0.120), ("word_at", 0.210)):
        benches.append({"group": "s", "name": method, "stats": {"median": median, "rounds": 5, "iterations": 1},
                        "extra_info": {"kind": "training_step", "method": method, "batch": 32, "lengths": "3-50"}})
    raw = {"benchmarks": benches, "datetime": "2026-01-01T00:00:00",
           "machine_info": {"fused_attn_at": {"cpu_count": 2, "threads": 2, "commit": "abc"}},
           "fused_attn_at_bandwidth": {"cpu": {"start": {"read_gbps": 10.0, "copy_gbps": 8.0, "threads": 2},
                                               "end": {"read_gbps": 10.5, "copy_gbps": 8.2}}},
           "fused_attn_at_loadavg": {"start": [0.1, 0.1, 0.1], "end": [0.9, 0.9, 0.5]},
           "fused_attn_at_skipped": [{"test": "t", "reason": "cuda/cuda: no CUDA device here"}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(raw))
    return path


def test_report_goal_rows_from_known_medians(tmp_path):
    res = report.load(_fake_json(tmp_path))
    rows = {goal: (measured, met) for goal, _, measured, met in report.goal_rows(res)}
    assert rows["fused fwd+bwd vs eager, B=64 T=256 H=256, at"] == ("6.00x", "met")
    assert rows["fused fwd+bwd vs compile, B=64 T=256 H=256, iat"] == ("3.00x", "met")
    read_row = next(v for k, v in rows.items() if k.startswith("fused fwd, T >= 1024"))
    assert read_row[0].startswith("40%") and read_row[1] == "NOT met"
    slower = next(v for k, v in rows.items() if k.startswith("no case where fused is slower"))
    assert slower[0].startswith("1 slower; worst 0.50x") and slower[1] == "NOT met"
    assert rows["attention_at training step / vanilla step"] == ("1.20x", "met")


def _tracked_outputs() -> dict:
    """The committed report and plots, by content."""
    paths = [BENCHMARKS / "RESULTS.md", *sorted((BENCHMARKS / "plots").glob("*.png"))]
    return {p: p.read_bytes() for p in paths}


def test_report_writes_markdown_and_plots(tmp_path):
    json_path = _fake_json(tmp_path)
    committed = _tracked_outputs()
    out_dir = tmp_path / "report"
    assert report.main(["--json", str(json_path), "--out", str(out_dir)]) == 0
    assert _tracked_outputs() == committed  # --out leaves the committed RESULTS.md and plots alone
    out, plots = out_dir / "RESULTS.md", out_dir / "plots"
    text = out.read_text()
    assert "## Goals (CPU, float32)" in text and "| word_at |" in text and "2.10x" in text
    assert "no CUDA device here" in text  # skip reasons are reported, not dropped
    assert "Noisy run" not in text
    # Two lengths (T=256, 1024 at B=64 H=256) give one speedup and one bandwidth figure.
    written = sorted(p.name for p in plots.glob("*.png"))
    assert written == ["gbps_vs_T_cpu_float32_B64_H256.png", "speedup_vs_T_cpu_float32_B64_H256.png"]
    assert all((plots / name).stat().st_size > 1000 for name in written)


# ---------------------------------------------------------------------------------------------------------
# A fused backend that crashes fails the benchmark; only an unavailable one is skipped (issue 14, item 11)


@pytest.fixture
def fresh_reasons():
    benchlib.unavailable_reason.cache_clear()
    yield
    benchlib.unavailable_reason.cache_clear()


def test_crashing_backend_is_not_skipped(monkeypatch, fresh_reasons):
    import fused_attn_at
    from fused_attn_at import _backend

    monkeypatch.setattr(_backend, "why_unavailable", lambda backend, device: None)  # "cpu" is available

    def crash(*args, **kwargs):
        raise RuntimeError("kernel crashed")

    monkeypatch.setattr(fused_attn_at, "attention_pool", crash)
    assert benchlib.unavailable_reason("cpu", "cpu", "float32") is None, "a crash must not become a skip reason"
    case = benchlib.Case("cpu", "float32", 2, 3, 4, "at", "fwd", "cpu")
    inputs = benchlib.make_inputs(case)
    with pytest.raises(RuntimeError, match="kernel crashed"):  # so the benchmark case fails
        benchlib.outputs_of(case, benchlib.pool_function(case, None, inputs), inputs)


def test_unavailable_backend_is_skipped_with_its_reason(monkeypatch, fresh_reasons):
    from fused_attn_at import _backend

    monkeypatch.setattr(_backend, "why_unavailable",
                        lambda backend, device: f"{backend} not built here" if backend == "cpu" else None)
    assert benchlib.unavailable_reason("cpu", "cpu", "bfloat16") == "cpu not built here"


def test_report_default_output_is_not_tracked(tmp_path, monkeypatch):
    """Without --out the report goes to benchmarks/out/, which git ignores; --update-committed is what
    rewrites the committed RESULTS.md and plots (here redirected to a temporary benchmarks folder)."""
    import subprocess

    assert report.build_parser().parse_args([]).out is None and report.DEFAULT_OUT == BENCHMARKS / "out"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(report.DEFAULT_OUT / "RESULTS.md")],
                             cwd=BENCHMARKS, capture_output=True)
    assert ignored.returncode == 0, "benchmarks/out/ should be ignored by git"
    json_path = _fake_json(tmp_path)
    monkeypatch.setattr(report, "HERE", tmp_path / "benchmarks")
    assert report.main(["--json", str(json_path), "--update-committed"]) == 0
    assert (tmp_path / "benchmarks" / "RESULTS.md").is_file()
    assert len(list((tmp_path / "benchmarks" / "plots").glob("*.png"))) == 2
    with pytest.raises(SystemExit):
        report.main(["--json", str(json_path), "--update-committed", "--out", str(tmp_path / "x")])


def test_report_run_without_pytest_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "missing_run_requirements", lambda: ["pytest", "pytest_benchmark"])
    monkeypatch.setattr(report, "run_benchmarks", lambda *a: pytest.fail("must not run pytest"))
    with pytest.raises(SystemExit) as exit_:
        report.main(["--run", "--json", str(tmp_path / "goal.json"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and '.[test]' in err and "pytest_benchmark" in err, err
    assert "usage:" not in err


def test_report_run_that_measured_nothing_does_not_say_run_with_run(tmp_path, monkeypatch, capsys):
    """pytest failing before it writes the JSON is reported as that, not as 'run with --run' (which was given)."""
    monkeypatch.setattr(report, "missing_run_requirements", lambda: [])
    monkeypatch.setattr(report, "run_benchmarks", lambda *a: 1)
    json_path = tmp_path / "goal.json"
    assert report.main(["--run", "--json", str(json_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "run with --run" not in err and "pytest exited with 1 and wrote no" in err, err
    assert not (tmp_path / "out").exists()
    # an older JSON at that path is not passed off as this run's measurements
    json_path.write_text(_fake_json(tmp_path).read_text())
    assert report.main(["--run", "--json", str(json_path), "--out", str(tmp_path / "out")]) == 1
    assert "wrote no" in capsys.readouterr().err
