"""experiments/train.py and evaluate.py end to end, in subprocesses, on small SST subsets: the run directory,
evaluation of a saved run, resume after SIGKILL, torchrun with two CPU processes, and bad input."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fused_attn_at
from conftest import REPO

TRAIN = REPO / "experiments" / "train.py"
EVALUATE = REPO / "experiments" / "evaluate.py"
# Small and fast, but the real pipeline: embedded SST, BiLSTM, additive attention, attention AT.
SMALL = ["--method", "attention_at", "--embeddings", "none", "--embed-size", "16", "--hidden-size", "16",
         "--max-train-examples", "96", "--max-eval-examples", "40", "--batch-size", "16", "--epochs", "3",
         "--threads", "1", "--no-progress"]


def env() -> dict:
    """The subprocesses import fused_attn_at from where this test process found it (the installed package,
    or a source checkout on PYTHONPATH during development)."""
    environ = dict(os.environ)
    package_parent = str(Path(fused_attn_at.__file__).resolve().parents[1])
    environ["PYTHONPATH"] = os.pathsep.join(p for p in [package_parent, environ.get("PYTHONPATH")] if p)
    environ.setdefault("OMP_NUM_THREADS", "1")
    return environ


def run(*args, check=True, timeout=180) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env(),
                            timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def comparable(metrics: dict) -> dict:
    """metrics.json without the wall/CPU times, which differ between runs."""
    epochs = [{k: v for k, v in e.items() if k != "seconds"} for e in metrics["epochs"]]
    return {"epochs": epochs, "best_epoch": metrics["best_epoch"], "best_dev": metrics["best_dev"],
            "test": metrics["test"]}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "small"
    run(TRAIN, *SMALL, "--output-dir", out)
    return out


def test_help_explains_every_flag(capsys):
    assert main_exit_code(script("train"), ["--help"]) == 0
    text = capsys.readouterr().out
    parser_flags = ["--method", "--dataset", "--data-dir", "--embeddings", "--encoder", "--attention", "--eps",
                    "--lam", "--compat", "--robustness-eps", "--epochs", "--batch-size", "--lr", "--weight-decay",
                    "--dropout", "--seed", "--embed-size", "--hidden-size", "--cnn-channels", "--kernel-sizes",
                    "--decoder-size", "--output-dir", "--resume", "--device", "--threads", "--max-train-examples",
                    "--max-eval-examples", "--no-progress"]
    for flag in parser_flags:
        assert flag in text, flag
    for method in ("vanilla", "word_at", "word_iat", "attention_rp", "attention_at", "attention_iat"):
        assert method in text
    for action in script("train").build_parser()._actions:  # every flag carries a help text
        assert action.help, action.option_strings


def test_run_directory(finished_run):
    out = finished_run
    for name in ("config.json", "metrics.json", "best.pt", "last.pt", "heatmaps/heatmaps.html", "heatmaps/heatmaps.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp"))
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "attention_at" and config["dataset"] == "sst" and config["epochs"] == 3
    assert config["batch_size"] == 16 and config["lr"] == 1e-3 and config["weight_decay"] == 1e-5
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert 1 <= metrics["best_epoch"] <= 3
    # train.py's default on the CPU: glibc's malloc tuned (fused_attn_at.tune_glibc_malloc)
    assert metrics["malloc"] == ("tuned" if fused_attn_at.cpu_allocator.glibc_version() else
                                 "as-is (the C library is not glibc)")
    test = metrics["test"]["test"]
    assert test["n"] == 40 and 0.0 <= test["accuracy"] <= 1.0
    assert {"accuracy", "f1", "roc_auc", "correlation", "robustness"} <= set(test)
    corr = test["correlation"]
    assert corr["n"] > 0 and -1 <= corr["pearson_mean"] <= 1 and corr["pearson_std"] >= 0
    assert {"kendall_mean", "kendall_std"} <= set(corr)
    # no --eps: attention_at's default picked on the SST dev set, also the size of the robustness attack
    assert config["eps"] == 0.5 and test["robustness"]["eps"] == 0.5
    assert 0 <= test["robustness"]["attention_tv_mean"] <= 1
    html = (out / "heatmaps" / "heatmaps.html").read_text()
    assert "attention" in html and "gradient x input" in html
    # Checkpoints load with weights_only=True (plain data: vocabulary and config as lists/dicts).
    best = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert best["epoch"] == metrics["best_epoch"] and last["epoch"] == 3
    assert best["vocab"]["itos"][:2] == ["<pad>", "<unk>"] and best["config"]["method"] == "attention_at"
    assert {"torch", "shuffle", "noise"} <= set(last["rng"]) and "state" in last["optimizer"]


def test_evaluate_reproduces_the_test_metrics(finished_run):
    result = json.loads(run(EVALUATE, finished_run, "--threads", "1").stdout)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert result["best_epoch"] == metrics["best_epoch"]
    got, want = result["test"]["test"], metrics["test"]["test"]
    for key in ("accuracy", "f1", "roc_auc"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    for key in ("pearson_mean", "kendall_mean"):
        assert got["correlation"][key] == pytest.approx(want["correlation"][key], abs=1e-9)
    assert (finished_run / "evaluation.json").is_file()


def test_resume_after_sigkill_gives_the_same_metrics(finished_run, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(TRAIN), *SMALL, "--output-dir", str(out)], env=env(),
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 150
    while not (out / "last.pt").exists():  # the first checkpoint (os.replace makes it appear complete)
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 150 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    killed_at = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert killed_at < 3 and not (out / "metrics.json").exists(), "the run ended before it could be killed"
    run(TRAIN, "--resume", "--output-dir", out, "--threads", "1", "--no-progress")
    resumed = json.loads((out / "metrics.json").read_text())
    uninterrupted = json.loads((finished_run / "metrics.json").read_text())
    assert comparable(resumed) == comparable(uninterrupted)


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    args = [a for a in SMALL if a not in ("--threads", "1")]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(TRAIN), *args, "--epochs", "2", "--output-dir", str(out), "--device", "cpu"],
        capture_output=True, text=True, env=env(), timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["ddp_replicas_identical"] is True  # the gradients were averaged across the processes
    assert {"accuracy", "f1", "roc_auc", "correlation", "robustness"} <= set(metrics["test"]["test"])
    assert (out / "best.pt").is_file() and (out / "heatmaps" / "heatmaps.png").is_file()


def script(name: str):
    """experiments/<name>.py imported as a module, for in-process calls of its main()."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def main_exit_code(module, argv) -> int:
    try:
        return module.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's errors
        return exit_.code


BAD_INPUT = [
    (["--dataset", "nosuchtask"], "invalid choice: 'nosuchtask'"),
    (["--method", "nosuchmethod"], "invalid choice: 'nosuchmethod'"),
    (["--eps", "-0.5"], "--eps: must be a finite number >= 0"),
    (["--lam", "nan"], "--lam: must be a finite number >= 0"),
    (["--dataset", "imdb"], "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"),
    (["--dataset", "snli", "--data-dir", "/nonexistent/snli"], "https://nlp.stanford.edu/projects/snli/snli_1.0.zip"),
    (["--method", "word_at", "--compat", "released"], "--compat released applies to"),
    (["--embeddings", "/nonexistent/glove.txt"], "no such file"),
    (["--resume"], "--resume needs --output-dir"),
]


@pytest.mark.parametrize("args,expected", BAD_INPUT)
def test_bad_input_is_a_clean_error(args, expected, capsys):
    code = main_exit_code(script("train"), args)
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err


def test_bad_input_in_a_real_process(tmp_path):
    """The same errors from the command line: one line of message, exit status 2, no traceback."""
    for args, expected in [(["--eps", "-1"], "--eps: must be a finite number >= 0"),
                           (["--dataset", "agnews", "--data-dir", tmp_path], "https://s3.amazonaws.com/fast-ai-nlp/ag_news_csv.tgz")]:
        result = run(TRAIN, *args, "--output-dir", tmp_path / "out", check=False, timeout=120)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_missing_files_in_data_dir_name_the_download_and_layout(tmp_path, capsys):
    code = main_exit_code(script("train"), ["--dataset", "agnews", "--data-dir", tmp_path, "--output-dir", tmp_path / "out"])
    err = capsys.readouterr().err
    assert code == 2 and "https://s3.amazonaws.com/fast-ai-nlp/ag_news_csv.tgz" in err
    assert "train.csv" in err  # the layout expected


def test_refuses_to_overwrite_a_run_and_resume_needs_one(finished_run, tmp_path, capsys):
    train = script("train")
    assert main_exit_code(train, [*SMALL, "--output-dir", finished_run]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main_exit_code(train, ["--resume", "--output-dir", tmp_path / "empty"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main_exit_code(script("evaluate"), [tmp_path / "empty"]) == 2
    assert "best.pt" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- first contact

def _truncated_copy_of_sst(tmp_path, split) -> Path:
    """The embedded SST with one split's .gz cut after its first 1000 bytes (a download that stopped early;
    so early that the few examples the small runs read already reach the cut)."""
    folder = tmp_path / "sst"
    folder.mkdir()
    for name in ("train", "dev", "test"):
        data = (REPO / "experiments" / "data" / "sst" / f"{name}.txt.gz").read_bytes()
        (folder / f"{name}.txt.gz").write_bytes(data[:1000] if name == split else data)
    return folder


def _one_clean_line(result, *expected):
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], result.stderr


def test_truncated_gz_is_one_clean_line_in_train(tmp_path):
    data = _truncated_copy_of_sst(tmp_path, "train")
    result = run(TRAIN, *SMALL, "--data-dir", data, "--output-dir", tmp_path / "out", check=False, timeout=120)
    _one_clean_line(result, "train.py: error: data file", str(data / "train.txt.gz"), "truncated or corrupt",
                    "download it again")


def test_truncated_gz_is_one_clean_line_in_evaluate(finished_run, tmp_path):
    data = _truncated_copy_of_sst(tmp_path, "test")
    result = run(EVALUATE, finished_run, "--data-dir", data, "--threads", "1", check=False, timeout=120)
    _one_clean_line(result, "evaluate.py: error: data file", str(data / "test.txt.gz"), "truncated or corrupt")


def test_resume_refuses_options_that_contradict_the_saved_run(finished_run):
    before = (finished_run / "metrics.json").read_bytes()
    result = run(TRAIN, "--resume", "--output-dir", finished_run, "--method", "vanilla", "--lr", "0.01",
                 "--no-progress", check=False, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--method vanilla contradicts the saved run (attention_at)" in result.stderr
    assert "--lr 0.01 contradicts the saved run (0.001)" in result.stderr
    assert (finished_run / "metrics.json").read_bytes() == before  # nothing ran


def test_resume_applies_more_epochs_and_says_so(finished_run, tmp_path):
    out = tmp_path / "extended"
    shutil.copytree(finished_run, out)
    # the saved run's own values, given again, are no conflict; --epochs 4 extends the finished 3-epoch run
    result = run(TRAIN, "--resume", "--output-dir", out, "--method", "attention_at", "--epochs", "4",
                 "--threads", "1", "--no-progress", timeout=180)
    assert "--resume: --epochs 4 (the saved run had 3)" in result.stderr, result.stderr
    assert "contradicts" not in result.stderr
    assert json.loads((out / "config.json").read_text())["epochs"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4]
    # fewer epochs than the run has already finished cannot be applied
    result = run(TRAIN, "--resume", "--output-dir", out, "--epochs", "2", "--no-progress", check=False)
    assert result.returncode == 2 and "--epochs 2" in result.stderr and "already finished 4" in result.stderr


def test_help_shows_one_default_per_option():
    for name in ("train", "evaluate", "report"):
        text = script(name).build_parser().format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        # one chunk per option: its flags line and the indented help lines below it
        chunks = [chunk.split("\n\n")[0] for chunk in re.split(r"\n  (?=-)", text)]
        for chunk in chunks[1:]:
            assert len(re.findall(r"default", chunk, re.IGNORECASE)) <= 1, chunk
    train_help = script("train").build_parser().format_help()
    assert "(default: 0.001)" in train_help  # real defaults are still shown


@pytest.mark.parametrize("name,args,expected", [
    ("train", ["--method", "nosuchmethod"], "invalid choice: 'nosuchmethod'"),
    ("train", ["--eps", "-1"], "--eps: must be a finite number >= 0"),
    ("evaluate", [], "the following arguments are required: run_dir"),
    ("report", ["--nosuchflag"], "unrecognized arguments: --nosuchflag"),
])
def test_argparse_errors_are_one_line_and_a_hint(name, args, expected):
    result = run(REPO / "experiments" / f"{name}.py", *args, check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "usage:" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and expected in lines[0] and lines[0].startswith(f"{name}.py: error: "), result.stderr
    assert "--help" in lines[1], result.stderr


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path):
    """Without --no-progress, stderr redirected to a file gets the per-epoch lines and no tqdm updates."""
    log = tmp_path / "train.log"
    args = [a for a in SMALL if a != "--no-progress"]
    with log.open("w") as handle:
        result = subprocess.run([sys.executable, str(TRAIN), *args, "--epochs", "1", "--output-dir",
                                 str(tmp_path / "out")], stdout=handle, stderr=subprocess.STDOUT, env=env(),
                                cwd=REPO, timeout=180)
    text = log.read_text()
    assert result.returncode == 0, text
    assert "\r" not in text and "it/s" not in text, text[:2000]
    assert "epoch 1: train loss" in text
