"""What the memory allocator does to CPU training here (issue 17 item 2): the default training step under
glibc's malloc with its defaults, glibc with its thresholds raised, and jemalloc / tcmalloc preloaded.

    python benchmarks/allocator.py [--steps 200] [--methods attention_at,vanilla] [--threads 2] [--smoke]
                                   [--json out.json]

Each variant runs in a subprocess of its own (the environment below set before Python starts) that builds the
step of bench_training_step.py (the model `experiments/train.py` builds by default, on the fixed median-length
SST batch of 32; --smoke: the synthetic batch), runs warm-up steps, then `--steps` timed steps per method, and
prints p10/p50/p90 step time, minor page faults and involuntary context switches per step, and its peak RSS
(VmHWM). The methods op-none and op-bwd-long time the fused op alone (see DEFAULT_METHODS): the end-to-end
call of the goal table, and the DRAM-resident backward.
    glibc           no variable set (glibc's defaults: mmap for blocks >= a dynamic threshold from 128 KiB,
                    trimming the heap top beyond 128 KiB)
    glibc-tuned     MALLOC_MMAP_THRESHOLD_=32 MiB (glibc's largest) and MALLOC_TRIM_THRESHOLD_=1 GiB: freed
                    memory stays in the process instead of going back to the OS and faulting in again
    glibc-mallopt   the same thresholds set at run time by fused_attn_at.tune_glibc_malloc() (what train.py does)
    glibc-heap      tune_glibc_malloc(mmap_max=0): blocks above 32 MiB come from the heap as well, and stay
    jemalloc        LD_PRELOAD=libjemalloc.so.2 (Debian: apt-get install libjemalloc2)
    tcmalloc        LD_PRELOAD=libtcmalloc_minimal.so.4 (Debian: apt-get install libtcmalloc-minimal4)
A variant whose library is not installed is reported as absent; a preload that did not take (the library is
not mapped into the worker) is reported as such, never timed as if it were that allocator. The variants run
in order twice (ABCD ABCD) and each variant's times pool both passes, so a slow phase of the machine does not
land on one variant only. The benchmark session runs this through bench_allocator.py; report.py renders the
table ("Allocator").
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
VARIANTS = {
    # name: (environment, library to preload or None, what)
    "glibc": ({}, None, "glibc malloc, defaults"),
    "glibc-tuned": ({"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}, None,
                    "glibc, MALLOC_MMAP_THRESHOLD_=32 MiB, MALLOC_TRIM_THRESHOLD_=1 GiB"),
    # the same thresholds set by the process itself at start: what experiments/train.py does on the CPU
    "glibc-mallopt": ({}, None, "glibc, fused_attn_at.tune_glibc_malloc() at start (mallopt; train.py's default)"),
    "glibc-heap": ({}, None, "glibc, fused_attn_at.tune_glibc_malloc(mmap_max=0): blocks above 32 MiB from the "
                             "heap too"),
    "jemalloc": ({}, "libjemalloc.so.2", "jemalloc 5 (LD_PRELOAD)"),
    "tcmalloc": ({}, "libtcmalloc_minimal.so.4", "tcmalloc-minimal (LD_PRELOAD)"),
}
DEFAULT_METHODS = ("attention_at", "vanilla", "op-none", "op-bwd-long")  # attention_at: train.py's default
# A "method" named op-... is the fused op alone instead of a training step (cpu backend, perturbation none):
#   op-none      attention_pool + torch.autograd.grad at the goal shape B=64 T=256 H=256 (issue 17's p90/p50)
#   op-bwd-long  the backward alone at B=64 T=1024 H=256 (DRAM-resident: 64 MiB h read, 64 MiB dh written)
OP_PREFIX = "op-"
LONG_SHAPE = (64, 1024, 256)
MALLOPT = {"glibc-mallopt": {}, "glibc-heap": {"mmap_max": 0}}  # variants that call tune_glibc_malloc(**these)


def find_library(name: str) -> str | None:
    for folder in LIB_DIRS:
        path = pathlib.Path(folder) / name
        if path.exists():
            return str(path)
    return None


def _mapped(fragment: str) -> bool:
    try:
        return fragment in pathlib.Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _peak_rss_mib() -> float | None:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over fork + exec,
    so a worker would report its parent's peak."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ------------------------------------------------------------------------------------------------ worker
def _op_call(name: str, smoke: bool):
    """One call of the cpu op (DEFAULT_METHODS' op-...; smoke: a tiny shape)."""
    import torch

    import benchlib

    reason = benchlib.unavailable_reason("cpu", "cpu", "float32")  # also loads the compiled ops
    if reason:
        raise RuntimeError(f"the cpu backend is unavailable: {reason}")
    if name == "none":
        B, T, H = (2, 16, 8) if smoke else benchlib.GOAL_SHAPE
        case = benchlib.Case("cpu", "float32", B, T, H, "none", "fwdbwd", "cpu")
        return benchlib.breakdown_callables(case, benchlib.make_inputs(case))["e2e"]
    if name != "bwd-long":
        raise ValueError(f"unknown op method op-{name}")
    import fused_attn_at

    B, T, H = (2, 16, 8) if smoke else LONG_SHAPE
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    scores = torch.randn(B, T, generator=g, requires_grad=True)
    grad_context = torch.randn(B, H, generator=g)
    context = fused_attn_at.attention_pool(h, scores, backend="cpu").context
    return lambda: torch.autograd.grad(context, (h, scores), grad_context, retain_graph=True)


def worker(methods, steps: int, warmup: int, threads: int, smoke: bool, tune: str | None = None) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    import benchlib
    import bench_training_step as bts

    if tune:
        import fused_attn_at

        if not fused_attn_at.tune_glibc_malloc(**MALLOPT[tune]):
            raise RuntimeError("tune_glibc_malloc: the C library is not glibc")
    steps_of = [m for m in methods if not m.startswith(OP_PREFIX)]
    setup = bts.load_step_setup(smoke) if steps_of else (None, None, None, "none (the op alone)")
    out = {"methods": {}, "threads": threads, "batch_source": setup[3]}
    built = {m: bts.make_step(m, setup)[0] if m in steps_of else _op_call(m[len(OP_PREFIX):], smoke)
             for m in methods}
    for step in built.values():
        for _ in range(warmup):
            step()
    for method, step in built.items():
        times, counters = benchlib.timed_samples(step, steps)
        out["methods"][method] = {**benchlib.percentiles(times), "times": times, **counters}
    out["max_rss_mib"] = _peak_rss_mib()
    out["maps"] = {name: _mapped(name) for name in ("jemalloc", "tcmalloc")}
    return out


# ---------------------------------------------------------------------------------------------- driver
def run_variant(name: str, methods, steps: int, warmup: int, threads: int, smoke: bool, timeout: float = 900) -> dict:
    env_extra, lib, what = VARIANTS[name]
    result = {"variant": name, "what": what, "env": dict(env_extra)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env.update(env_extra)
    if lib is not None:
        path = find_library(lib)
        if path is None:
            result["absent"] = f"{lib} is not installed"
            return result
        env["LD_PRELOAD"] = path
        result["env"]["LD_PRELOAD"] = path
    cmd = [sys.executable, "-P", str(HERE / "allocator.py"), "--worker", "--methods", ",".join(methods),
           "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)] + (["--smoke"] if smoke else [])
    cmd += ["--tune", name] if name in MALLOPT else []
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    result["wall_s"] = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"allocator variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if lib is not None and not data["maps"].get(name, False):
        result["absent"] = f"LD_PRELOAD={env['LD_PRELOAD']} did not take (the library is not mapped in the worker)"
        return result
    result.update(data)
    return result


def run_all(methods=DEFAULT_METHODS, steps: int = 200, warmup: int = 10, threads: int = 2, smoke: bool = False,
            variants=tuple(VARIANTS), passes: int = 2) -> dict:
    """{'variants': {name: {...p10/p50/p90 per method...}}, 'methods', 'steps', 'passes'}"""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(passes):
        for name in variants:
            runs[name].append(run_variant(name, methods, max(1, steps // passes), warmup, threads, smoke))
    import benchlib

    merged = {}
    for name, parts in runs.items():
        first = parts[0]
        if "absent" in first:
            merged[name] = first
            continue
        entry = {k: first[k] for k in ("variant", "what", "env", "threads", "batch_source")}
        peaks = [p["max_rss_mib"] for p in parts if p.get("max_rss_mib") is not None]
        entry["max_rss_mib"] = max(peaks) if peaks else None
        entry["methods"] = {}
        for method in methods:
            times = [t for p in parts for t in p["methods"][method]["times"]]
            entry["methods"][method] = {**benchlib.percentiles(times), "steps": len(times),
                                        **{k: statistics.mean(p["methods"][method][k] for p in parts)
                                           for k in ("minflt", "nvcsw", "nivcsw")}}
        merged[name] = entry
    return {"variants": merged, "methods": list(methods), "steps": steps, "passes": passes, "smoke": smoke}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per method and variant (default 200)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="synthetic batch (seconds)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the result here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tune", choices=tuple(MALLOPT), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    if args.worker:
        print(json.dumps(worker(methods, args.steps, args.warmup, args.threads, args.smoke, args.tune)))
        return 0
    sys.path.insert(0, str(HERE))
    result = run_all(methods, args.steps, args.warmup, args.threads, args.smoke,
                     tuple(v for v in args.variants.split(",") if v))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    for name, v in result["variants"].items():
        if "absent" in v:
            print(f"{name:12s} absent: {v['absent']}")
            continue
        cells = "  ".join(f"{m} p50 {1e3 * s['p50']:.2f} ms p90 {1e3 * s['p90']:.2f} ms faults/step {s['minflt']:.0f}"
                          for m, s in v["methods"].items())
        print(f"{name:12s} {cells}  peak RSS {v['max_rss_mib'] or 0:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
