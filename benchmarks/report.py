"""Benchmark report: runs the benchmarks (optionally) and turns their JSON into RESULTS.md + plots.

One command measures and writes everything (about 8 minutes on 2 quiet cores for the goal set):

    python benchmarks/report.py --run --bench-set goal

It runs `pytest benchmarks/ --bench-set goal --benchmark-json=benchmarks/results/goal.json` (the installed
fused_attn_at, 2 threads; --run needs pytest and pytest-benchmark, the `test` extra:
`pip install --no-build-isolation ".[test]"`), then writes RESULTS.md and plots/*.png from that JSON into
--out (default benchmarks/out/, not tracked by git). --update-committed writes the committed
benchmarks/RESULTS.md and benchmarks/plots/ instead. Without --run it only renders an existing JSON:

    python benchmarks/report.py --json benchmarks/results/goal.json [--out DIR]

Anything after `--` is passed to pytest (e.g. `-- --bench-backends eager,cpu -k fwdbwd`).
Time the final numbers on a quiet machine: the report prints the load average and the bandwidth measured at
the start and the end of the run, and flags a run where they show that something else was running.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402

NONE = "—"
DEFAULT_OUT = HERE / "out"  # ignored by git (benchmarks/.gitignore)
RUN_NEEDS = ("pytest", "pytest_benchmark")  # module names; pip names pytest, pytest-benchmark
# More CPU time than this fraction of the machine taken by other processes during a run marks it noisy.
OTHER_LOAD_LIMIT = 0.05


# ------------------------------------------------------------------------------------------ loading
def load(path: pathlib.Path) -> dict:
    data = json.loads(path.read_text())
    pool, steps = {}, {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        median = bench["stats"]["median"]
        if info.get("kind") == "training_step":
            steps[info["method"]] = {"median": median, "rounds": bench["stats"]["rounds"], **info}
        elif "backend" in info:
            key = (info["device"], info["dtype"], info["B"], info["T"], info["H"], info["perturbation"],
                   info["mode"], info["backend"])
            pool[key] = {"median": median, "rounds": bench["stats"]["rounds"], "iqr": bench["stats"].get("iqr"),
                         "iterations": bench["stats"]["iterations"], **info}
    return {"raw": data, "pool": pool, "steps": steps}


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_ratio(x: float | None) -> str:
    return NONE if x is None else f"{x:.2f}x"


def fmt_num(x: float | None, digits: int = 3) -> str:
    return NONE if x is None else f"{x:.{digits}g}"


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    """numerator median / denominator median: > 1 means the denominator's backend is faster."""
    if numerator is None or denominator is None:
        return None
    return numerator["median"] / denominator["median"]


def spread(entry: dict | None) -> str:
    """IQR / median of a case's rounds: a few % on a quiet machine; tens of % mean the timing is noise."""
    if entry is None or not entry.get("iqr") or not entry["median"]:
        return NONE
    return f"{100 * entry['iqr'] / entry['median']:.0f}%"


def gbps(entry: dict | None) -> float | None:
    return None if entry is None else entry["ideal_bytes"] / entry["median"] / 1e9


def read_bw(raw: dict, device: str) -> float | None:
    bw = raw.get("fused_attn_at_bandwidth", {}).get(device, {})
    return bw.get("start", {}).get("read_gbps")


# --------------------------------------------------------------------------------------------- goals
def goal_rows(res: dict) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, met) rows for the issue's goals (CPU, float32)."""
    pool, raw = res["pool"], res["raw"]
    rows = []
    B, T, H = benchlib.GOAL_SHAPE
    for perturbation in benchlib.PERTURBATIONS:
        base = ("cpu", "float32", B, T, H, perturbation, "fwdbwd")
        fused = pool.get(base + ("cpu",))
        for backend, target in (("eager", benchlib.GOAL_EAGER_SPEEDUP), ("compile", benchlib.GOAL_COMPILE_SPEEDUP)):
            r = ratio(pool.get(base + (backend,)), fused)
            rows.append((f"fused fwd+bwd vs {backend}, B={B} T={T} H={H}, {perturbation}",
                         f">= {target:g}x", fmt_ratio(r), _met(r, target)))
    bw = read_bw(raw, "cpu")
    long_cases = [e for k, e in pool.items() if k[0] == "cpu" and k[1] == "float32" and k[7] == "cpu"
                  and k[3] >= benchlib.GOAL_LONG_T]
    for mode in benchlib.MODES:
        mode_cases = [e for e in long_cases if e["mode"] == mode]
        if not mode_cases or bw is None:
            rows.append((f"fused {mode}, T >= {benchlib.GOAL_LONG_T}: % of read bandwidth (worst case)",
                         f">= {benchlib.GOAL_READ_FRACTION:.0%}", NONE, "not measured"))
            continue
        worst = min(mode_cases, key=gbps)
        fraction = gbps(worst) / bw
        rows.append((f"fused {mode}, T >= {benchlib.GOAL_LONG_T}: % of read bandwidth (worst of {len(mode_cases)}: "
                     f"B={worst['B']} T={worst['T']} H={worst['H']} {worst['perturbation']})",
                     f">= {benchlib.GOAL_READ_FRACTION:.0%}", f"{fraction:.0%} ({gbps(worst):.3g} of {bw:.3g} GB/s)",
                     _met(fraction, benchlib.GOAL_READ_FRACTION)))
    pairs = fused_vs_eager(pool)
    if pairs:
        slower = [(r, k) for r, k in pairs if r < 1.0]
        worst_r, worst_k = min(pairs)
        rows.append((f"no case where fused is slower than eager ({len(pairs)} paired cases)", "0 cases",
                     f"{len(slower)} slower; worst {worst_r:.2f}x at {_case_text(worst_k)}",
                     "met" if not slower else "NOT met"))
    else:
        rows.append(("no case where fused is slower than eager", "0 cases", NONE, "not measured"))
    steps = res["steps"]
    r = ratio(steps.get("attention_at"), steps.get("vanilla"))
    rows.append(("attention_at training step / vanilla step", f"<= {benchlib.GOAL_AT_STEP_RATIO:g}x",
                 fmt_ratio(r), NONE if r is None and not steps else _met(r, benchlib.GOAL_AT_STEP_RATIO, below=True)))
    return rows


def limit_rows(res: dict) -> list[str]:
    """The goal shape against the memory floor: the time an ideal kernel needs to move its bytes at the read
    bandwidth measured in the same run, and so the largest speedup over eager / compile any CPU kernel could
    show here (a speedup goal above it cannot be met by a kernel that reads h and writes dh once)."""
    pool, bw = res["pool"], read_bw(res["raw"], "cpu")
    B, T, H = benchlib.GOAL_SHAPE
    if bw is None:
        return ["Not measured (no bandwidth in this run).", ""]
    lines = [f"The goal shape B={B} T={T} H={H}, float32, fwd+bwd. Floor = ideal bytes / read bandwidth "
             f"({bw:.3g} GB/s, measured at the start of this run): no kernel that must read h twice and write "
             "dh once can be faster. The bound on a speedup is baseline median / floor.",
             "",
             "| perturbation | ideal bytes | floor | fused | fused / floor | eager | bound vs eager | compile "
             "| bound vs compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for perturbation in benchlib.PERTURBATIONS:
        base = ("cpu", "float32", B, T, H, perturbation, "fwdbwd")
        nbytes = benchlib.ideal_bytes(B, T, H, "float32", perturbation, "fwdbwd")
        floor = nbytes / (bw * 1e9)
        cells = [perturbation, f"{nbytes / 2**20:.1f} MiB", fmt_time(floor)]
        for backend in ("cpu", "eager", "compile"):  # each: its median, and that over the floor
            entry = pool.get(base + (backend,))
            cells += [fmt_time(entry["median"]), fmt_ratio(entry["median"] / floor)] if entry else [NONE, NONE]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _met(value: float | None, target: float, below: bool = False) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= target if below else value >= target) else "NOT met"


def _case_text(key: tuple) -> str:
    device, dtype, B, T, H, pert, mode = key[:7]
    return f"{device} {dtype} B={B} T={T} H={H} {pert} {mode}"


def fused_vs_eager(pool: dict) -> list[tuple[float, tuple]]:
    """(eager median / fused median, case key without backend) for every case both ran; fused = the
    device's best fused backend."""
    pairs = []
    for key, eager in pool.items():
        if key[7] != "eager":
            continue
        fused = [pool[key[:7] + (b,)] for b in benchlib.FUSED.get(key[0], ()) if key[:7] + (b,) in pool]
        if fused:
            best = min(fused, key=lambda e: e["median"])
            pairs.append((eager["median"] / best["median"], key[:7]))
    return pairs


# --------------------------------------------------------------------------------------------- tables
def shape_tables(res: dict) -> list[str]:
    pool, raw = res["pool"], res["raw"]
    lines = []
    combos = sorted({(k[0], k[1]) for k in pool}, key=lambda c: (c[0] != "cpu", c[1] != "float32", c))
    for device, dtype in combos:
        fused_names = [b for b in benchlib.FUSED[device] if any(k[7] == b for k in pool if k[0] == device)]
        bw = read_bw(raw, device)
        lines.append(f"### {device}, {dtype}\n")
        if not fused_names:
            lines.append(f"No fused {device} backend was measured in this run (see the skipped cases below).\n")
        head = ["perturbation", "mode", "eager", "compile"] + fused_names
        for name in fused_names:
            head += [f"{name} vs eager", f"{name} vs compile", f"{name} GB/s", f"{name} % read BW",
                     f"{name} IQR/median"]
        if not fused_names:
            head += ["compile vs eager", "eager GB/s"]
        shapes = sorted({k[2:5] for k in pool if k[0] == device and k[1] == dtype})
        for B, T, H in shapes:
            lines.append(f"**B={B} T={T} H={H}** (h is {B * T * H * benchlib.ELEMENT_SIZE[dtype] / 2**20:.3g} MiB)\n")
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for pert in benchlib.PERTURBATIONS:
                for mode in benchlib.MODES:
                    base = (device, dtype, B, T, H, pert, mode)
                    eager, compiled = pool.get(base + ("eager",)), pool.get(base + ("compile",))
                    fused = {n: pool.get(base + (n,)) for n in fused_names}
                    if eager is None and compiled is None and not any(fused.values()):
                        continue
                    row = [pert, mode, fmt_time(eager and eager["median"]), fmt_time(compiled and compiled["median"])]
                    row += [fmt_time(f and f["median"]) for f in fused.values()]
                    for f in fused.values():
                        g = gbps(f)
                        row += [fmt_ratio(ratio(eager, f)), fmt_ratio(ratio(compiled, f)), fmt_num(g),
                                NONE if g is None or bw is None else f"{100 * g / bw:.0f}%", spread(f)]
                    if not fused_names:
                        row += [fmt_ratio(ratio(eager, compiled)), fmt_num(gbps(eager))]
                    lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    return lines


def step_table(res: dict) -> list[str]:
    steps = res["steps"]
    if not steps:
        return ["Not measured in this run (see the skipped cases below).", ""]
    vanilla = steps.get("vanilla")
    first = next(iter(steps.values()))
    lines = [f"One step (zero_grad, forward, backward, optimizer step) of the model `experiments/train.py` builds by "
             f"default (BiLSTM, additive attention, embed size {first.get('embed_size', 'not recorded')}, vocabulary "
             f"{first.get('vocab_size')}) on a fixed batch: {first.get('batch_source')}; {first.get('batch')} "
             f"sentences, lengths {first.get('lengths')}; torch threads {first.get('threads')}; attention pooling "
             f"backend: {first.get('pool_backend')}.",
             "", "| method | what runs | median | vs vanilla |", "|---|---|---|---|"]
    for method, entry in steps.items():
        lines.append(f"| {method} | {entry.get('description', '')} | {fmt_time(entry['median'])} | "
                     f"{fmt_ratio(ratio(entry, vanilla))} |")
    lines.append("")
    return lines


def machine_lines(res: dict) -> tuple[list[str], list[str]]:
    """(bullet lines about the machine and the run, warnings that the run was noisy)"""
    raw = res["raw"]
    info = raw.get("machine_info", {}).get("fused_attn_at", {})
    lines = [
        f"- date: {raw.get('datetime', NONE)}; commit {info.get('commit', NONE)}; bench set `{info.get('bench_set', NONE)}`",
        f"- CPU: {info.get('cpu_model', NONE)} ({info.get('cpu_count', NONE)} cores), torch threads {info.get('threads', NONE)}; "
        f"GPU: {info.get('gpu', NONE)}",
        f"- torch {info.get('torch', NONE)}, triton {info.get('triton', NONE)}, "
        f"Python {raw.get('machine_info', {}).get('python_version', NONE)}",
    ]
    warnings = []
    for device, bw in raw.get("fused_attn_at_bandwidth", {}).items():
        start, end = bw.get("start", {}), bw.get("end", {})
        lines.append(f"- {device} bandwidth (threads={start.get('threads')}, {start.get('array_mib')} MiB arrays, median): "
                     f"read {fmt_num(start.get('read_gbps'))} GB/s, copy {fmt_num(start.get('copy_gbps'))} GB/s at the "
                     f"start; read {fmt_num(end.get('read_gbps'))}, copy {fmt_num(end.get('copy_gbps'))} at the end")
        if start.get("read_gbps") and end.get("read_gbps"):
            drift = abs(end["read_gbps"] / start["read_gbps"] - 1)
            if drift > 0.2:
                warnings.append(f"the {device} read bandwidth moved by {drift:.0%} between the start and the end")
    load = raw.get("fused_attn_at_loadavg", {})
    if load:
        lines.append(f"- load average (1/5/15 min): {' / '.join(f'{x:.2f}' for x in load.get('start', []))} at the "
                     f"start, {' / '.join(f'{x:.2f}' for x in load.get('end', []))} at the end")
    other = raw.get("fused_attn_at_other_load", {})
    if other:
        lines.append(f"- CPU time other processes used during the run: {other['other_cpu_s']:.1f} s of "
                     f"{other['wall_s'] * other['cores']:.0f} s available ({other['fraction']:.1%})")
        if other["fraction"] > OTHER_LOAD_LIMIT:
            warnings.append(f"other processes used {other['fraction']:.0%} of the CPU time during the run (more than "
                            f"{OTHER_LOAD_LIMIT:.0%}): they competed with the timed threads")
    elif load:  # an older JSON, or no /proc/stat: the load average is all there is
        cores = info.get("cpu_count") or os.cpu_count() or 1
        if load.get("start") and load["start"][0] > 0.5 * cores:
            warnings.append(f"the machine was busy when the run started (load {load['start'][0]:.2f} on {cores} cores)")
        if load.get("end") and load["end"][1] > cores:
            warnings.append(f"the 5-minute load at the end ({load['end'][1]:.2f}) exceeds the {cores} cores: other "
                            "processes competed with the timed threads")
    return lines, warnings


def skipped_lines(res: dict) -> list[str]:
    skipped = res["raw"].get("fused_attn_at_skipped", [])
    if not skipped:
        return ["None."]
    counts = collections.Counter(s["reason"] for s in skipped)
    return [f"- {n} case(s): {reason}" for reason, n in counts.most_common()]


# ----------------------------------------------------------------------------------------------- plots
def plot(res: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """speedup over eager vs T and GB/s vs T, per backend; one pair of figures per (device, dtype, B, H)
    that has at least two lengths. Rows: mode; columns: perturbation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    pool, raw = res["pool"], res["raw"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    written = []
    combos = sorted({(k[0], k[1], k[2], k[4]) for k in pool})
    for device, dtype, B, H in combos:
        lengths = sorted({k[3] for k in pool if (k[0], k[1], k[2], k[4]) == (device, dtype, B, H)})
        if len(lengths) < 2:
            continue
        backends = [b for d, b in benchlib.BACKENDS if d == device and any(k[7] == b for k in pool)]
        perts = [p for p in benchlib.PERTURBATIONS if any(k[5] == p for k in pool)]
        modes = [m for m in benchlib.MODES if any(k[6] == m for k in pool)]
        bw = read_bw(raw, device)
        tag = f"{device}_{dtype}_B{B}_H{H}"
        for kind in ("speedup", "gbps"):
            fig, axes = plt.subplots(len(modes), len(perts), figsize=(3.2 * len(perts), 2.6 * len(modes)),
                                     squeeze=False, sharex=True)
            for i, mode in enumerate(modes):
                for j, pert in enumerate(perts):
                    ax = axes[i][j]
                    for backend in backends:
                        if kind == "speedup" and backend == "eager":
                            continue
                        xs, ys = [], []
                        for T in lengths:
                            key = (device, dtype, B, T, H, pert, mode)
                            entry, eager = pool.get(key + (backend,)), pool.get(key + ("eager",))
                            y = ratio(eager, entry) if kind == "speedup" else gbps(entry)
                            if y is not None:
                                xs.append(T)
                                ys.append(y)
                        if xs:
                            ax.plot(xs, ys, marker="o", label=backend)
                    if kind == "speedup":
                        ax.axhline(1.0, color="grey", lw=0.8)
                        ax.set_yscale("log")
                    elif bw:
                        ax.axhline(bw, color="grey", lw=0.8, ls="--", label="read BW")
                        ax.axhline(benchlib.GOAL_READ_FRACTION * bw, color="grey", lw=0.8, ls=":", label="50% read BW")
                        ax.set_yscale("log")
                    ax.set_xscale("log", base=2)
                    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
                    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                    ax.set_title(f"{pert}, {mode}", fontsize=9)
                    if j == 0:
                        ax.set_ylabel("x faster than eager" if kind == "speedup" else "effective GB/s")
                    if i == len(modes) - 1:
                        ax.set_xlabel("T")
                    ax.grid(True, which="both", alpha=0.3)
            handles, labels = axes[0][0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="center right", fontsize=8)
            what = "speedup over eager" if kind == "speedup" else "effective bandwidth (ideal bytes / median)"
            fig.suptitle(f"{what}: {device} {dtype}, B={B}, H={H}", fontsize=10)
            fig.tight_layout(rect=(0, 0, 0.88, 0.95))
            path = out_dir / f"{kind}_vs_T_{tag}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- render
def render(res: dict, json_path: pathlib.Path, out: pathlib.Path, plots: list[pathlib.Path], command: str) -> str:
    machine, noise = machine_lines(res)
    banner = ["**Noisy run:** " + "; ".join(noise) + ". Do not quote these numbers; rerun on a quiet machine.", ""]
    lines = [
        "# Benchmark results",
        "",
        *(banner if noise else []),
        f"Generated by `{command}` from `{_rel(json_path, out.parent)}` on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Medians; "
        "ratios are baseline median / fused median (> 1: fused is faster). GB/s counts the bytes an ideal "
        "kernel must move (benchlib.ideal_bytes) over the median time; % read BW compares it with the "
        "machine's read bandwidth measured at the start of the same run.",
        "",
        "## Machine",
        "",
        *machine,
        "",
        "## Goals (CPU, float32)",
        "",
        "| goal | target | measured | |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in goal_rows(res)),
        "",
        "### Where the limit is",
        "",
        *limit_rows(res),
        "## Training step",
        "",
        *step_table(res),
        "## Plots",
        "",
        *(f"![{p.stem}]({_rel(p, out.parent)})" for p in plots),
        "" if plots else "None (a plot needs at least two lengths T for one B and H).",
        "",
        "## The op, per shape",
        "",
        *shape_tables(res),
        "## Skipped cases",
        "",
        *skipped_lines(res),
        "",
    ]
    return "\n".join(lines)


def _rel(path: pathlib.Path, start: pathlib.Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def run_benchmarks(bench_set: str, json_path: pathlib.Path, pytest_args: list[str]) -> int:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # -P: no current folder on sys.path, so the installed fused_attn_at (with its compiled kernel) is used.
    cmd = [sys.executable, "-P", "-m", "pytest", str(HERE), f"--bench-set={bench_set}",
           f"--benchmark-json={json_path}", "-q", "-p", "no:cacheprovider", *pytest_args]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=benchlib.REPO)


def _mtime(path: pathlib.Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def missing_run_requirements() -> list[str]:
    """The modules --run needs (it runs pytest) that this Python lacks."""
    return [name for name in RUN_NEEDS if importlib.util.find_spec(name) is None]


class ArgumentParser(argparse.ArgumentParser):
    """Errors as one line and a hint, not the usage block (as experiments/paper/cli.py does for experiments/)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nrun with --help for usage\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true",
                        help="run the benchmarks first (pytest benchmarks/; needs the test extra)")
    parser.add_argument("--bench-set", default="goal", choices=benchlib.BENCH_SETS, help="with --run (default goal)")
    parser.add_argument("--json", type=pathlib.Path, default=None,
                        help="pytest-benchmark JSON to read/write (default benchmarks/results/<set>.json)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="folder to write RESULTS.md and plots/ into (default benchmarks/out/, ignored by git)")
    parser.add_argument("--update-committed", action="store_true",
                        help="write the committed benchmarks/RESULTS.md and benchmarks/plots/ instead of --out")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.update_committed and args.out is not None:
        parser.error("--out and --update-committed name two places to write: give one")
    out_dir = HERE if args.update_committed else (args.out or DEFAULT_OUT)
    json_path = args.json or HERE / "results" / f"{args.bench_set}.json"
    if args.run:
        missing = missing_run_requirements()
        if missing:
            parser.error(f"--run runs pytest, and this Python ({sys.executable}) lacks {', '.join(missing)}: "
                         'install the test extra, pip install --no-build-isolation ".[test]"')
        before = _mtime(json_path)
        code = run_benchmarks(args.bench_set, json_path, pytest_args)
        if _mtime(json_path) in (None, before):  # not a JSON an earlier run left: that is not this run's
            print(f"{parser.prog}: error: pytest exited with {code} and wrote no {json_path}: nothing to report "
                  "(see pytest's output above)", file=sys.stderr)
            return 1
        if code not in (0, 5):  # 5: nothing collected/everything deselected
            print(f"pytest exited with {code}; writing the report from what was measured", file=sys.stderr)
    elif not json_path.exists():
        parser.error(f"{json_path} does not exist: run with --run to measure, or point --json at a "
                     "pytest-benchmark JSON")
    res = load(json_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_md, plots_dir = out_dir / "RESULTS.md", out_dir / "plots"
    plots = plot(res, plots_dir)
    shown = "python benchmarks/report.py " + " ".join(
        (["--run", f"--bench-set {args.bench_set}"] if args.run else [f"--json {_rel(json_path, benchlib.REPO)}"])
        + (["--update-committed"] if args.update_committed else [])
        + (["--", *pytest_args] if pytest_args else []))
    results_md.write_text(render(res, json_path, results_md, plots, shown))
    print(f"wrote {results_md} and {len(plots)} plot(s) in {plots_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
