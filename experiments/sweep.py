#!/usr/bin/env python
"""Run a grid of experiments (datasets x methods x eps x seeds x variants) as separate train.py runs.

    python experiments/sweep.py --grid paper --jobs 1 --threads 2     # everything issue 6 asks for, in priority order
    python experiments/sweep.py --grid main --datasets sst --seeds 1  # a slice of a grid
    python experiments/sweep.py --grid eps --list                     # what the grid holds and what is done

Each run trains in its own directory runs/sweep/<dataset>/<method>[_eps<eps>]_seed<seed>[_<flag>-<value>...],
named from its settings only, so the same settings always land in the same directory and a run shared by two
grids is trained once. A run whose metrics.json holds test metrics is finished and skipped; an unfinished one
(last.pt present) is continued with train.py --resume; a failing run is logged and reported at the end
(exit status 1) while the others go on. Every attempt's output is appended to <run dir>/sweep.log.

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
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

EXPERIMENTS = Path(__file__).resolve().parent
REPO = EXPERIMENTS.parent
GRIDS = EXPERIMENTS / "grids"
TRAIN = EXPERIMENTS / "train.py"
DEFAULT_OUT = Path("runs") / "sweep"
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
    ``seed``, are held out. The output keeps the original format, so train.py's loader reads it unchanged."""
    with _prepare_lock:
        done = target / "PREPARED.json"
        if done.is_file():
            return target
        sys.path.insert(0, str(EXPERIMENTS))
        from paper.data_splits import shuffle_split

        names = [f"{stem}.{split}" for split in ("dev", "test") for stem in ("s1", "s2", "labels")]
        missing = [n for n in names if not (source / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{source}: missing {', '.join(missing)} (e-SNLI line-aligned SNLI dev/test)")
        lines = {n: (source / n).read_text(encoding="utf-8").splitlines(keepends=True) for n in names}
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
        done.write_text(json.dumps({"source": str(source), "split": "by premise", "dev_fraction": dev_fraction,
                                    "seed": seed, "premises": len(premises), "examples": counts}, indent=2) + "\n",
                        encoding="utf-8")
        return target


# ----------------------------------------------------------------------------------------------- run state

def is_finished(run_dir: Path) -> bool:
    """metrics.json holds test metrics (train.py writes it last, atomically)."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(metrics.get("test"))


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_owner(run_dir: Path) -> int | None:
    """The pid of a live process that holds the run (another sweep, or a train.py started by hand)."""
    try:
        pid = int((run_dir / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid != os.getpid() and pid_alive(pid) else None


def take_lock(run_dir: Path) -> bool:
    run_dir.mkdir(parents=True, exist_ok=True)
    if lock_owner(run_dir) is not None:
        return False
    (run_dir / LOCK).write_text(f"{os.getpid()}\n")
    return True


def status(run: Run, out_root: Path) -> str:
    run_dir = out_root / run.name
    if is_finished(run_dir):
        return "finished"
    owner = lock_owner(run_dir)
    if owner is not None:
        return f"running (pid {owner})"
    done = epochs_done(run_dir)
    return "not started" if done is None else f"unfinished ({done} epochs)"


# ----------------------------------------------------------------------------------------------- running

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


class Sweep:
    def __init__(self, runs, *, out_root: Path, data_root: Path, jobs: int, threads: int, resume: bool,
                 python: str = sys.executable, extra: list[str] | None = None):
        self.runs, self.out_root, self.data_root = runs, out_root, data_root
        self.jobs, self.threads, self.resume, self.python = jobs, threads, resume, python
        self.extra = extra or []
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False
        self.results: dict[str, str] = {}  # run name -> finished | skipped | failed | busy

    def command(self, run: Run, run_dir: Path, resume: bool) -> list[str]:
        argv = [self.python, str(TRAIN)]
        if resume:
            # the saved config.json decides everything else
            argv += ["--resume"]
        else:
            argv += run.train_args()
            data_dir = resolve_data_dir(run, self.data_root, self.out_root)
            if data_dir is not None:
                argv += ["--data-dir", str(data_dir)]
            argv += self.extra
        return argv + ["--output-dir", str(run_dir), "--threads", str(self.threads), "--no-progress"]

    def run_one(self, run: Run) -> str:
        run_dir = self.out_root / run.name
        if self.stopping:
            return "not started"
        if is_finished(run_dir):
            return "skipped"
        if not take_lock(run_dir):
            return "busy"
        try:
            resume = (run_dir / "last.pt").is_file()
            if resume and not self.resume:
                for name in ("last.pt", "best.pt", "metrics.json", "config.json"):
                    (run_dir / name).unlink(missing_ok=True)
                resume = False
            try:
                argv = self.command(run, run_dir, resume)
            except (GridError, OSError) as error:
                with open(run_dir / LOG, "a", encoding="utf-8") as log:
                    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} cannot start: {error}\n")
                return "failed"
            started = time.time()
            code = code_version()
            with open(run_dir / "sweep_code.json", "a", encoding="utf-8") as record:
                record.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resume": resume, **code}) + "\n")
            with open(run_dir / LOG, "a", encoding="utf-8") as log:
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}: "
                          + " ".join(argv) + f"\n=== code: {code['commit']}"
                          + (f" + uncommitted changes to {', '.join(code['modified'])}" if code["modified"] else "")
                          + "\n")
                log.flush()
                env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
                with self.lock:
                    if self.stopping:
                        return "not started"
                    child = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env)
                    self.children.add(child)
                code = child.wait()
                with self.lock:
                    self.children.discard(child)
                log.write(f"=== exit {code} after {time.time() - started:.0f} s\n")
            if code == 0 and is_finished(run_dir):
                return "finished"
            return "failed"
        finally:
            try:
                if (run_dir / LOCK).read_text().split()[0] == str(os.getpid()):
                    (run_dir / LOCK).unlink()
            except (OSError, IndexError):
                pass

    def stop(self, signum, _frame) -> None:
        """Stop the children too (each resumes from its last epoch next time), then exit."""
        with self.lock:
            self.stopping = True
            for child in list(self.children):
                child.terminate()
        print(f"sweep: stopped by signal {signum}; the interrupted runs continue from their last finished epoch "
              "next time", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def run(self, progress: bool = True) -> int:
        todo = [r for r in self.runs if not is_finished(self.out_root / r.name)]
        for run in self.runs:
            if run not in todo:
                self.results[run.name] = "skipped"
        print(f"sweep: {len(self.runs)} runs, {len(self.runs) - len(todo)} already finished, {len(todo)} to run "
              f"({self.jobs} at a time, {self.threads} threads each) in {self.out_root}", file=sys.stderr, flush=True)
        interactive = sys.stderr.isatty()
        bar = tqdm(total=len(self.runs), initial=len(self.runs) - len(todo), desc="sweep", unit="run",
                   disable=not progress, dynamic_ncols=True, mininterval=1 if interactive else 60)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = {run: pool.submit(self._timed, run) for run in todo}
            for run, future in futures.items():
                outcome, seconds = future.result()
                self.results[run.name] = outcome
                bar.update(1)
                failed = sum(v == "failed" for v in self.results.values())
                bar.set_postfix(failed=failed, refresh=False)
                tqdm.write(f"sweep: {outcome:<8} {run.name} ({seconds:.0f} s)", file=sys.stderr)
        bar.close()
        return self.summary()

    def _timed(self, run: Run) -> tuple[str, float]:
        started = time.time()
        try:
            return self.run_one(run), time.time() - started
        except Exception as error:  # noqa: BLE001 - one broken run must not stop the others
            print(f"sweep: {run.name}: {type(error).__name__}: {error}", file=sys.stderr)
            return "failed", time.time() - started

    def summary(self) -> int:
        counts = {}
        for outcome in self.results.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        print("sweep: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), file=sys.stderr)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="append", required=True,
                        help=f"a grid name in experiments/grids ({', '.join(available_grids())}) or a JSON path; "
                             "repeat to run several grids in order")
    parser.add_argument("--datasets", nargs="+", default=None, help="only these datasets of the grid")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds")
    parser.add_argument("--eps", nargs="+", type=float, default=None, help="only these eps (vanilla always kept)")
    parser.add_argument("--out-root", type=Path, default=DEFAULT_OUT, help="where the run directories go")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="folder holding the non-SST tasks' data folders named by the grid's 'data'")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads per run (default: cores // jobs = {cores} // jobs)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue unfinished runs from their last epoch (--no-resume: restart them)")
    parser.add_argument("--list", action="store_true", help="print the runs and their state; run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no overall progress bar")
    parser.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for every new train.py run (repeat; e.g. --train-arg=--device=cpu)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if threads < 1:
        parser.error(f"--threads must be >= 1, got {threads}")
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
    if args.list:
        try:
            for run in runs:
                print(f"{status(run, out_root):<22} {run.name}", flush=True)
        except BrokenPipeError:  # e.g. piped into head
            sys.stderr.close()
        return 0
    sweep = Sweep(runs, out_root=out_root, data_root=args.data_root.resolve(), jobs=args.jobs, threads=threads,
                  resume=args.resume, extra=args.train_arg)
    signal.signal(signal.SIGTERM, sweep.stop)
    return sweep.run(progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
