"""experiments/sweep.py --executor ray on a local Ray instance (2 CPUs): the smoke grid gives the same metrics as
the local executor, a Ray worker SIGKILLed mid-run is retried from its checkpoint to the same final metrics, and
two sweeps started at once on one output root train each run once. Skipped (with the reason) without ray:
pip install ".[cluster]". About 2 min on 2 busy cores (each test under a minute), most of it Ray's start and
train.py's imports."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", exc_type=ImportError,
                         reason='ray is not importable (pip install ".[cluster]"): the Ray executor is not tested')

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import sweep  # noqa: E402

SMOKE = sweep.load_grid("smoke")
TIMES = ("seconds", "train_seconds", "train_cpu_seconds", "total_seconds", "total_cpu_seconds")


def comparable(run_dir: Path) -> dict:
    """metrics.json without the wall/CPU times, which differ between runs."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["epochs"] = [{k: v for k, v in e.items() if k not in TIMES} for e in metrics["epochs"]]
    return {k: v for k, v in metrics.items() if k not in TIMES}


def differences(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def local_ray():
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    sweep.start_ray(num_cpus=2, _temp_dir=temp)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def sweep_main(*args) -> int:
    return sweep.main([*map(str, args), "--threads", "1", "--no-progress"])


def test_ray_executor_runs_the_smoke_grid_like_the_local_executor(local_ray, tmp_path, capfd):
    started = time.time()
    assert sweep_main("--grid", "smoke", "--executor", "local", "--jobs", "2", "--out-root", tmp_path / "local") == 0
    local_seconds = time.time() - started
    started = time.time()
    assert sweep_main("--grid", "smoke", "--executor", "ray", "--out-root", tmp_path / "ray") == 0
    ray_seconds = time.time() - started
    err = capfd.readouterr().err
    assert "sweep: 2 done, 0 failed, 0 skipped (local executor" in err
    assert "sweep: 2 done, 0 failed, 0 skipped (ray executor" in err
    for run in SMOKE:
        ray_run, local_run = tmp_path / "ray" / run.name, tmp_path / "local" / run.name
        # on a mismatch, say which numbers differ and which code each run started from (sweep_code.json: the
        # working tree may change under a test when others edit it)
        assert comparable(ray_run) == comparable(local_run), (
            differences(comparable(ray_run), comparable(local_run)),
            [(d / "sweep_code.json").read_text() for d in (ray_run, local_run)])
        assert (json.loads((tmp_path / "ray" / run.name / "config.json").read_text())
                == json.loads((tmp_path / "local" / run.name / "config.json").read_text()))
        assert f"sweep: finished {run.name}: test accuracy " in err
        assert not (tmp_path / "ray" / run.name / sweep.LOCK).exists()
    # finished runs are skipped by the Ray executor as by the local one
    assert sweep_main("--grid", "smoke", "--executor", "ray", "--out-root", tmp_path / "local") == 0
    assert "0 to run" in capfd.readouterr().err
    print(f"smoke grid (2 runs, 2 CPUs): local executor {local_seconds:.1f} s, ray executor {ray_seconds:.1f} s "
          "(local Ray instance already started)")


def test_a_worker_killed_mid_run_is_retried_from_its_checkpoint(local_ray, tmp_path, capfd):
    """... while a run that fails by itself (train.py exits with an error) is reported after one attempt."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"data": {"babi1": "no_such_folder"}, "blocks": [
        {"datasets": ["sst"], "methods": ["vanilla"], "seeds": [1], "args": {
            "epochs": 3, "max-train-examples": 64, "max-eval-examples": 32}},
        {"datasets": ["babi1"], "methods": ["vanilla"], "seeds": [1], "args": {"epochs": 1}}]}))
    run, broken = sweep.load_grid(str(grid))
    killed_dir = tmp_path / "killed" / run.name
    killed = {}

    def kill_the_worker():
        """SIGKILL the Ray worker that holds the run (the lock names it) once epoch 1's checkpoint exists."""
        deadline = time.time() + 240
        while not (killed_dir / "last.pt").exists():
            if time.time() > deadline:
                return
            time.sleep(0.02)
        lock = json.loads((killed_dir / sweep.LOCK).read_text())
        killed["finished already"] = (killed_dir / "metrics.json").exists()
        assert lock["pid"] != os.getpid()
        os.kill(lock["pid"], signal.SIGKILL)
        killed["pid"] = lock["pid"]

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    assert sweep_main("--grid", grid, "--executor", "ray", "--out-root", tmp_path / "killed",
                      "--data-root", tmp_path) == 1
    killer.join(timeout=5)
    assert killed.get("pid") and not killed["finished already"], "the run ended before its worker could be killed"
    err = capfd.readouterr().err
    assert "sweep: 1 done, 1 failed, 0 skipped (ray executor" in err
    assert f"sweep: failed   {broken.name}: train.py exit 2" in err and f"FAILED {broken.name}" in err
    assert (tmp_path / "killed" / broken.name / sweep.LOG).read_text().count(" start on ") == 1
    log = (killed_dir / sweep.LOG).read_text()
    assert log.count(" start on ") == 1 and log.count(" resume on ") == 1, log
    assert f"(pid {killed['pid']})" in log.split(" resume on ")[0]  # the first attempt ran in the killed worker
    assert "resuming" in log.split(" resume on ")[1]  # train.py continued from last.pt

    assert sweep_main("--grid", grid, "--executor", "local", "--out-root", tmp_path / "unkilled",
                      "--datasets", "sst") == 0
    assert comparable(killed_dir) == comparable(tmp_path / "unkilled" / run.name)


def test_two_sweeps_at_once_train_each_run_once(local_ray, tmp_path, capfd):
    """A Ray sweep here and a local sweep in another process, started together on one output root."""
    out = tmp_path / "runs"
    other = subprocess.Popen([sys.executable, str(EXPERIMENTS / "sweep.py"), "--grid", "smoke", "--out-root", str(out),
                              "--jobs", "2", "--threads", "1", "--no-progress"], stderr=subprocess.PIPE, text=True)
    try:
        assert sweep_main("--grid", "smoke", "--executor", "ray", "--out-root", out) == 0
    finally:
        other_err = other.communicate(timeout=300)[1]
    assert other.returncode == 0, other_err
    here = capfd.readouterr().err
    for run in SMOKE:
        log = (out / run.name / sweep.LOG).read_text()
        assert log.count(" start on ") == 1 and " resume on " not in log, log
        assert len((out / run.name / "sweep_code.json").read_text().splitlines()) == 1
        finished_here, finished_there = (f"sweep: finished {run.name}" in text for text in (here, other_err))
        assert finished_here != finished_there, (here, other_err)
        assert is_finished_and_unlocked(out / run.name)


def is_finished_and_unlocked(run_dir: Path) -> bool:
    return sweep.is_finished(run_dir) and not (run_dir / sweep.LOCK).exists()
