"""Benchmark report: runs the benchmarks (optionally) and turns their JSON into RESULTS.md + plots.

One command measures and writes everything (about 11 minutes on 2 quiet cores for the goal set):

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
    pool, steps, breakdown, pair, sa_op, sa_step = {}, {}, {}, {}, {}, {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        median = bench["stats"]["median"]
        kind = info.get("kind")
        if kind == "training_step":
            steps[info["method"]] = {"median": median, "rounds": bench["stats"]["rounds"], **info}
        elif kind == "op_breakdown":
            breakdown[(info["B"], info["T"], info["H"], info["perturbation"])] = {"median": median, **info}
        elif kind == "pair_step":
            pair[info["variant"]] = {"median": median, "rounds": bench["stats"]["rounds"], **info}
        elif kind == "sa_op":
            sa_op[info["sa_backend"]] = {"median": median, "rounds": bench["stats"]["rounds"], **info}
        elif kind == "sa_step":
            sa_step[info["variant"]] = {"median": median, "rounds": bench["stats"]["rounds"], **info}
        elif "backend" in info:
            key = (info["device"], info["dtype"], info["B"], info["T"], info["H"], info["perturbation"],
                   info["mode"], info["backend"])
            pool[key] = {"median": median, "rounds": bench["stats"]["rounds"], "iqr": bench["stats"].get("iqr"),
                         "iterations": bench["stats"]["iterations"], **info}
    return {"raw": data, "pool": pool, "steps": steps, "breakdown": breakdown, "pair": pair, "sa_op": sa_op,
            "sa_step": sa_step,
            "allocator": data.get("fused_attn_at_extras", {}).get("allocator")}


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


def bw_profile(raw: dict, device: str = "cpu") -> dict:
    """The bandwidth profile measured at the start of the run (bandwidth.measure_profile; {} if none)."""
    return raw.get("fused_attn_at_bandwidth", {}).get(device, {}).get("start", {})


def roofline(res: dict, B: int, T: int, H: int, pert: str, mode: str, dtype: str = "float32") -> float | None:
    """Seconds an ideal kernel needs at the bandwidths of the call's working-set size (benchlib.roofline_seconds)."""
    profile = bw_profile(res["raw"])
    return benchlib.roofline_seconds(profile, B, T, H, dtype, pert, mode) if profile.get("sizes") else None


def bw_at(res: dict, nbytes: float, kind: str) -> float | None:
    import bandwidth

    profile = bw_profile(res["raw"])
    return bandwidth.bandwidth_at(profile, nbytes, kind) if profile.get("sizes") else None


def pct_of(entry: dict | None, q: str) -> float | None:
    """p10/p50/p90 of a case's rounds (recorded by the benchmark); p50 falls back to the median."""
    if entry is None:
        return None
    if entry.get(q) is not None:
        return entry[q]
    return entry["median"] if q == "p50" else None


def fmt_pcts(p: dict | None) -> str:
    if not p:
        return NONE
    return " / ".join(fmt_time(p.get(q)) for q in ("p10", "p50", "p90"))


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


# --------------------------------------------------------------------------------------------- goals
PASSES = {"vanilla": (2, 1), "pair-at": (4, 1), "pair-iat": (4, 1), "pair-rp": (2, 1),
          "two_ops-at": (5, 4), "two_ops-iat": (5, 4), "two_ops-rp": (4, 3)}
"""(reads of h, writes of a [B,T,H] gradient) of the pooling part of one step, fwd+bwd (fused_attn_at/training.py;
the two-op path also reads the 2 dh it sums)."""


def goal_rows(res: dict) -> list[tuple[str, str, str, str, str]]:
    """(goal, target, measured, verdict, what bounds it) for issue 17's goals (CPU, float32): the last cell says,
    for a goal not met, the measurement that bounds it (bytes, the bandwidth at that size, where else the time
    goes); empty for a met one."""
    pool = res["pool"]
    rows = []
    B, T, H = benchlib.GOAL_SHAPE
    for pert in benchlib.PERTURBATIONS:
        base = ("cpu", "float32", B, T, H, pert, "fwdbwd")
        fused = pool.get(base + ("cpu",))
        floor = roofline(res, B, T, H, pert, "fwdbwd")
        p50 = pct_of(fused, "p50")
        where = f"op fwd+bwd, B={B} T={T} H={H}, {pert}, end-to-end p50"
        frac = floor / p50 if floor is not None and p50 else None
        rows.append(_goal(f"{where}: % of the roofline at its working set",
                          f">= {benchlib.GOAL_ROOFLINE_FRACTION:.0%}", NONE if frac is None else
                          f"{frac:.0%} ({fmt_time(floor)} floor / {fmt_time(p50)})", frac,
                          benchlib.GOAL_ROOFLINE_FRACTION, lambda: _bound_roofline(res, B, T, H, pert, fused)))
        for backend, target in (("eager", benchlib.GOAL_EAGER_SPEEDUP), ("compile", benchlib.GOAL_COMPILE_SPEEDUP)):
            other = pool.get(base + (backend,))
            r = ratio(other, fused)
            rows.append(_goal(f"{where}: vs {'python_ref eager' if backend == 'eager' else 'torch.compile(python_ref)'}",
                              f">= {target:g}x", fmt_ratio(r), r, target,
                              lambda other=other, floor=floor: _bound_speedup(res, other, floor, B, T, H, pert)))
        p90 = pct_of(fused, "p90")
        tail = p90 / p50 if p90 and p50 else None
        rows.append(_goal(f"{where}: p90 / p50", f"<= {benchlib.GOAL_P90_P50:g}", fmt_ratio(tail), tail,
                          benchlib.GOAL_P90_P50, lambda: _bound_tail(res, B, T, H, pert, fused), below=True))
    long_cases = [e for k, e in pool.items() if k[0] == "cpu" and k[1] == "float32" and k[7] == "cpu"
                  and k[3] >= benchlib.GOAL_LONG_T]
    for mode in benchlib.GOAL_LONG_MODES:
        name = f"op {mode}, T >= {benchlib.GOAL_LONG_T} (DRAM-resident): % of the read bandwidth at its working set"
        target = f">= {benchlib.GOAL_READ_FRACTION:.0%}"
        scored = []
        for e in (e for e in long_cases if e["mode"] == mode):
            ws = benchlib.working_set_bytes(e["B"], e["T"], e["H"], "float32", mode)
            bw = bw_at(res, ws, "read")
            if bw is not None:
                scored.append((gbps(e) / bw, e, bw, ws))
        if not scored:
            rows.append((name, target, NONE, "not measured", ""))
            continue
        frac, worst, bw, ws = min(scored, key=lambda x: x[0])
        rows.append(_goal(f"{name} (worst of {len(scored)}: B={worst['B']} T={worst['T']} H={worst['H']} "
                          f"{worst['perturbation']})", target,
                          f"{frac:.0%} ({gbps(worst):.3g} of {bw:.3g} GB/s at {mib(ws)})", frac,
                          benchlib.GOAL_READ_FRACTION, lambda w=worst, b=bw, m=mode: _bound_long(res, w, b, m)))
    rows += _allocator_goal_rows(res)
    pair = res["pair"]
    at, vanilla = pair.get("pair-at"), pair.get("vanilla")
    r = ratio(at, vanilla)
    pb, pt, ph = (at["B"], at["T"], at["H"]) if at else (B, T, H)
    rows.append(_goal(f"pooling part of an attention_at step (both branches, fwd+bwd) / vanilla's, "
                      f"B={pb} T={pt} H={ph}", f"<= {benchlib.GOAL_PAIR_RATIO:g}x", fmt_ratio(r), r,
                      benchlib.GOAL_PAIR_RATIO, lambda: _bound_pair(res), below=True))
    # issue 14's goals, still watched
    pairs = fused_vs_eager(pool)
    if pairs:
        slower = [(r, k) for r, k in pairs if r < 1.0]
        worst_r, worst_k = min(pairs)
        rows.append((f"no case where fused is slower than eager ({len(pairs)} paired cases)", "0 cases",
                     f"{len(slower)} slower; worst {worst_r:.2f}x at {_case_text(worst_k)}",
                     "met" if not slower else "NOT met", ""))
    else:
        rows.append(("no case where fused is slower than eager", "0 cases", NONE, "not measured", ""))
    steps = res["steps"]
    r = ratio(steps.get("attention_at"), steps.get("vanilla"))
    rows.append(("attention_at training step / vanilla step", f"<= {benchlib.GOAL_AT_STEP_RATIO:g}x",
                 fmt_ratio(r), NONE if r is None and not steps else _met(r, benchlib.GOAL_AT_STEP_RATIO, below=True), ""))
    return rows


def _allocator_goal_rows(res: dict) -> list[tuple[str, str, str, str, str]]:
    """Goals measured again in a process of their own per allocator (allocator.py's op-none and op-bwd-long):
    under glibc's defaults, and with freed memory kept in the process (fused_attn_at.tune_glibc_malloc); the rows
    above are the benchmark session's, under glibc's defaults."""
    alloc = res.get("allocator") or {}
    variants = alloc.get("variants", {})
    rows = []
    B, T, H = benchlib.GOAL_SHAPE
    per_fault = first_touch_per_fault(res)

    def op(variant, method):
        return variants.get(variant, {}).get("methods", {}).get(method)

    def host(m):
        return (f"{m['minflt']:.0f} page faults per call (at {fmt_time(per_fault)} each, first touch), "
                f"{m['nivcsw']:.2f} involuntary context switches per call")

    for name, how in (("glibc", "glibc's defaults"), ("glibc-mallopt", "fused_attn_at.tune_glibc_malloc()")):
        m = op(name, "op-none")
        if m:
            tail = m["p90"] / m["p50"]
            rows.append(_goal(f"op fwd+bwd, B={B} T={T} H={H}, none, end-to-end p90 / p50, own process, {how}",
                              f"<= {benchlib.GOAL_P90_P50:g}", f"{tail:.2f}x ({fmt_pcts(m)}; {m['minflt']:.0f} page "
                              "faults per call)", tail, benchlib.GOAL_P90_P50, lambda m=m: host(m), below=True))
    LB, LT, LH = 64, 1024, 256
    ws = benchlib.working_set_bytes(LB, LT, LH, "float32", "bwd")
    bw = bw_at(res, ws, "read")
    nbytes = benchlib.ideal_bytes(LB, LT, LH, "float32", "none", "bwd")
    for name, how in (("glibc", "glibc's defaults (dh mmapped fresh)"),
                      ("glibc-heap", "tune_glibc_malloc(mmap_max=0) (dh reused)")):
        m = op(name, "op-bwd-long")
        if m and bw:
            frac = nbytes / m["p50"] / 1e9 / bw
            rows.append(_goal(f"op bwd, B={LB} T={LT} H={LH} none, own process, {how}: % of the read bandwidth at "
                              "its working set", f">= {benchlib.GOAL_READ_FRACTION:.0%}",
                              f"{frac:.0%} ({nbytes / m['p50'] / 1e9:.3g} of {bw:.3g} GB/s; p50 {fmt_time(m['p50'])})",
                              frac, benchlib.GOAL_READ_FRACTION, lambda m=m: host(m)))
    return rows


def first_touch_per_fault(res: dict) -> float | None:
    us = (bw_profile(res["raw"]).get("first_touch") or {}).get("us_per_fault")
    return None if us is None else us * 1e-6


def _goal(name, target, measured, value, threshold, bound, below=False):
    verdict = _met(value, threshold, below)
    return (name, target, measured, verdict, bound() if verdict == "NOT met" else "")


def _bound_roofline(res, B, T, H, pert, fused) -> str:
    """Bytes, bandwidths at the working set, and where the time beyond the kernels goes (op breakdown)."""
    nread, nwrite = benchlib.ideal_bytes_split(B, T, H, "float32", pert, "fwdbwd")
    ws = benchlib.working_set_bytes(B, T, H, "float32", "fwdbwd")
    rbw, wbw = bw_at(res, ws, "read"), bw_at(res, ws, "write")
    text = (f"reads {mib(nread)} at {fmt_num(rbw)} GB/s + writes {mib(nwrite)} at {fmt_num(wbw)} GB/s "
            f"(bandwidths at its {mib(ws)} working set)")
    b = res["breakdown"].get((B, T, H, pert))
    if b:
        ops = (b.get("ops_pct") or {}).get("p50")
        e2e = (b.get("e2e_pct") or {}).get("p50") or b["median"]
        floor = roofline(res, B, T, H, pert, "fwdbwd")
        text += (f"; the kernels alone (direct ops) take {fmt_time(ops)}"
                 + (f" = {floor / ops:.0%} of the roofline" if ops and floor else "")
                 + f", the rest of the {fmt_time(e2e)} end-to-end: {_beyond_text(b)}")
    return text


def _beyond_text(b: dict) -> str:
    parts = breakdown_parts(b)
    return ", ".join(f"{name} {fmt_time(v)}" for name, v in parts.items() if v is not None) or NONE


def _bound_speedup(res, other, floor, B, T, H, pert) -> str:
    if other is None or floor is None:
        return "not measured"
    return (f"{other['backend']} takes {fmt_time(other['median'])}; at the roofline ({fmt_time(floor)}) a kernel "
            f"would be {other['median'] / floor:.2f}x faster, the most any kernel can show here")


def _bound_tail(res, B, T, H, pert, fused) -> str:
    b = res["breakdown"].get((B, T, H, pert))
    text = f"p10/p50/p90 {fmt_pcts({q: pct_of(fused, q) for q in ('p10', 'p50', 'p90')})}"
    if b:
        rus = b.get("e2e_rusage") or {}
        text += (f"; per call {rus.get('nivcsw', 0):.2f} involuntary context switches (another process took the "
                 f"core), {rus.get('minflt', 0):.0f} page faults; the kernels alone p10/p50/p90 "
                 f"{fmt_pcts(b.get('ops_pct'))}")
    return text


def _bound_long(res, entry, read_bw, mode) -> str:
    B, T, H, pert = entry["B"], entry["T"], entry["H"], entry["perturbation"]
    floor = roofline(res, B, T, H, pert, mode)
    nread, nwrite = benchlib.ideal_bytes_split(B, T, H, "float32", pert, mode)
    if floor is None:
        return "not measured"
    most = entry["ideal_bytes"] / floor / 1e9 / read_bw
    ws = benchlib.working_set_bytes(B, T, H, "float32", mode)
    return (f"reads {mib(nread)}, writes {mib(nwrite)}; with writes at the write bandwidth at {mib(ws)} "
            f"({fmt_num(bw_at(res, ws, 'write'))} GB/s) the most a kernel can reach is {most:.0%} of the read "
            f"bandwidth; this one reaches {floor / entry['median']:.0%} of that roofline")


def _bound_pair(res) -> str:
    """The pair path's passes over h against vanilla's, priced at the working set's bandwidths."""
    pair = res["pair"]
    at = pair.get("pair-at") or {}
    B, T, H = (at["B"], at["T"], at["H"]) if at else benchlib.GOAL_SHAPE
    bth = B * T * H * 4
    ws = benchlib.working_set_bytes(B, T, H, "float32", "fwdbwd")
    rbw, wbw = bw_at(res, ws, "read"), bw_at(res, ws, "write")
    text = "passes over h (reads + dh writes): pair-at 4 + 1, vanilla 2 + 1"
    if rbw and wbw:
        def t(reads, writes):
            return reads * bth / (rbw * 1e9) + writes * bth / (wbw * 1e9)
        text += (f"; at the bandwidths of the {mib(ws)} working set that is {fmt_time(t(4, 1))} vs "
                 f"{fmt_time(t(2, 1))}: a memory-bound ratio of {t(4, 1) / t(2, 1):.2f}x")
    if pair.get("pair-at") and pair.get("vanilla"):
        text += (f"; measured p50 {fmt_time(pair['pair-at']['median'])} vs {fmt_time(pair['vanilla']['median'])}")
        k_at = (pair["pair-at"].get("profile") or {}).get("kernel_s")
        k_v = (pair["vanilla"].get("profile") or {}).get("kernel_s")
        if k_at and k_v:
            text += (f", of which the kernels (profiler self time) {fmt_time(k_at)} vs {fmt_time(k_v)} "
                     f"({k_at / k_v:.2f}x)")
    return text


FAULTS_PART = "page faults (inside the ops' time)"


def breakdown_parts(b: dict) -> dict:
    """Where a case's end-to-end time beyond the kernels goes, per call, all measured: allocation (profiler
    self time of allocation ops), page faults (faults per call x the first-touch cost per fault of bandwidth.py),
    autograd (profiler self time of the engine and its nodes), other aten ops, and Python + host (the rest of the
    end-to-end p50 beyond the profiled self times)."""
    prof = b.get("profile") or {}
    e2e = (b.get("e2e_pct") or {}).get("p50") or b.get("median")
    faults = (b.get("e2e_rusage") or {}).get("minflt")
    fault_s = faults * b["us_per_fault"] * 1e-6 if faults is not None and b.get("us_per_fault") else None
    seen = sum(prof.get(k, 0.0) for k in ("kernel_s", "alloc_s", "autograd_s", "other_ops_s"))
    return {"allocation": prof.get("alloc_s"), FAULTS_PART: fault_s,
            "autograd": prof.get("autograd_s"),
            "other aten ops": prof.get("other_ops_s"),
            "Python + host": max(0.0, e2e - seen) if e2e is not None and prof else None}


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
            head += [f"{name} vs eager", f"{name} vs compile", f"{name} GB/s", f"{name} % roofline",
                     f"{name} p90/p50"]
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
                        fl = roofline(res, B, T, H, pert, mode, dtype) if f and device == "cpu" else None
                        if fl is not None:
                            pct = f"{100 * fl / f['median']:.0f}%"
                        else:  # a GPU, or an older JSON: the single read bandwidth
                            pct = NONE if g is None or bw is None else f"{100 * g / bw:.0f}% of read"
                        tail = pct_of(f, "p90") / f["median"] if f and pct_of(f, "p90") else None
                        row += [fmt_ratio(ratio(eager, f)), fmt_ratio(ratio(compiled, f)), fmt_num(g), pct,
                                fmt_ratio(tail) if tail else spread(f)]
                    if not fused_names:
                        row += [fmt_ratio(ratio(eager, compiled)), fmt_num(gbps(eager))]
                    lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    return lines


def roofline_table(res: dict) -> list[str]:
    """The bandwidth profile of the run: read/write/copy GB/s per array size, and the first-touch cost."""
    profile = bw_profile(res["raw"])
    if not profile.get("sizes"):
        return ["Not measured in this run (a JSON from before the per-size profile: one read bandwidth only).", ""]
    lines = [f"Measured at the start of the run (`bandwidth.measure_profile`, {profile.get('threads')} threads, "
             f"{profile.get('reps')} repetitions per size, warm buffers: allocated and touched before timing). GB/s "
             "p10 / p50 / p90; read = torch.sum, write = fill_, copy = copy_ (read + write bytes). Each case's roofline "
             "takes the p50 read and write bandwidth at its own working-set size (log-log interpolation between "
             "these sizes; benchlib.working_set_bytes, benchlib.roofline_seconds).", "",
             "| array | read GB/s | write GB/s | copy GB/s |", "|---|---|---|---|"]
    for size in sorted(profile["sizes"], key=lambda x: x["mib"]):
        cells = [" / ".join(f"{size[k][q]:.3g}" for q in ("p10", "p50", "p90")) for k in ("read", "write", "copy")]
        lines.append(f"| {size['mib']:g} MiB | " + " | ".join(cells) + " |")
    ft = profile.get("first_touch")
    if ft:
        per_fault = ft.get("us_per_fault")
        lines += ["", f"First touch (a fresh {ft['mib']:g} MiB array: torch.empty + fill_, what an op pays for an output "
                  f"in memory the allocator had returned to the OS): {ft['gbps']:.3g} GB/s, {ft['faults_per_mib']:.0f} "
                  f"page faults per MiB, {fmt_num(per_fault)} us per fault."]
    end = res["raw"].get("fused_attn_at_bandwidth", {}).get("cpu", {}).get("end", {})
    if end.get("sizes"):
        lines += ["", "At the end of the run, p50 read GB/s: " + ", ".join(
            f"{x['mib']:g} MiB {x['read']['p50']:.3g}" for x in sorted(end["sizes"], key=lambda x: x["mib"])) + "."]
    return lines + [""]


LIMIT_CASES = tuple((benchlib.GOAL_SHAPE, p, "fwdbwd") for p in benchlib.PERTURBATIONS) + tuple(
    ((64, T, 256), "none", m) for T in (1024, 4096) for m in benchlib.MODES)


def limit_section(res: dict) -> list[str]:
    """'Where the limit is', from the per-size roofline: each case against the bandwidth at its own working set."""
    pool, profile = res["pool"], bw_profile(res["raw"])
    if not profile.get("sizes"):
        return ["Not measured (no per-size bandwidth profile in this run).", ""]
    import bandwidth

    B, T, H = benchlib.GOAL_SHAPE
    ws = benchlib.working_set_bytes(B, T, H, "float32", "fwdbwd")
    largest = max(profile["sizes"], key=lambda x: x["mib"])
    r_ws, r_dram = bandwidth.bandwidth_at(profile, ws, "read"), largest["read"]["p50"]
    nbytes = benchlib.ideal_bytes(B, T, H, "float32", "none", "fwdbwd")
    floor = roofline(res, B, T, H, "none", "fwdbwd")
    lines = [f"Roofline = ideal bytes read / read bandwidth + bytes written / write bandwidth, both measured in this run "
             f"at the case's working-set size (the distinct bytes it touches: h, and dh for a backward). The goal shape "
             f"B={B} T={T} H={H} fwd+bwd moves {mib(nbytes)} over a {mib(ws)} working set, read at {r_ws:.3g} GB/s "
             f"here against {r_dram:.3g} GB/s at {largest['mib']:g} MiB: its roofline is {fmt_time(floor)} (perturbation "
             f"none), where dividing its bytes by the {largest['mib']:g}-MiB read bandwidth gives "
             f"{fmt_time(nbytes / (r_dram * 1e9))}. The bound on a speedup is baseline p50 / roofline; 'kernels' is the "
             "direct C++ ops' p50 (op breakdown below).", "",
             "| case | working set | read / write | GB/s at that size (read / write) | roofline | fused p50 | % roofline "
             "| kernels | eager | bound vs eager | compile | bound vs compile |", "|" + "---|" * 12]
    for (b, t, h), pert, mode in LIMIT_CASES:
        base = ("cpu", "float32", b, t, h, pert, mode)
        fused = pool.get(base + ("cpu",))
        if fused is None:
            continue
        w = benchlib.working_set_bytes(b, t, h, "float32", mode)
        nread, nwrite = benchlib.ideal_bytes_split(b, t, h, "float32", pert, mode)
        fl = roofline(res, b, t, h, pert, mode)
        bd = res["breakdown"].get((b, t, h, pert)) if mode == "fwdbwd" else None
        kern = (bd.get("ops_pct") or {}).get("p50") if bd else None
        cells = [f"B={b} T={t} H={h} {pert} {mode}", mib(w), f"{mib(nread)} / {mib(nwrite)}",
                 f"{bandwidth.bandwidth_at(profile, w, 'read'):.3g} / {bandwidth.bandwidth_at(profile, w, 'write'):.3g}",
                 fmt_time(fl), fmt_time(fused["median"]), f"{fl / fused['median']:.0%}" if fl else NONE, fmt_time(kern)]
        for backend in ("eager", "compile"):
            e = pool.get(base + (backend,))
            cells += [fmt_time(e and e["median"]), fmt_ratio(e["median"] / fl) if e and fl else NONE]
        lines.append("| " + " | ".join(cells) + " |")
    if lines[-1].startswith("|---"):
        lines[-3:] = lines[-3:-2] + ["", "None of these cases was measured in this run."]
    lines.append("")
    # What follows from the table, computed (never a fixed sentence).
    for pert in benchlib.PERTURBATIONS:
        base = ("cpu", "float32", B, T, H, pert, "fwdbwd")
        fused, eager, compiled = (pool.get(base + (x,)) for x in ("cpu", "eager", "compile"))
        fl = roofline(res, B, T, H, pert, "fwdbwd")
        if not (fused and fl):
            continue
        parts = [f"- {pert}: the op runs at {fl / fused['median']:.0%} of its roofline"]
        for e, target, name in ((eager, benchlib.GOAL_EAGER_SPEEDUP, "eager"),
                                (compiled, benchlib.GOAL_COMPILE_SPEEDUP, "compile")):
            if e:
                bound = e["median"] / fl
                parts.append(f"{target:g}x over {name} is {'within' if bound >= target else 'beyond'} reach "
                             f"(bound {bound:.2f}x, measured {e['median'] / fused['median']:.2f}x)")
        bd = res["breakdown"].get((B, T, H, pert))
        if bd and (bd.get("ops_pct") or {}).get("p50"):
            k = bd["ops_pct"]["p50"]
            e2e = (bd.get("e2e_pct") or {}).get("p50") or bd["median"]
            parts.append(f"the kernels alone take {fmt_time(k)} ({fl / k:.0%} of the roofline) of {fmt_time(e2e)} "
                         f"end-to-end; beyond them: {_beyond_text(bd)}")
        lines.append("; ".join(parts) + ".")
    return lines + [""]


def breakdown_table(res: dict) -> list[str]:
    bd = res["breakdown"]
    if not bd:
        return ["Not measured in this run (bench_op_breakdown.py).", ""]
    lines = ["Per case (cpu, float32, fwd+bwd), in one process: **end-to-end** = `fused_attn_at.attention_pool` + "
             "`torch.autograd.grad` (what training pays); **kernels** = `torch.ops.fused_attn_at.attention_pool_fwd` + "
             "`attention_pool_bwd` called directly under no_grad on pre-allocated inputs (the C++ ops have no out= "
             "entry, so this includes allocating their outputs, nothing of Python's or autograd's); p10 / p50 / p90 of "
             "the timed rounds. The rest of the end-to-end time, per call: allocation = torch.profiler self CPU time of "
             "allocation ops; page faults = minor faults per call (getrusage) x the first-touch cost per fault of the "
             "bandwidth profile (an op pays them while writing a fresh output, so they lie inside the kernel and "
             "allocation times, not on top of them); autograd "
             "= profiler self time of the engine and its nodes; Python + host = end-to-end p50 minus all profiled self "
             "times (the op's checks, autograd.grad's Python, preemption); ctx sw = involuntary context switches per "
             "call (another process took the core).", "",
             "| case | end-to-end p10 / p50 / p90 | kernels p10 / p50 / p90 | fwd op p50 | bwd op p50 | beyond kernels "
             "| kernel self (profiler) | allocation | page faults | autograd | other aten ops | Python + host | ctx sw |",
             "|" + "---|" * 13]
    for (B, T, H, pert), b in sorted(bd.items()):
        e2e = b.get("e2e_pct") or {"p50": b["median"]}
        ops = b.get("ops_pct") or {}
        parts = breakdown_parts(b)
        faults = (b.get("e2e_rusage") or {}).get("minflt")
        beyond = e2e["p50"] - ops["p50"] if ops.get("p50") else None
        cells = [f"B={B} T={T} H={H} {pert}", fmt_pcts(e2e), fmt_pcts(ops),
                 fmt_time((b.get("ops_fwd_pct") or {}).get("p50")), fmt_time((b.get("ops_bwd_pct") or {}).get("p50")),
                 fmt_time(beyond), fmt_time((b.get("profile") or {}).get("kernel_s")), fmt_time(parts["allocation"]),
                 NONE if faults is None else f"{faults:.3g} ({fmt_time(parts[FAULTS_PART])})",
                 fmt_time(parts["autograd"]), fmt_time(parts["other aten ops"]), fmt_time(parts["Python + host"]),
                 fmt_num((b.get("e2e_rusage") or {}).get("nivcsw"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def pair_table(res: dict) -> list[str]:
    pair = res["pair"]
    if not pair:
        return ["Not measured in this run (bench_pair_step.py).", ""]
    first = next(iter(pair.values()))
    vanilla = pair.get("vanilla")
    lines = [f"The pooling part of one training step at B={first['B']} T={first['T']} H={first['H']} (cpu, float32): from "
             "h and scores (leaves) through the head (Linear(H, 1)) and the loss to their gradients. vanilla: the clean "
             "op; two_ops: clean op, g by autograd.grad, perturbed op, both backwards (the path before the pair op); "
             "pair: `adversarial_attention_loss` on cpu (clean forward without autograd, g by attention_scores_grad, "
             "attention_pool_pair, one backward). Passes over h: reads + [B,T,H] gradient writes.", "",
             "Kernels = profiler self CPU time of the fused_attn_at:: ops per call; the rest of the p50 is the head, "
             "the loss, autograd, allocation and Python.", "",
             "| variant | passes (reads + writes) | p10 / p50 / p90 | vs vanilla | kernels | kernels vs vanilla's "
             "| page faults per call |",
             "|---|---|---|---|---|---|---|"]
    for name in ("vanilla", "two_ops-at", "pair-at", "two_ops-iat", "pair-iat", "two_ops-rp", "pair-rp"):
        e = pair.get(name)
        if e is None:
            continue
        reads, writes = PASSES[name]
        faults = (e.get("rusage") or {}).get("minflt")
        kern = (e.get("profile") or {}).get("kernel_s")
        kern_v = ((vanilla or {}).get("profile") or {}).get("kernel_s")
        lines.append(f"| {name} | {reads} + {writes} | {fmt_pcts(e.get('pct') or {'p50': e['median']})} | "
                     f"{fmt_ratio(ratio(e, vanilla))} | {fmt_time(kern)} | "
                     f"{fmt_ratio(kern / kern_v) if kern and kern_v else NONE} | "
                     f"{NONE if faults is None else f'{faults:.0f}'} |")
    return lines + [""]


# ------------------------------------------------------------------------------- self-attention (issue 18)
SA_GOAL_SDPA_RATIO = 1.5  # perturbed_attention(cpu, None) fwd+bwd p50 / SDPA's, B=8 nh=4 T=512 d=64
SA_GOAL_STEP_TIME = 2.3  # AT step (SelfAttentionAT "at", cpu) p50 / vanilla step p50, 2-layer Transformer, T=1024
SA_GOAL_STEP_MEMORY = 1.2  # ... peak resident growth of one step (fresh process) / vanilla's


def _sa_growth(entry: dict | None) -> float | None:
    return ((entry or {}).get("memory") or {}).get("growth_bytes")


def _sa_growth_live(entry: dict | None) -> float | None:
    """The growth measured with glibc's mmap threshold fixed at 64 KiB (bench_self_attention.LIVE_BYTES_ENV):
    the live bytes at the step's peak."""
    return ((entry or {}).get("memory_live") or {}).get("growth_bytes")


def _sa_map_bytes(entry: dict) -> int:
    """One float32 [B, nh, T, T] attention map of the step's shape."""
    return entry["B"] * entry["heads"] * entry["T"] ** 2 * 4


def sa_goal_rows(res: dict) -> list[tuple[str, str, str, str, str]]:
    """Issue 18's goals: the op vs SDPA; the AT step vs the vanilla step in time and in peak memory."""
    op, st = res.get("sa_op", {}), res.get("sa_step", {})
    rows = []
    cpu, sdpa, ref = op.get("cpu"), op.get("sdpa"), op.get("reference")
    shape = cpu or sdpa or {}
    r = ratio(cpu, sdpa)

    def bound_op():
        text = (f"p10 / p50 / p90: cpu {fmt_pcts(cpu.get('pct'))}, SDPA {fmt_pcts(sdpa.get('pct'))}")
        if ref:
            text += f"; the reference (maps materialised) takes {fmt_time(ref['median'])} = {ratio(ref, sdpa):.2f}x SDPA"
        return text

    where = (f", B={shape['B']} nh={shape['nh']} T={shape['T']} d={shape['d']}" if shape else "")
    rows.append(_goal(f"perturbed_attention fwd+bwd (cpu, perturbation=None) / SDPA fwd+bwd{where}",
                      f"<= {SA_GOAL_SDPA_RATIO:g}x", NONE if r is None else
                      f"{r:.2f}x ({fmt_time(cpu['median'])} vs {fmt_time(sdpa['median'])})", r, SA_GOAL_SDPA_RATIO,
                      bound_op, below=True))
    at, van = st.get("at-cpu"), st.get("vanilla-cpu")
    first = at or van or {}
    where = f", 2-layer Transformer, B={first['B']} T={first['T']}" if first else ""
    r = ratio(at, van)

    def bound_time():
        return (f"the AT step runs 2 forwards + 2 backwards where vanilla runs 1 + 1 (2x inherent); p50 "
                f"{fmt_time(at['median'])} vs {fmt_time(van['median'])}: {fmt_time(at['median'] - 2 * van['median'])} "
                "beyond twice vanilla")
    rows.append(_goal(f"AT step (SelfAttentionAT 'at', cpu) / vanilla step, time{where}", f"<= {SA_GOAL_STEP_TIME:g}x",
                      NONE if r is None else f"{r:.2f}x ({fmt_time(at['median'])} vs {fmt_time(van['median'])})", r,
                      SA_GOAL_STEP_TIME, bound_time, below=True))
    ga, gv = _sa_growth(at), _sa_growth(van)
    m = ga / gv if ga is not None and gv else None

    def bound_memory():
        d = at["B"] * at["T"] * at["d_model"] * 4
        layers = at["layers"]
        records = (4 * layers - 3) * d  # Q, K, V, dO per layer; the first layer's Q, K, V are the adversarial ones
        grads = 4 * (at.get("parameters") or 0)
        text = (f"what must live through the adversarial pass: the records G is recomputed from (per layer Q, K, V, "
                f"dO, {mib(d)} each; the first layer's Q, K, V equal the adversarial pass's and are shared: "
                f"{mib(records)} for {layers} layers) and L_clean's gradient in .grad ({mib(grads)}; a vanilla step's "
                "forward runs with none)")
        la, lv = _sa_growth_live(at), _sa_growth_live(van)
        if la is not None and lv:
            floor = (lv + records + grads) / lv
            text += (f"; in live bytes (glibc mmap threshold 64 KiB) the step grows {mib(la)} vs {mib(lv)} = "
                     f"{la / lv:.2f}x, the floor {mib(lv)} + {mib(records + grads)} = {floor:.2f}x "
                     f"(> {SA_GOAL_STEP_MEMORY:g}x: the goal is below what the math allows); the default allocator "
                     f"adds {mib(ga - la)} of freed blocks it keeps (vanilla {mib(gv - lv)})")
        gr = _sa_growth(st.get("at-reference"))
        if gr is not None:
            text += f"; the materialised AT step grows it by {mib(gr)}"
        return text
    rows.append(_goal(f"AT step (cpu) / vanilla step, peak memory growth (fresh process){where}",
                      f"<= {SA_GOAL_STEP_MEMORY:g}x", NONE if m is None else f"{m:.2f}x ({mib(ga)} vs {mib(gv)})", m,
                      SA_GOAL_STEP_MEMORY, bound_memory, below=True))
    return rows


def sa_section(res: dict) -> list[str]:
    op, st = res.get("sa_op", {}), res.get("sa_step", {})
    if not op and not st:
        return ["Not measured in this run (bench_self_attention.py).", ""]
    lines = []
    if op:
        first = next(iter(op.values()))
        sdpa = op.get("sdpa")
        lines += [f"**The op**, forward + backward (`torch.autograd.grad` of a fixed dO into q, k, v) at B={first['B']} "
                  f"nh={first['nh']} T={first['T']} d={first['d']}, float32, no key mask, torch threads "
                  f"{first.get('threads')}, side by side in one run. vs SDPA = p50 / SDPA's p50 (> 1: slower than "
                  "SDPA).", "", "| backend | what | p10 / p50 / p90 | vs SDPA |", "|---|---|---|---|"]
        what = {"sdpa": "torch.nn.functional.scaled_dot_product_attention",
                "cpu": "perturbed_attention(backend='cpu', perturbation=None): flash-style C++ kernels",
                "reference": "perturbed_attention(backend='reference'): [B,nh,T,T] maps materialised"}
        for name in ("sdpa", "cpu", "reference"):
            e = op.get(name)
            if e is not None:
                lines.append(f"| {name} | {what[name]} | {fmt_pcts(e.get('pct') or {'p50': e['median']})} | "
                             f"{fmt_ratio(ratio(e, sdpa))} |")
        lines.append("")
    if st:
        first = next(iter(st.values()))
        van = st.get("vanilla-cpu")
        lines += [f"**A training step** (zero_grad, backward, AdamW step) of a {first.get('layers')}-layer pre-LN "
                  f"Transformer classifier (d_model {first['d_model']}, {first['heads']} heads, ff {first['ff']}, "
                  f"{first.get('parameters')} parameters) at B={first['B']} T={first['T']}, padded batch, float32, "
                  f"torch threads {first.get('threads')}. Peak growth: in a fresh process per variant, after a warm-up "
                  "step at T=16, the peak resident set after one step minus the peak before it (VmHWM). Ratios are to "
                  "vanilla-cpu (> 1: slower / more memory).", "",
                  "| variant | what runs | p10 / p50 / p90 | time vs vanilla-cpu | peak growth | memory vs vanilla-cpu | "
                  "live-bytes growth (mmap threshold 64 KiB) | vs vanilla-cpu |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, e in st.items():
            g, gv = _sa_growth(e), _sa_growth(van)
            lg, lgv = _sa_growth_live(e), _sa_growth_live(van)
            lines.append(f"| {name} | {e.get('description', '')} | {fmt_pcts(e.get('pct') or {'p50': e['median']})} | "
                         f"{fmt_ratio(ratio(e, van))} | {NONE if g is None else mib(g)} | "
                         f"{fmt_ratio(g / gv) if g is not None and gv else NONE} | {NONE if lg is None else mib(lg)} | "
                         f"{fmt_ratio(lg / lgv) if lg is not None and lgv else NONE} |")
        gr, ga, gvr = (_sa_growth(st.get(n)) for n in ("at-reference", "at-cpu", "vanilla-reference"))
        if gr is not None:
            e = st["at-reference"]
            parts = [f"The materialised AT step (at-reference) grows the peak by {mib(gr)}"]
            if _sa_growth(van):
                parts.append(f"{gr / _sa_growth(van):.2f}x vanilla-cpu's")
            if ga:
                parts.append(f"{gr / ga:.2f}x at-cpu's")
            if gvr:
                parts.append(f"{gr / gvr:.2f}x its own vanilla's")
            lines += ["", ", ".join(parts) + f"; one float32 [B,nh,T,T] map is {mib(_sa_map_bytes(e))} here."]
        lines.append("")
    return lines


def allocator_table(res: dict) -> list[str]:
    alloc = res.get("allocator")
    if not alloc:
        return ["Not measured in this run (bench_allocator.py / allocator.py).", ""]
    methods = alloc["methods"]
    glibc = alloc["variants"].get("glibc", {}).get("methods", {})
    lines = [f"The default training step (bench_training_step.py's) and the op alone (op-none: attention_pool + "
             f"autograd.grad, cpu backend, B=64 T=256 H=256), one subprocess per allocator, {alloc['steps']} "
             f"timed calls per method in {alloc['passes']} interleaved passes; p10 / p50 / p90 time per call; vs glibc "
             "= glibc's p50 / this p50 (> 1: faster than glibc's defaults); faults = minor page faults per call.", "",
             "| allocator | " + " | ".join(f"{m} p10 / p50 / p90 | {m} vs glibc | {m} faults" for m in methods)
             + " | peak RSS |", "|---|" + "---|---|---|" * len(methods) + "---|"]
    for name, v in alloc["variants"].items():
        if "absent" in v:
            lines.append(f"| {name} | " + " | ".join([f"absent: {v['absent']}"] + [""] * (3 * len(methods))) + " |")
            continue
        cells = [f"{name} ({v['what']})"]
        for m in methods:
            s = v["methods"].get(m)
            if s is None:
                cells += [NONE] * 3
                continue
            g = glibc.get(m, {}).get("p50")
            cells += [fmt_pcts(s), fmt_ratio(g / s["p50"]) if g else NONE, f"{s['minflt']:.0f}"]
        cells.append(NONE if v.get("max_rss_mib") is None else f"{v['max_rss_mib']:.0f} MiB")
        lines.append("| " + " | ".join(cells) + " |")
    best = _best_allocator(alloc)
    if best:
        lines += ["", best]
    return lines + [""]


def _best_allocator(alloc: dict) -> str:
    """One computed sentence: the variant with the lowest p50 of the first method, and by how much."""
    method = alloc["methods"][0]
    timed = {n: v["methods"][method]["p50"] for n, v in alloc["variants"].items() if method in v.get("methods", {})}
    if "glibc" not in timed or len(timed) < 2:
        return ""
    best = min(timed, key=timed.get)
    if best == "glibc":
        return f"For {method}, glibc's defaults were the fastest of the variants measured."
    return (f"For {method}, {best} gave the lowest p50: {timed['glibc'] / timed[best]:.2f}x glibc's defaults "
            f"({fmt_time(timed[best])} vs {fmt_time(timed['glibc'])}).")


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
             "", "| method | what runs | p10 / p50 / p90 | vs vanilla |", "|---|---|---|---|"]
    for method, entry in steps.items():
        lines.append(f"| {method} | {entry.get('description', '')} | "
                     f"{fmt_pcts(entry.get('pct') or {'p50': entry['median']})} | {fmt_ratio(ratio(entry, vanilla))} |")
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
        lines.append(f"- {device} bandwidth (threads={start.get('threads')}, {start.get('array_mib')} MiB arrays, median; "
                     "per size: Roofline per working-set size): "
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
                        ax.axhline(benchlib.GOAL_READ_FRACTION * bw, color="grey", lw=0.8, ls=":", label=f"{benchlib.GOAL_READ_FRACTION:.0%} read BW")
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
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Medians (= p50) unless p10/p90 are named; "
        "ratios are baseline median / fused median (> 1: fused is faster). GB/s counts the bytes an ideal "
        "kernel must move (benchlib.ideal_bytes) over the median time; % roofline compares the case's roofline "
        "(its bytes at the read and write bandwidth measured at its own working-set size, in the same run) with "
        "its median.",
        "",
        "## Machine",
        "",
        *machine,
        "",
        "## Goals (CPU, float32)",
        "",
        "Issue 17's goals, then issue 18's (self-attention), each a ratio measured in this run (2 threads); for a "
        "goal not met, the last column gives the measurement that bounds it.",
        "",
        "| goal | target | measured | | what bounds it |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in goal_rows(res) + sa_goal_rows(res)),
        "",
        "## Roofline per working-set size",
        "",
        *roofline_table(res),
        "### Where the limit is",
        "",
        *limit_section(res),
        "## Kernel vs end-to-end",
        "",
        *breakdown_table(res),
        "## The AT step's pooling part: pair op vs two single ops",
        "",
        *pair_table(res),
        "## Self-attention (issue 18)",
        "",
        *sa_section(res),
        "## Training step",
        "",
        *step_table(res),
        "## Allocator",
        "",
        *allocator_table(res),
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
