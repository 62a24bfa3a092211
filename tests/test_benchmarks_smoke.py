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


def _entry(device, dtype, B, T, H, pert, mode, backend, median, p90_over_p50=None):
    info = dict(device=device, dtype=dtype, B=B, T=T, H=H, perturbation=pert, mode=mode, backend=backend,
                ideal_bytes=benchlib.ideal_bytes(B, T, H, dtype, pert, mode))
    if p90_over_p50 is not None:
        info.update(p10=0.95 * median, p50=median, p90=p90_over_p50 * median)
    return {"group": "g", "name": "n", "extra_info": info, "stats": {"median": median, "rounds": 10, "iterations": 1}}


# A flat bandwidth profile: 20 GB/s read and write at every size, so every roofline is bytes / 20 GB/s.
FLAT_GBPS = 20.0


def _flat_profile(gbps=FLAT_GBPS):
    q = {"p10": 0.9 * gbps, "p50": gbps, "p90": 1.1 * gbps}
    return {"threads": 2, "reps": 15, "array_mib": 256, "read_gbps": gbps, "copy_gbps": gbps,
            "sizes": [{"mib": m, "read": q, "write": q, "copy": q} for m in (1, 4, 16, 64, 256)],
            "first_touch": {"mib": 64, "gbps": 0.8, "faults_per_mib": 256, "us_per_fault": 5.0}}


def _goal_floor(pert):
    B, T, H = benchlib.GOAL_SHAPE
    return benchlib.ideal_bytes(B, T, H, "float32", pert, "fwdbwd") / (FLAT_GBPS * 1e9)


def _fake_json(tmp_path):
    B, T, H = benchlib.GOAL_SHAPE
    benches = []
    # none: at 80% of its roofline, 4.5x eager, 2x compile, p90/p50 1.1; at: 50% of its roofline, p90/p50 1.5;
    # iat, rp: 6x eager, 3x compile, at the roofline.
    for pert in benchlib.PERTURBATIONS:
        fused = _goal_floor(pert) / {"none": 0.8, "at": 0.5}.get(pert, 1.0)
        eager, compiled = (4.5, 2.0) if pert == "none" else (6.0, 3.0)
        benches += [_entry("cpu", "float32", B, T, H, pert, "fwdbwd", "eager", eager * fused),
                    _entry("cpu", "float32", B, T, H, pert, "fwdbwd", "compile", compiled * fused),
                    _entry("cpu", "float32", B, T, H, pert, "fwdbwd", "cpu", fused,
                           p90_over_p50=1.5 if pert == "at" else 1.1)]
    # Long cases: fwd at 80% of the 20 GB/s read bandwidth (met), bwd at 40% (not met); a tiny case where fused
    # loses to eager.
    fwd_bytes = benchlib.ideal_bytes(64, 1024, 256, "float32", "none", "fwd")
    bwd_bytes = benchlib.ideal_bytes(64, 1024, 256, "float32", "none", "bwd")
    benches += [_entry("cpu", "float32", 64, 1024, 256, "none", "fwd", "cpu", fwd_bytes / 16e9),
                _entry("cpu", "float32", 64, 1024, 256, "none", "fwd", "eager", fwd_bytes / 1e9),
                _entry("cpu", "float32", 64, 1024, 256, "none", "bwd", "cpu", bwd_bytes / 8e9),
                _entry("cpu", "float32", 1, 16, 128, "none", "fwd", "eager", 10e-6),
                _entry("cpu", "float32", 1, 16, 128, "none", "fwd", "cpu", 20e-6)]
    for method, median in (("vanilla", 0.100), ("attention_at", 0.120), ("word_at", 0.210)):
        benches.append({"group": "s", "name": method, "stats": {"median": median, "rounds": 5, "iterations": 1},
                        "extra_info": {"kind": "training_step", "method": method, "batch": 32, "lengths": "3-50",
                                       "pct": {"p10": 0.9 * median, "p50": median, "p90": 1.2 * median}}})
    # The op breakdown of the 'at' goal case: kernels 2.0 ms of 3.9 ms end-to-end.
    at_e2e = _goal_floor("at") / 0.5
    benches.append({"group": "b", "name": "bd", "stats": {"median": at_e2e, "rounds": 10, "iterations": 1},
                    "extra_info": {"kind": "op_breakdown", "device": "cpu", "dtype": "float32", "B": B, "T": T,
                                   "H": H, "perturbation": "at", "mode": "fwdbwd", "backend": "cpu",
                                   "e2e_pct": {"p10": 0.95 * at_e2e, "p50": at_e2e, "p90": 1.5 * at_e2e},
                                   "ops_pct": {"p10": 1.9e-3, "p50": 2.0e-3, "p90": 2.1e-3},
                                   "ops_fwd_pct": {"p50": 0.7e-3}, "ops_bwd_pct": {"p50": 1.3e-3},
                                   "e2e_rusage": {"minflt": 100.0, "nvcsw": 0.0, "nivcsw": 0.25},
                                   "profile": {"kernel_s": 1.9e-3, "alloc_s": 0.1e-3, "autograd_s": 0.2e-3,
                                               "other_ops_s": 0.05e-3, "profiled_wall_s": 4e-3},
                                   "us_per_fault": 5.0}})
    # The AT step's pooling part: pair-at 1.2x vanilla (met); two_ops-at 2.5x.
    for variant, median in (("vanilla", 2e-3), ("pair-at", 2.4e-3), ("two_ops-at", 5e-3)):
        path, _, pert = variant.partition("-")
        benches.append({"group": "p", "name": variant, "stats": {"median": median, "rounds": 10, "iterations": 1},
                        "extra_info": {"kind": "pair_step", "variant": variant, "path": path,
                                       "perturbation": pert or "none", "B": B, "T": T, "H": H, "backend": "cpu",
                                       "pct": {"p10": 0.9 * median, "p50": median, "p90": 1.1 * median},
                                       "rusage": {"minflt": 3.0}, "profile": {"kernel_s": median / 2}}})
    allocator = {"methods": ["attention_at", "vanilla"], "steps": 200, "passes": 2, "smoke": False, "variants": {
        "glibc": {"variant": "glibc", "what": "glibc malloc, defaults", "max_rss_mib": 500, "methods": {
            "attention_at": {"p10": 0.020, "p50": 0.022, "p90": 0.025, "minflt": 300, "steps": 200},
            "vanilla": {"p10": 0.018, "p50": 0.020, "p90": 0.022, "minflt": 200, "steps": 200}}},
        "jemalloc": {"variant": "jemalloc", "what": "jemalloc 5 (LD_PRELOAD)", "max_rss_mib": 520, "methods": {
            "attention_at": {"p10": 0.018, "p50": 0.020, "p90": 0.021, "minflt": 50, "steps": 200},
            "vanilla": {"p10": 0.017, "p50": 0.019, "p90": 0.020, "minflt": 40, "steps": 200}}},
        "tcmalloc": {"variant": "tcmalloc", "what": "tcmalloc", "absent": "libtcmalloc_minimal.so.4 is not installed"}}}
    # The op alone per allocator: p90/p50 3.0 under glibc's defaults (500 faults per call), 1.2 tuned; the long
    # backward at 40% of the 20 GB/s read bandwidth with dh mmapped fresh, 75% with it reused from the heap.
    long_bwd = benchlib.ideal_bytes(64, 1024, 256, "float32", "none", "bwd")
    op_entries = {"glibc": ({"p10": 0.9e-3, "p50": 1e-3, "p90": 3e-3, "minflt": 500, "nivcsw": 0.1},
                            {"p10": long_bwd / 8e9, "p50": long_bwd / 8e9, "p90": long_bwd / 8e9, "minflt": 540,
                             "nivcsw": 0.2}),
                  "glibc-mallopt": ({"p10": 0.9e-3, "p50": 1e-3, "p90": 1.2e-3, "minflt": 0, "nivcsw": 0.1}, None),
                  "glibc-heap": (None, {"p10": long_bwd / 15e9, "p50": long_bwd / 15e9, "p90": long_bwd / 15e9,
                                        "minflt": 60, "nivcsw": 0.2})}
    for name, (op_none, op_long) in op_entries.items():
        variant = allocator["variants"].setdefault(name, {"variant": name, "what": name, "max_rss_mib": 500,
                                                          "methods": {}})
        if op_none:
            variant["methods"]["op-none"] = op_none
        if op_long:
            variant["methods"]["op-bwd-long"] = op_long
    raw = {"benchmarks": benches, "datetime": "2026-01-01T00:00:00",
           "machine_info": {"fused_attn_at": {"cpu_count": 2, "threads": 2, "commit": "abc"}},
           "fused_attn_at_bandwidth": {"cpu": {"start": _flat_profile(), "end": _flat_profile(21.0)}},
           "fused_attn_at_loadavg": {"start": [0.1, 0.1, 0.1], "end": [0.9, 0.9, 0.5]},
           "fused_attn_at_skipped": [{"test": "t", "reason": "cuda/cuda: no CUDA device here"}],
           "fused_attn_at_extras": {"allocator": allocator}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(raw))
    return path


def test_report_goal_rows_from_known_medians(tmp_path):
    res = report.load(_fake_json(tmp_path))
    rows = {goal: (measured, met, bound) for goal, _, measured, met, bound in report.goal_rows(res)}
    where = "op fwd+bwd, B=64 T=256 H=256, {}, end-to-end p50: "
    # a met and an unmet case of each goal of the shape; an unmet one names what bounds it, a met one nothing
    assert rows[where.format("none") + "% of the roofline at its working set"][:2] == (
        f"80% ({report.fmt_time(_goal_floor('none'))} floor / {report.fmt_time(_goal_floor('none') / 0.8)})", "met")
    measured, met, bound = rows[where.format("at") + "% of the roofline at its working set"]
    assert measured.startswith("50%") and met == "NOT met"
    assert "at 20 GB/s" in bound and "working set" in bound and "kernels alone" in bound and "page faults" in bound
    assert "Python + host 2.83 ms" in bound  # 5.08 ms end-to-end - 1.9 kernel - 0.1 alloc - 0.2 autograd - 0.05
    assert rows[where.format("none") + "vs python_ref eager"] == ("4.50x", "met", "")
    measured, met, bound = rows[where.format("none") + "vs torch.compile(python_ref)"]
    assert (measured, met) == ("2.00x", "NOT met") and "2.50x faster" in bound  # compile / roofline = 2 / 0.8
    assert rows[where.format("iat") + "vs torch.compile(python_ref)"] == ("3.00x", "met", "")
    assert rows[where.format("none") + "p90 / p50"][:2] == ("1.10x", "met")
    measured, met, bound = rows[where.format("at") + "p90 / p50"]
    assert (measured, met) == ("1.50x", "NOT met") and "involuntary context switches" in bound
    long_fwd = next(v for k, v in rows.items() if k.startswith("op fwd, T >= 1024"))
    assert long_fwd[0].startswith("80% (16 of 20 GB/s") and long_fwd[1] == "met"
    long_bwd = next(v for k, v in rows.items() if k.startswith("op bwd, T >= 1024"))
    assert long_bwd[0].startswith("40%") and long_bwd[1] == "NOT met" and "write bandwidth" in long_bwd[2]
    pair = next(v for k, v in rows.items() if k.startswith("pooling part of an attention_at step"))
    assert pair == ("1.20x", "met", "")
    # the same goals in a process of their own per allocator
    tail = "op fwd+bwd, B=64 T=256 H=256, none, end-to-end p90 / p50, own process, "
    measured, met, bound = rows[tail + "glibc's defaults"]
    assert measured.startswith("3.00x") and met == "NOT met" and bound.startswith("500 page faults per call")
    assert rows[tail + "fused_attn_at.tune_glibc_malloc()"][0].startswith("1.20x")
    assert rows[tail + "fused_attn_at.tune_glibc_malloc()"][1] == "met"
    fresh = next(v for k, v in rows.items() if k.startswith("op bwd, B=64 T=1024 H=256 none, own process, glibc's"))
    assert fresh[0].startswith("40% (8 of 20 GB/s") and fresh[1] == "NOT met" and "540 page faults" in fresh[2]
    reused = next(v for k, v in rows.items() if k.startswith("op bwd, B=64 T=1024 H=256 none, own process, tune"))
    assert reused[0].startswith("75% (15 of 20 GB/s") and reused[1] == "met"
    slower = next(v for k, v in rows.items() if k.startswith("no case where fused is slower"))
    assert slower[0].startswith("1 slower; worst 0.50x") and slower[1] == "NOT met"
    assert rows["attention_at training step / vanilla step"][:2] == ("1.20x", "met")


def test_goal_verdicts_flip_at_the_targets():
    assert report._met(0.70, benchlib.GOAL_ROOFLINE_FRACTION) == "met"
    assert report._met(0.69, benchlib.GOAL_ROOFLINE_FRACTION) == "NOT met"
    assert report._met(1.3, benchlib.GOAL_P90_P50, below=True) == "met"
    assert report._met(1.31, benchlib.GOAL_P90_P50, below=True) == "NOT met"
    assert report._met(None, 1.0) == "not measured"


def test_report_renders_the_issue_17_tables(tmp_path):
    res = report.load(_fake_json(tmp_path))
    text = report.render(res, tmp_path / "bench.json", tmp_path / "RESULTS.md", [], "report.py")
    for heading in ("## Roofline per working-set size", "### Where the limit is", "## Kernel vs end-to-end",
                    "## The AT step's pooling part: pair op vs two single ops", "## Allocator", "| what bounds it |"):
        assert heading in text, heading
    assert "| 16 MiB | 18 / 20 / 22 | 18 / 20 / 22 |" in text  # the profile, p10 / p50 / p90
    assert "5 us per fault" in text
    assert "| B=64 T=256 H=256 at fwdbwd | 32.5 MiB | 32.3 MiB / 16.2 MiB | 20 / 20 | 2.54 ms |" in text
    assert "at: the op runs at 50% of its roofline" in text and "4x over eager is within reach" in text
    # kernel vs end-to-end: the percentiles and the measured parts of the difference
    row = next(line for line in text.splitlines() if line.startswith("| B=64 T=256 H=256 at |"))
    assert "1.9 ms / 2 ms / 2.1 ms" in row and "100 (500 us)" in row and "| 0.25 |" in row
    assert "| pair-at | 4 + 1 | 2.16 ms / 2.4 ms / 2.64 ms | 1.20x | 1.2 ms | 1.20x | 3 |" in text
    assert "| two_ops-at | 5 + 4 |" in text and "| 2.50x |" in text
    assert "absent: libtcmalloc_minimal.so.4 is not installed" in text
    assert "jemalloc gave the lowest p50: 1.10x glibc's defaults" in text


def test_roofline_interpolates_between_measured_sizes():
    import bandwidth

    profile = {"sizes": [{"mib": 16, "read": {"p50": 64.0}}, {"mib": 64, "read": {"p50": 16.0}}]}
    assert bandwidth.bandwidth_at(profile, 8 * 2**20, "read") == 64.0  # clamped below
    assert bandwidth.bandwidth_at(profile, 256 * 2**20, "read") == 16.0  # clamped above
    assert bandwidth.bandwidth_at(profile, 32 * 2**20, "read") == pytest.approx(32.0)  # log-log midpoint
    assert bandwidth.bandwidth_at({}, 2**20, "read") is None
    # B=64 T=256 H=256 fwd+bwd: h and dh, 32 MiB (+ the small arrays); forward: h
    ws = benchlib.working_set_bytes(64, 256, 256, "float32", "fwdbwd")
    assert 32 * 2**20 <= ws < 33 * 2**20
    assert benchlib.working_set_bytes(64, 256, 256, "float32", "fwd") < 17 * 2**20
    reads, writes = benchlib.ideal_bytes_split(2, 3, 4, "float32", "none", "bwd")
    assert (reads, writes) == (32 + 96 + 24, 96 + 24)


def test_bandwidth_profile_runs_small():
    import bandwidth

    profile = bandwidth.measure_profile(threads=1, sizes_mib=(0.25, 1), reps=2, first_touch_mib=1)
    assert [s["mib"] for s in profile["sizes"]] == [0.25, 1]
    for s in profile["sizes"]:
        for kind in bandwidth.KINDS:
            assert 0 < s[kind]["p10"] <= s[kind]["p50"] <= s[kind]["p90"]
    assert profile["first_touch"]["gbps"] > 0
    assert benchlib.roofline_seconds(profile, 2, 3, 4, "float32", "at", "fwdbwd") > 0


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


# ------------------------------------------------------------------------- self-attention (issue 18)
def _sa_json(tmp_path):
    """bench_self_attention.py's rows with known medians: the op at 1.2x SDPA (met); the AT step at 2.5x vanilla
    in time (not met) and 1.1x in peak memory growth (met); the materialised AT step at 5x vanilla's memory."""
    benches = []
    for backend, median in (("sdpa", 0.100), ("cpu", 0.120), ("reference", 0.400)):
        benches.append({"group": "o", "name": backend, "stats": {"median": median, "rounds": 10, "iterations": 1},
                        "extra_info": {"kind": "sa_op", "sa_backend": backend, "B": 8, "nh": 4, "T": 512, "d": 64,
                                       "dtype": "float32", "threads": 2,
                                       "pct": {"p10": 0.9 * median, "p50": median, "p90": 1.1 * median}}})
    for variant, median, growth_mib in (("vanilla-cpu", 0.4, 100), ("at-cpu", 1.0, 110),
                                        ("vanilla-reference", 0.8, 300), ("at-reference", 2.0, 500)):
        benches.append({"group": "s", "name": variant, "stats": {"median": median, "rounds": 7, "iterations": 1},
                        "extra_info": {"kind": "sa_step", "variant": variant, "description": f"what {variant} runs",
                                       "B": 2, "T": 1024, "d_model": 256, "heads": 4, "ff": 512, "layers": 2,
                                       "parameters": 1000, "threads": 2,
                                       "pct": {"p10": 0.9 * median, "p50": median, "p90": 1.2 * median},
                                       "memory": {"growth_bytes": growth_mib * 2**20, "source": "VmHWM"}}})
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({"benchmarks": benches, "datetime": "2026-01-01T00:00:00",
                                "machine_info": {"fused_attn_at": {"cpu_count": 2, "threads": 2}}}))
    return path


def test_report_renders_the_self_attention_section(tmp_path):
    res = report.load(_sa_json(tmp_path))
    assert not res["pool"]  # the sa_op rows (they carry a backend) are not taken for attention_pool cases
    rows = {goal: (target, measured, met, bound) for goal, target, measured, met, bound in report.sa_goal_rows(res)}
    op = rows["perturbed_attention fwd+bwd (cpu, perturbation=None) / SDPA fwd+bwd, B=8 nh=4 T=512 d=64"]
    assert op == ("<= 1.5x", "1.20x (120 ms vs 100 ms)", "met", "")
    target, measured, met, bound = rows["AT step (SelfAttentionAT 'at', cpu) / vanilla step, time, 2-layer "
                                        "Transformer, B=2 T=1024"]
    assert (target, measured, met) == ("<= 2.3x", "2.50x (1 s vs 400 ms)", "NOT met")
    assert "2 forwards + 2 backwards" in bound and "200 ms beyond twice vanilla" in bound
    memory = rows["AT step (cpu) / vanilla step, peak memory growth (fresh process), 2-layer Transformer, B=2 T=1024"]
    assert memory == ("<= 1.2x", "1.10x (110 MiB vs 100 MiB)", "met", "")
    assert report._met(1.2, report.SA_GOAL_STEP_MEMORY, below=True) == "met"
    assert report._met(1.21, report.SA_GOAL_STEP_MEMORY, below=True) == "NOT met"

    text = report.render(res, tmp_path / "sa.json", tmp_path / "RESULTS.md", [], "report.py")
    section = text.split("## Self-attention (issue 18)")[1].split("\n## ")[0]
    assert "| cpu | perturbed_attention(backend='cpu', perturbation=None)" in section
    assert "| 108 ms / 120 ms / 132 ms | 1.20x |" in section and "| 4.00x |" in section  # reference / SDPA
    assert "| at-cpu | what at-cpu runs | 900 ms / 1 s / 1.2 s | 2.50x | 110 MiB | 1.10x |" in section
    assert "| at-reference | what at-reference runs | 1.8 s / 2 s / 2.4 s | 5.00x | 500 MiB | 5.00x |" in section
    assert ("grows the peak by 500 MiB, 5.00x vanilla-cpu's, 4.55x at-cpu's, 1.67x its own vanilla's; one float32 "
            "[B,nh,T,T] map is 32 MiB here.") in section
    assert "| AT step (SelfAttentionAT 'at', cpu) / vanilla step, time" in text  # in the Goals table
    # a run without the benchmark says so instead of failing
    empty = report.load(_fake_json(tmp_path))
    assert report.sa_section(empty) == ["Not measured in this run (bench_self_attention.py).", ""]
    assert [r[3] for r in report.sa_goal_rows(empty)] == ["not measured"] * 3


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_iat_memory_script_runs(backend):
    """benchmarks/iat_memory.py (the README's iAT memory numbers) at a tiny size: one line with the time and the
    peak growth; with a 1000-byte iAT limit, the MemoryError line."""
    import os
    import re
    import subprocess

    if sys.platform != "linux":
        pytest.skip("iat_memory.py reads /proc/self/status (Linux only)")
    cmd = [sys.executable, str(BENCHMARKS / "iat_memory.py"), "--backend", backend, "--B", "3", "--heads", "2",
           "--T", "9", "--d", "4"]
    env = {k: v for k, v in os.environ.items() if k != "FUSED_ATTN_AT_IAT_MAX_BYTES"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=True).stdout
    assert re.fullmatch(rf"{backend} B=3 nh=2 T=9 d=4: \d+\.\d\d s, peak growth -?\d+ MiB \(G itself 0 MiB\)\n", out), out
    out = subprocess.run(cmd + ["--repeat", "3", "--heap"], capture_output=True, text=True, timeout=300, env=env,
                         check=True).stdout
    assert re.search(rf"{backend} B=3 nh=2 T=9 d=4: forward median \d+ ms over 3 calls \(heap\)\n$", out), out
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True,
                         env={**env, "FUSED_ATTN_AT_IAT_MAX_BYTES": "1000"}).stdout
    assert out.startswith(f"{backend} B=3 nh=2 T=9 d=4: MemoryError:"), out
