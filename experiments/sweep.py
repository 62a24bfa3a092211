#!/usr/bin/env python
"""Run a grid of experiments (datasets x methods x eps x seeds x variants) as separate train.py runs.

    python experiments/sweep.py --grid paper --jobs 1 --threads 2     # everything issue 6 asks for, in priority order
    python experiments/sweep.py --grid main --datasets sst --seeds 1  # a slice of a grid
    python experiments/sweep.py --grid eps --list                     # what the grid holds and what is done
    python experiments/sweep.py --grid paper --executor ray --address HEAD:6379 --out-root /shared/runs  # Ray

Each run trains in its own directory runs/sweep/<dataset>/<method>[_eps<eps>]_seed<seed>[_<flag>-<value>...],
named from its settings only, so the same settings always land in the same directory and a run shared by two
grids is trained once. A run whose metrics.json holds test metrics is finished and skipped; an unfinished one
(last.pt present) is continued with train.py --resume; a failing run is logged and reported at the end
(exit status 1) while the others go on. Every attempt's output is appended to <run dir>/sweep.log. A finished
run's result files (metrics.json, config.json, ...) are also copied to results/runs/<run name>/ (--archive), which
git keeps: a run recorded there is finished on every machine, so a fresh clone continues a sweep where the last
machine left it, and report.py builds its tables from the record.

Executors: --executor local (default) runs train.py subprocesses here, --jobs at a time; --executor ray makes each
run one Ray task (asking for --threads CPUs, and a GPU with --device cuda) on a running cluster (--address) or a
local Ray instance. Both go through the same per-run code (Runner.attempt): claim the run folder (sweep.lock,
created atomically; see the "claims" comment in this file), skip it if finished, train or --resume it, report one line. A Ray task
whose worker dies, or whose train.py is killed, is retried once from last.pt; a second failure is reported.
Any number of sweeps may share one --out-root: each run is trained by one of them.

Grids are JSON files in experiments/grids/ (or any path given to --grid):
    {"description": "...",
     "data": {"babi1": "babi", "snli": {"prepare": "nli_train_from_dev", "source": "snli/...", ...}},
     "blocks": [{"datasets": [...], "methods": [...], "seeds": [...], "eps": [...],
                 "args": {"epochs": 1}, "variants": [{}, {"compat": "released"}]},
                {"grid": "main", "datasets": ["sst"], "seeds": [1]}]}
"data" says which folder under --data-root holds each non-SST task (or how to prepare one); "args" are extra
train.py flags of every run of the block, "variants" a list of flag sets crossed with the rest; a block
{"grid": NAME, ...} takes that grid's runs, filtered by the lists it gives.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

EXPERIMENTS = Path(__file__).resolve().parent
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))
from paper.cli import ArgumentParser, RawDescriptionHelpFormatter  # noqa: E402
from paper.data_types import DataFormatError  # noqa: E402
REPO = EXPERIMENTS.parent
GRIDS = EXPERIMENTS / "grids"
TRAIN = EXPERIMENTS / "train.py"
DEFAULT_OUT = Path("runs") / "sweep"
# The committed record of finished runs: the run folders (checkpoints, logs) live on one machine and are lost with
# it, so a finished run's small result files are copied here, under the run's name, for git to keep. A run found
# here counts as finished on any machine (the sweep skips it, the report reads it).
DEFAULT_ARCHIVE = Path("results") / "runs"
ARCHIVE_FILES = ("metrics.json", "config.json", "evaluation.json", "sweep_code.json", "attention_stats.json")
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
DEFAULT_EPS = 1.0
# vanilla has no perturbation, so eps is not one of its settings (and not part of its run name).
NO_EPS_METHODS = ("vanilla",)
LOCK = "sweep.lock"
LOG = "sweep.log"


class GridError(Exception):
    """A grid file that cannot be read or does not describe runs."""


@dataclass(frozen=True)
class Run:
    dataset: str
    method: str
    seed: int
    eps: float | None  # None for vanilla
    args: tuple = ()  # extra train.py flags as sorted (name, value) pairs
    data: object = field(default=None, compare=False)  # the grid's data spec for this dataset (str or dict)

    @property
    def name(self) -> str:
        """<dataset>/<method>[_eps<eps>]_seed<seed>[_<flag>-<value>...]: a function of the settings only."""
        parts = [self.method]
        if self.eps is not None:
            parts.append(f"eps{self.eps:g}")
        parts.append(f"seed{self.seed}")
        for key, value in self.args:
            text = "-".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            # flag values may hold path separators or spaces; keep names to one safe path component each
            parts.append(re.sub(r"[^A-Za-z0-9.+=-]", "-", f"{key}-{text}"))
        return f"{self.dataset}/{'_'.join(parts)}"

    def train_args(self) -> list[str]:
        argv = ["--dataset", self.dataset, "--method", self.method, "--seed", str(self.seed)]
        if self.eps is not None:
            argv += ["--eps", repr(float(self.eps))]
        for key, value in self.args:
            flag = "--" + key
            if value is True:
                argv.append(flag)
            elif isinstance(value, (list, tuple)):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, str(value)]
        return argv


# ----------------------------------------------------------------------------------------------- grids

def grid_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        return path
    return GRIDS / f"{name_or_path}.json"


def available_grids() -> list[str]:
    return sorted(p.stem for p in GRIDS.glob("*.json"))


def load_grid(name_or_path: str, _seen: tuple = ()) -> list[Run]:
    """The runs of a grid, in its order, without duplicates."""
    path = grid_path(name_or_path)
    if not path.is_file():
        raise GridError(f"grid {name_or_path!r}: no file {path} (named grids: {', '.join(available_grids())})")
    if path.resolve() in _seen:
        raise GridError(f"grid {path} includes itself")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise GridError(f"grid {path}: not valid JSON ({error})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("blocks"), list):
        raise GridError(f"grid {path}: expected an object with a list 'blocks'")
    data = spec.get("data", {})
    runs: list[Run] = []
    for number, block in enumerate(spec["blocks"], start=1):
        where = f"grid {path}, block {number}"
        if not isinstance(block, dict):
            raise GridError(f"{where}: expected an object")
        if "grid" in block:
            included = load_grid(block["grid"], _seen + (path.resolve(),))
            runs += filter_runs(included, datasets=block.get("datasets"), methods=block.get("methods"),
                                seeds=block.get("seeds"), eps=block.get("eps"))
        else:
            runs += expand_block(block, data, where)
    return unique(runs)


def expand_block(block: dict, data: dict, where: str) -> list[Run]:
    unknown = set(block) - {"datasets", "methods", "seeds", "eps", "args", "variants"}
    if unknown:
        raise GridError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("datasets", "methods", "seeds"):
        if not isinstance(block.get(key), list) or not block[key]:
            raise GridError(f"{where}: '{key}' must be a non-empty list")
    eps_values = block.get("eps", [DEFAULT_EPS])
    if not isinstance(eps_values, list) or not eps_values or not all(isinstance(e, (int, float)) for e in eps_values):
        raise GridError(f"{where}: 'eps' must be a non-empty list of numbers")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in block["seeds"]):
        raise GridError(f"{where}: 'seeds' must be integers")
    common = block.get("args", {})
    variants = block.get("variants", [{}])
    if not isinstance(common, dict) or not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise GridError(f"{where}: 'args' must be an object and 'variants' a list of objects")
    runs = []
    # seed outermost: an interrupted sweep has whole seeds done rather than a few seeds of every setting
    for seed in block["seeds"]:
        for dataset in block["datasets"]:
            for variant in variants:
                args = tuple(sorted({**common, **variant}.items()))
                for eps in eps_values:
                    for method in block["methods"]:
                        runs.append(Run(dataset, method, seed, None if method in NO_EPS_METHODS else float(eps),
                                        args, data.get(dataset)))
    return runs


def unique(runs: list[Run]) -> list[Run]:
    seen, kept = set(), []
    for run in runs:
        if run.name not in seen:
            seen.add(run.name)
            kept.append(run)
    return kept


def filter_runs(runs: list[Run], *, datasets=None, methods=None, seeds=None, eps=None) -> list[Run]:
    def keep(run: Run) -> bool:
        return ((datasets is None or run.dataset in datasets) and (methods is None or run.method in methods)
                and (seeds is None or run.seed in seeds)
                and (eps is None or run.eps is None or any(math.isclose(run.eps, e) for e in eps)))
    return [run for run in runs if keep(run)]


# ----------------------------------------------------------------------------------------------- data

def resolve_data_dir(run: Run, data_root: Path, out_root: Path) -> Path | None:
    """The --data-dir of a run: None for the embedded SST, a folder under data_root, or a prepared folder."""
    spec = run.data
    if spec is None:
        if run.dataset == "sst":
            return None
        return data_root / run.dataset
    if isinstance(spec, str):
        return data_root / spec
    if isinstance(spec, dict) and spec.get("prepare") == "nli_train_from_dev":
        return prepare_nli_train_from_dev(data_root / spec["source"], out_root / "data" / f"{run.dataset}_train_from_dev",
                                          dev_fraction=float(spec.get("dev_fraction", 0.15)),
                                          seed=int(spec.get("seed", 16377)))
    raise GridError(f"run {run.name}: unknown data spec {spec!r}")


_prepare_lock = threading.Lock()


def prepare_nli_train_from_dev(source: Path, target: Path, *, dev_fraction: float, seed: int) -> Path:
    """For an NLI corpus whose train split is missing (SNLI here): its dev split, in the e-SNLI line-aligned
    form (s1.dev, s2.dev, labels.dev), becomes train (s1.train, ...) and a held-out dev; test is copied as is.
    The split is by premise (all hypotheses of a premise on the same side), so dev accuracy is not inflated by
    premises seen in training; ``dev_fraction`` of the premises, chosen by paper.data_splits.shuffle_split with
    ``seed``, are held out. The output keeps the original format, so train.py's loader reads it unchanged.
    It is written into a temporary folder renamed to ``target`` at the end, so sweeps on several nodes that
    prepare it at once on a shared filesystem all end with the same complete folder."""
    with _prepare_lock:
        done = target / "PREPARED.json"
        if done.is_file():
            return target
        final, target = target, target.with_name(f".{target.name}.{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        from paper.data_splits import shuffle_split

        names = [f"{stem}.{split}" for split in ("dev", "test") for stem in ("s1", "s2", "labels")]
        missing = [n for n in names if not (source / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{source}: missing {', '.join(missing)} (e-SNLI line-aligned SNLI dev/test)")
        lines = {}
        for n in names:
            try:
                lines[n] = (source / n).read_text(encoding="utf-8").splitlines(keepends=True)
            except UnicodeDecodeError as error:
                raise DataFormatError(source / n, None, f"not UTF-8 text ({error.reason} at byte {error.start})") \
                    from None
        premises = list(dict.fromkeys(line.strip() for line in lines["s1.dev"]))
        train_idx, dev_idx = shuffle_split(len(premises), seed, test_size=dev_fraction)
        held_out = {premises[i] for i in dev_idx}
        side = ["dev" if line.strip() in held_out else "train" for line in lines["s1.dev"]]
        target.mkdir(parents=True, exist_ok=True)
        counts = {}
        for split in ("train", "dev"):
            for stem in ("s1", "s2", "labels"):
                rows = [line for line, s in zip(lines[f"{stem}.dev"], side) if s == split]
                (target / f"{stem}.{split}").write_text("".join(rows), encoding="utf-8")
                counts[split] = len(rows)
        for stem in ("s1", "s2", "labels"):
            (target / f"{stem}.test").write_text("".join(lines[f"{stem}.test"]), encoding="utf-8")
        counts["test"] = len(lines["labels.test"])
        record = {"source": str(source), "split": "by premise", "dev_fraction": dev_fraction, "seed": seed,
                  "premises": len(premises), "examples": counts}
        (target / "PREPARED.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if final.is_dir() and not (final / "PREPARED.json").is_file():  # a partial folder of an older sweep
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(target, final)
        except OSError:
            shutil.rmtree(target, ignore_errors=True)
            if not (final / "PREPARED.json").is_file():
                raise
        return final


# ----------------------------------------------------------------------------------------------- run state

def is_finished(run_dir: Path) -> bool:
    """metrics.json holds test metrics (train.py writes it last, atomically)."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(metrics.get("test"))


def resolve_archive(given: str | None, out_root_given: Path) -> Path | None:
    """The archive folder of an --archive value (None: DEFAULT_ARCHIVE when the run root is DEFAULT_OUT, else
    none; 'none': off), absolute; shared by sweep.py and report.py."""
    archive = given if given is not None else (str(DEFAULT_ARCHIVE) if out_root_given == DEFAULT_OUT else "none")
    if archive == "none":
        return None
    return Path(archive) if Path(archive).is_absolute() else REPO / archive


def archive_run(run_dir: Path, archive_dir: Path) -> bool:
    """Copy a finished run's ARCHIVE_FILES into archive_dir (each atomically, metrics.json last, so an archive
    holding metrics.json is whole); False when the run is not finished."""
    if not is_finished(run_dir):
        return False
    archive_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(ARCHIVE_FILES, key=lambda n: n == "metrics.json"):
        source = run_dir / name
        if source.is_file():
            partial = archive_dir / f".{name}.{os.getpid()}.partial"
            shutil.copyfile(source, partial)
            os.replace(partial, archive_dir / name)
    return True


def finished_where(run: "Run", out_root: Path, archive_root: Path | None) -> str | None:
    """'here' (a finished run folder under out_root), 'archived' (only its archived record), or None."""
    if is_finished(out_root / run.name):
        return "here"
    if archive_root is not None and is_finished(archive_root / run.name):
        return "archived"
    return None


def epochs_done(run_dir: Path) -> int | None:
    """Finished epochs of an unfinished run, from its log; None if it never started."""
    if not (run_dir / "last.pt").is_file():
        return None
    done = 0
    for name in (LOG, "train.log"):
        try:
            done = max([done] + [int(m) for m in re.findall(r"^epoch (\d+):", (run_dir / name).read_text(
                encoding="utf-8", errors="replace"), flags=re.M)])
        except OSError:
            pass
    return done


def result_line(run_dir: Path) -> str:
    """The headline numbers of a finished run: test accuracy and attention/gradient Pearson r of its first
    test set."""
    try:
        tests = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["test"]
        name, test = next(iter(tests.items()))
    except (OSError, ValueError, KeyError, StopIteration, AttributeError):
        return ""
    parts = []
    if isinstance(test.get("accuracy"), (int, float)):
        parts.append(f"{name} accuracy {test['accuracy']:.3f}")
    pearson = (test.get("correlation") or {}).get("pearson_mean")
    if isinstance(pearson, (int, float)):
        parts.append(f"pearson {pearson:.3f}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------- claims
# A run folder is trained by one process at a time. The claim is the file <run dir>/sweep.lock, created with
# O_CREAT | O_EXCL (atomic on a local disk and on NFSv3+/Lustre/GPFS/CephFS), holding JSON: host, pid, the
# sweep's token, the train.py child's pid, the time. Its holder touches it every HEARTBEAT seconds while the run
# trains (a lease). A lock is stale, and is taken over, when
#   - its pid is dead and it was taken on this host, or
#   - it carries this sweep's own token: an earlier attempt of this run by this sweep, which Ray only retries
#     once that attempt's worker is gone, or
#   - it has not been touched for LEASE seconds (default 180, $FUSED_ATTN_AT_SWEEP_LEASE): its holder's node
#     died or lost the filesystem, e.g. the previous Slurm job of a resubmitted sweep. The nodes' clocks must
#     agree to well within LEASE, as NTP keeps them.
# A run found held is reported 'busy'; after its pass the sweep tries its busy runs once more (those whose
# lock has gone stale meanwhile are trained then, those finished by the other holder are skipped).
# Taking over holds a second O_EXCL file (sweep.lock.break) while it re-reads the lock and removes it only if it
# is still the stale one, so two sweeps never both break a lock and both go on.

HOST = socket.gethostname()
LEASE = float(os.environ.get("FUSED_ATTN_AT_SWEEP_LEASE", 180))
HEARTBEAT = min(30.0, LEASE / 10)
BREAK = LOCK + ".break"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def read_lock(run_dir: Path) -> tuple[dict, float] | None:
    """The lock's content and mtime; None if there is no lock. A bare pid (the old format) is read as a lock
    of this host; an empty or unreadable one as {} (a holder between creating and writing it)."""
    path = run_dir / LOCK
    try:
        text, mtime = path.read_text(encoding="utf-8"), path.stat().st_mtime
    except OSError:
        return None
    try:
        info = json.loads(text)
        if not isinstance(info, dict):
            raise ValueError
    except ValueError:
        first = text.split()[:1]
        info = {"pid": int(first[0]), "host": HOST} if first and first[0].isdigit() else {}
    return info, mtime


_held: set[str] = set()  # the lock texts this process holds (a lock of its own pid that is not here is stale)


def stale_reason(info: dict, mtime: float, token: str | None) -> str | None:
    """Why a lock no longer protects a live run; None while its holder may still be training."""
    if not info:
        return None if time.time() - mtime < 10 else "unreadable"
    if token is not None and info.get("token") == token:
        return "an earlier attempt of this sweep"
    if time.time() - mtime > LEASE:
        return f"not refreshed for {time.time() - mtime:.0f} s"
    pid = info.get("pid")
    if info.get("host") == HOST:
        if not isinstance(pid, int) or not pid_alive(pid):
            return f"pid {pid} is dead"
        if pid == os.getpid() and json.dumps(info, sort_keys=True) not in _held:
            return "left by this process"
    return None


def lock_owner(run_dir: Path, token: str | None = None) -> str | None:
    """Who holds the run ('pid N on HOST'), or None if nobody live does."""
    lock = read_lock(run_dir)
    if lock is None or stale_reason(*lock, token) is not None:
        return None
    info = lock[0]
    return f"pid {info.get('pid')} on {info.get('host')}"


def _orphan_gone(info: dict, run_dir: Path, wait: float = 30.0) -> None:
    """The train.py of a dead holder on this host normally died with it (PR_SET_PDEATHSIG); make sure it is
    gone before another one writes the same folder."""
    child = info.get("child")
    if info.get("host") != HOST or not isinstance(child, int):
        return
    def ours() -> bool:
        try:
            return str(run_dir) in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
    deadline = time.time() + wait
    while ours() and time.time() < deadline:
        time.sleep(0.2)
    if ours():
        os.kill(child, signal.SIGKILL)


class Claim:
    """The atomic claim of one run folder; None from Claim.take when a live process holds it."""

    def __init__(self, run_dir: Path, info: dict):
        self.run_dir, self.path, self.info = run_dir, run_dir / LOCK, info
        _held.add(self.text)

    @property
    def text(self) -> str:
        return json.dumps(self.info, sort_keys=True)

    @classmethod
    def take(cls, run_dir: Path, token: str | None = None) -> "Claim | None":
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            info = {"host": HOST, "pid": os.getpid(), "token": token, "child": None,
                    "time": time.strftime("%Y-%m-%d %H:%M:%S")}
            try:
                fd = os.open(run_dir / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                lock = read_lock(run_dir)
                if lock is None:
                    continue  # released meanwhile
                if stale_reason(*lock, token) is None or not cls._break(run_dir, lock):
                    return None
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(json.dumps(info, sort_keys=True) + "\n")
            return cls(run_dir, info)
        return None

    @staticmethod
    def _break(run_dir: Path, stale: tuple[dict, float]) -> bool:
        """Remove a stale lock, unless someone else has replaced it meanwhile."""
        guard = run_dir / BREAK
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > 60:  # a breaker that died in these few lines
                    guard.unlink()
            except OSError:
                pass
            return False
        try:
            now = read_lock(run_dir)
            if now is not None and now[0] == stale[0] and now[1] == stale[1]:
                _orphan_gone(stale[0], run_dir)
                (run_dir / LOCK).unlink()
            return True
        finally:
            guard.unlink(missing_ok=True)

    def update(self, **changes) -> None:
        """Record the child's pid (an atomic replace: the lock never disappears while held)."""
        _held.discard(self.text)
        self.info = {**self.info, **changes}
        _held.add(self.text)
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(self.text + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def refresh(self) -> bool:
        """Renew the lease; False if the lock is no longer this claim's (taken over after a stall > LEASE)."""
        lock = read_lock(self.run_dir)
        if lock is not None and lock[0] != self.info:
            return False
        try:
            os.utime(self.path)
        except OSError:
            pass
        return True

    def release(self) -> None:
        try:
            if read_lock(self.run_dir)[0] == self.info:
                self.path.unlink()
        except (OSError, TypeError):
            pass
        _held.discard(self.text)


def status(run: Run, out_root: Path, archive_root: Path | None = None) -> str:
    run_dir = out_root / run.name
    where = finished_where(run, out_root, archive_root)
    if where is not None:
        return "finished" if where == "here" else "finished (archived)"
    owner = lock_owner(run_dir)
    if owner is not None:
        return f"running ({owner})"
    done = epochs_done(run_dir)
    return "not started" if done is None else f"unfinished ({done} epochs)"


# ----------------------------------------------------------------------------------------------- one run

CODE_PATHS = ("experiments", "fused_attn_at", "python_ref", "csrc", "setup.py")


def code_version() -> dict:
    """The commit and the uncommitted code files a run starts from (the code may change between runs)."""
    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    modified = [line[3:] for line in git("status", "--porcelain", "--", *CODE_PATHS).splitlines()
                if line[3:].endswith((".py", ".cpp", ".h", ".cu")) and not line.startswith("??")]
    return {"commit": git("rev-parse", "HEAD").strip() or "unknown", "modified": modified}


# train.py runs under this launcher on Linux: it asks for SIGKILL when its parent (the sweep, or the Ray worker)
# dies, so a killed worker never leaves a train.py writing the folder its retry is about to resume.
_LAUNCHER = ("import ctypes, os, signal, sys\n"
             "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
             "except Exception:\n    pass\n"
             "if os.getppid() != int(sys.argv[1]):\n    sys.exit(137)\n"
             "os.execv(sys.argv[2], sys.argv[2:])\n")


class RunInterrupted(Exception):
    """train.py was killed by a signal (not by the sweep): the Ray executor retries the run once from its
    last checkpoint."""


@dataclass
class Outcome:
    name: str
    outcome: str  # finished | failed | skipped | busy | not started
    seconds: float
    detail: str = ""  # the metrics of a finished run, the reason of a failed one


class Runner:
    """What a run is, whether it is finished, claiming it, running train.py for it and the line that reports
    it: the one code path of every executor. The local executor calls `attempt` in threads; the Ray executor
    ships the Runner to a Ray task that calls the same `attempt` on a worker."""

    def __init__(self, *, out_root: Path, data_root: Path, threads: int, resume: bool, python: str | None = None,
                 extra: list[str] | None = None, device: str | None = None, token: str | None = None,
                 archive_root: Path | None = None):
        self.out_root, self.data_root, self.threads, self.resume = out_root, data_root, threads, resume
        self.archive_root = archive_root
        self.python, self.extra, self.device = python, list(extra or []), device
        self.token = token or f"{HOST}:{os.getpid()}:{uuid.uuid4().hex}"
        self._init_local()

    def _init_local(self) -> None:
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("children", "lock", "stopping")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_local()

    def command(self, run: Run, run_dir: Path, resume: bool) -> list[str]:
        argv = [self.python or sys.executable, str(TRAIN)]
        if resume:
            # the saved config.json decides everything else
            argv += ["--resume"]
        else:
            argv += run.train_args()
            data_dir = resolve_data_dir(run, self.data_root, self.out_root)
            if data_dir is not None:
                argv += ["--data-dir", str(data_dir)]
            argv += self.extra
        if self.device is not None:
            argv += ["--device", self.device]
        return argv + ["--output-dir", str(run_dir), "--threads", str(self.threads), "--no-progress"]

    def run_one(self, run: Run) -> str:
        return self.attempt(run).outcome

    def attempt(self, run: Run, *, retryable: bool = False) -> Outcome:
        """Claim the run, train it (resuming from last.pt), release it. With retryable, a train.py killed by a
        signal raises RunInterrupted instead of returning failed (the Ray executor retries it once)."""
        started = time.time()
        run_dir = self.out_root / run.name

        def done(outcome: str, detail: str = "") -> Outcome:
            return Outcome(run.name, outcome, time.time() - started, detail)

        if self.stopping:
            return done("not started")
        if finished_where(run, self.out_root, self.archive_root) is not None:
            self.archive(run)
            return done("skipped")
        claim = Claim.take(run_dir, self.token)
        if claim is None:
            return done("busy", f"held by {lock_owner(run_dir) or 'another process'}")
        try:
            if is_finished(run_dir):  # finished by another sweep between the check and the claim
                return done("skipped")
            resume = (run_dir / "last.pt").is_file() and (run_dir / "config.json").is_file()
            if (run_dir / "last.pt").is_file() and not (resume and self.resume):
                for name in ("last.pt", "best.pt", "metrics.json", "config.json"):
                    (run_dir / name).unlink(missing_ok=True)
                resume = False
            try:
                argv = self.command(run, run_dir, resume)
            except DATA_ERRORS as error:
                message = one_line(error)
                with open(run_dir / LOG, "a", encoding="utf-8") as log:
                    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} cannot start: {message}\n")
                return done("failed", f"cannot start: {message}")
            code = self._train(argv, run_dir, resume, claim)
            if code is None:
                return done("not started")
            if code == 0 and is_finished(run_dir):
                self.archive(run)
                return done("finished", result_line(run_dir))
            if code < 0 and retryable and not self.stopping:
                raise RunInterrupted(f"{run.name}: train.py killed by signal {-code}")
            return done("failed", f"train.py exit {code}" + (f" (signal {-code})" if code < 0 else ""))
        finally:
            claim.release()

    def archive(self, run: Run) -> None:
        """Record a finished run folder in the archive (also one finished before archiving existed)."""
        if self.archive_root is not None:
            archive_run(self.out_root / run.name, self.archive_root / run.name)

    def _train(self, argv: list[str], run_dir: Path, resume: bool, claim: Claim) -> int | None:
        """train.py's exit status (negative: killed by that signal); None if the sweep is stopping."""
        started = time.time()
        code = code_version()
        with open(run_dir / "sweep_code.json", "a", encoding="utf-8") as record:
            record.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resume": resume, "host": HOST,
                                     **code}) + "\n")
        with open(run_dir / LOG, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'} on {HOST} "
                      f"(pid {os.getpid()}): " + " ".join(argv) + f"\n=== code: {code['commit']}"
                      + (f" + uncommitted changes to {', '.join(code['modified'])}" if code["modified"] else "")
                      + "\n")
            log.flush()
            env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
            launch = argv
            if sys.platform.startswith("linux"):
                launch = [argv[0], "-c", _LAUNCHER, str(os.getpid()), *argv]
            with self.lock:
                if self.stopping:
                    return None
                child = subprocess.Popen(launch, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
                self.children.add(child)
            try:
                claim.update(child=child.pid)
                while True:
                    try:
                        exit_code = child.wait(timeout=HEARTBEAT)
                        break
                    except subprocess.TimeoutExpired:
                        if not claim.refresh():  # another sweep took the run over: leave it to that one
                            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} the run's lock was taken over "
                                      "(this sweep stalled longer than the lease); stopping\n")
                            child.kill()
            finally:
                with self.lock:
                    self.children.discard(child)
            log.write(f"=== exit {exit_code} after {time.time() - started:.0f} s\n")
        return exit_code

    def timed(self, run: Run) -> Outcome:
        """attempt(), with any unexpected error reported as this run's failure (the others go on)."""
        started = time.time()
        try:
            return self.attempt(run)
        except Exception as error:  # noqa: BLE001 - one broken run must not stop the others
            return Outcome(run.name, "failed", time.time() - started, f"{type(error).__name__}: {one_line(error)}")

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for child in list(self.children):
                child.terminate()


# what a run's data preparation raises for missing, truncated (paper.data_types.CorruptDataError) or malformed
# files: reported as the run's failure in one line that names the file
DATA_ERRORS = (GridError, OSError, DataFormatError, ValueError)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _ray_attempt(runner: Runner, run: Run) -> Outcome:
    """The Ray task: the same per-run code on a worker."""
    return runner.attempt(run, retryable=True)


# ----------------------------------------------------------------------------------------------- executors

RAY_HINT = ('--executor ray needs Ray: pip install "fused_attn_at[cluster]" (from a checkout: '
            'pip install --no-build-isolation ".[cluster]"; or just pip install "ray>=2.9")')


def import_ray():
    try:
        import ray
    except ImportError:
        return None
    return ray


def start_ray(address: str | None = None, **kwargs):
    """ray.init for the sweep: a running cluster at `address`, else a local Ray instance. The workers import
    this module, so experiments/ goes on their PYTHONPATH (on a cluster, the checkout must be at the same path
    on every node, e.g. on the shared filesystem)."""
    ray = import_ray()
    if ray is None:
        raise SystemExit(f"sweep.py: error: {RAY_HINT}")
    if not ray.is_initialized():
        path = os.pathsep.join(p for p in (str(EXPERIMENTS), os.environ.get("PYTHONPATH")) if p)
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("log_to_driver", False)
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": path}}, **kwargs)
    return ray


class Sweep:
    """A grid's runs through one executor: 'local' (a thread pool of train.py subprocesses on this machine) or
    'ray' (one Ray task per run, on a local Ray instance or a running cluster)."""

    def __init__(self, runs, *, out_root: Path, data_root: Path, jobs: int, threads: int, resume: bool,
                 python: str | None = None, extra: list[str] | None = None, executor: str = "local",
                 address: str | None = None, device: str | None = None, archive_root: Path | None = None):
        self.runs, self.out_root, self.jobs, self.threads = runs, out_root, jobs, threads
        self.executor, self.address = executor, address
        self.runner = Runner(out_root=out_root, data_root=data_root, threads=threads, resume=resume, python=python,
                             extra=extra, device=device, archive_root=archive_root)
        self.results: dict[str, str] = {}  # run name -> finished | skipped | failed | busy | not started
        self.pending: list = []  # the Ray tasks in flight

    # the per-run API of the Runner, for callers that hold a Sweep
    def command(self, run: Run, run_dir: Path, resume: bool) -> list[str]:
        return self.runner.command(run, run_dir, resume)

    def run_one(self, run: Run) -> str:
        return self.runner.run_one(run)

    def stop(self, signum, _frame) -> None:
        """Stop the children too (each resumes from its last epoch next time), then exit."""
        self.runner.stop()
        if self.pending:
            ray = import_ray()
            for ref in self.pending:
                ray.cancel(ref, force=True)  # the worker dies, its train.py with it
        print(f"sweep: stopped by signal {signum}; the interrupted runs continue from their last finished epoch "
              "next time", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def run(self, progress: bool = True) -> int:
        started = time.time()
        todo = [r for r in self.runs if finished_where(r, self.out_root, self.runner.archive_root) is None]
        for run in self.runs:
            if run not in todo:
                self.runner.archive(run)
                self.results[run.name] = "skipped"
        where = (f"{self.jobs} at a time" if self.executor == "local"
                 else f"Ray tasks of {self.threads} CPU(s)" + (" and 1 GPU" if self._gpus() else ""))
        print(f"sweep: {len(self.runs)} runs, {len(self.runs) - len(todo)} already finished, {len(todo)} to run "
              f"({where}, {self.threads} threads each) in {self.out_root}", file=sys.stderr, flush=True)
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=len(self.runs), initial=len(self.runs) - len(todo), desc="sweep", unit="run",
                        disable=not progress, dynamic_ncols=True, mininterval=1 if interactive else 60)
        execute = self._run_ray if self.executor == "ray" else self._run_local
        if todo:
            execute(todo)
        # a second look at the runs another process held: finished by it (skipped now), or its lock went stale
        again = [r for r in todo if self.results.get(r.name) == "busy" and lock_owner(self.out_root / r.name) is None]
        if again:
            execute(again, counted=True)
        self.bar.close()
        return self.summary(time.time() - started)

    def _gpus(self) -> int:
        return 1 if (self.runner.device or "").startswith("cuda") else 0

    def _report(self, result: Outcome, counted: bool = False) -> None:
        self.results[result.name] = result.outcome
        if not counted:
            self.bar.update(1)
        self.bar.set_postfix(failed=sum(v == "failed" for v in self.results.values()), refresh=False)
        detail = f": {result.detail}" if result.detail else ""
        tqdm.write(f"sweep: {result.outcome:<8} {result.name}{detail} ({result.seconds:.0f} s)", file=sys.stderr)

    def _run_local(self, todo: list[Run], counted: bool = False) -> None:
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for future in as_completed([pool.submit(self.runner.timed, run) for run in todo]):
                self._report(future.result(), counted)

    def _run_ray(self, todo: list[Run], counted: bool = False) -> None:
        ray = start_ray(self.address)
        from ray.exceptions import RayError, RayTaskError

        # one retry: a worker that dies (WorkerCrashedError, a lost node) or a train.py killed by a signal
        # starts the run again from last.pt; a second failure is reported
        task = ray.remote(_ray_attempt).options(num_cpus=self.threads, num_gpus=self._gpus(), max_retries=1,
                                                retry_exceptions=[RunInterrupted])
        runner = ray.put(self.runner)
        refs = {task.remote(runner, run): (run, time.time()) for run in todo}
        self.pending = list(refs)
        while self.pending:
            ready, self.pending = ray.wait(self.pending, num_returns=1)
            run, submitted = refs[ready[0]]
            try:
                result = ray.get(ready[0])
            except RayError as error:
                cause = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
                text = one_line(cause)
                if not isinstance(cause, RunInterrupted):
                    text = f"{type(cause).__name__}: {text}"
                result = Outcome(run.name, "failed", time.time() - submitted, f"{text[:300]} (after a retry)")
            self._report(result, counted)

    def summary(self, seconds: float | None = None) -> int:
        counts = {k: 0 for k in ("finished", "failed", "skipped", "busy", "not started")}
        for outcome in self.results.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        line = f"sweep: {counts['finished']} done, {counts['failed']} failed, {counts['skipped']} skipped"
        if counts["busy"]:
            line += f", {counts['busy']} held by another process"
        if counts["not started"]:
            line += f", {counts['not started']} not started"
        if seconds is not None:
            line += f" ({self.executor} executor, {seconds:.0f} s wall)"
        print(line, file=sys.stderr)
        failed = [name for name, outcome in self.results.items() if outcome == "failed"]
        for name in failed:
            log = self.out_root / name / LOG
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-4:] if log.is_file() else []
            print(f"sweep: FAILED {name}; log {log}:\n    " + "\n    ".join(tail), file=sys.stderr)
        busy = [name for name, outcome in self.results.items() if outcome == "busy"]
        if busy:
            print(f"sweep: {len(busy)} run(s) held by another live process, left alone: {', '.join(busy)}",
                  file=sys.stderr)
        return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    cores = os.cpu_count() or 1
    parser = ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="append", required=True,
                        help=f"a grid name in experiments/grids ({', '.join(available_grids())}) or a JSON path; "
                             "repeat to run several grids in order")
    parser.add_argument("--datasets", nargs="+", default=None, help="only these datasets of the grid")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds")
    parser.add_argument("--eps", nargs="+", type=float, default=None, help="only these eps (vanilla always kept)")
    parser.add_argument("--out-root", type=Path, default=DEFAULT_OUT,
                        help="where the run directories go (with --executor ray on a cluster: a path every node "
                             "reaches, on a shared filesystem)")
    parser.add_argument("--archive", default=None, metavar="DIR",
                        help=f"where finished runs' result files ({', '.join(ARCHIVE_FILES)}) are copied for git to "
                             f"keep, and where a run counts as finished on any machine (default: {DEFAULT_ARCHIVE} "
                             f"when --out-root is {DEFAULT_OUT}, else none; 'none' turns it off)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="folder holding the non-SST tasks' data folders named by the grid's 'data'")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: train.py subprocesses on this machine, --jobs at a time; ray: one Ray task "
                             "per run (needs the 'cluster' extra)")
    parser.add_argument("--address", default=None,
                        help="--executor ray: the Ray cluster to use (e.g. 'auto' or HEAD_IP:6379); default: "
                             "a local Ray instance (or $RAY_ADDRESS)")
    parser.add_argument("--jobs", type=int, default=1, help="local executor: runs at a time (separate processes)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads per run, and the CPUs each Ray task asks for (default: local "
                             f"cores // jobs = {cores} // jobs; ray 1)")
    parser.add_argument("--device", default=None,
                        help="train.py --device for every run (cpu, cuda, cuda:N); with --executor ray and cuda "
                             "each task asks for one GPU")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue unfinished runs from their last epoch (--no-resume: restart them)")
    parser.add_argument("--list", action="store_true", help="print the runs and their state; run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no overall progress bar")
    parser.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for every new train.py run (repeat; e.g. --train-arg=--lam=0.5)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.address is not None and args.executor != "ray":
        parser.error("--address applies to --executor ray only")
    threads = args.threads or (1 if args.executor == "ray" else max(1, (os.cpu_count() or 1) // args.jobs))
    if threads < 1:
        parser.error(f"--threads must be >= 1, got {threads}")
    if args.executor == "ray" and not args.list and import_ray() is None:
        print(f"sweep.py: error: {RAY_HINT}", file=sys.stderr)
        return 2
    try:
        runs = unique([run for grid in args.grid for run in load_grid(grid)])
    except GridError as error:
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    runs = filter_runs(runs, datasets=args.datasets, methods=args.methods, seeds=args.seeds, eps=args.eps)
    if not runs:
        print("sweep.py: error: the filters leave no runs", file=sys.stderr)
        return 2
    out_root = args.out_root if args.out_root.is_absolute() else REPO / args.out_root
    archive_root = resolve_archive(args.archive, args.out_root)
    if args.list:
        try:
            for run in runs:
                print(f"{status(run, out_root, archive_root):<22} {run.name}", flush=True)
        except BrokenPipeError:  # e.g. piped into head
            sys.stderr.close()
        return 0
    sweep = Sweep(runs, out_root=out_root, data_root=args.data_root.resolve(), jobs=args.jobs, threads=threads,
                  resume=args.resume, extra=args.train_arg, executor=args.executor, address=args.address,
                  device=args.device, archive_root=archive_root)
    previous = signal.signal(signal.SIGTERM, sweep.stop)
    try:
        return sweep.run(progress=not args.no_progress)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    # run as the module `sweep`, not `__main__`, so that Ray pickles its functions and classes by reference
    # (the workers import the same module)
    import sweep as _sweep

    sys.exit(_sweep.main())
