"""The machine's memory bandwidth per working-set size: the roofline each benchmark case is held against.

    python benchmarks/bandwidth.py [--threads 2] [--sizes 1,4,16,64,256] [--reps 15] [--device cpu]
    python benchmarks/bandwidth.py --single [--mib 256]      # the old single-size read/copy measurement

Per size (MiB of one array; 1..16 sit in L2/L3, 64 and 256 beyond a 32 MiB L3), with `threads` torch threads
(the benchmarks' count), on buffers allocated and touched before timing (warm):
    read:  torch.sum over the array (bytes = the array)
    write: dst.fill_(1.0) (bytes = the array; on x86 a cached write also reads the line first, which this counts
           as what a kernel writing its output pays)
    copy:  dst.copy_(src) (bytes = read + write = 2 x the array, as STREAM counts it)
each as p10/p50/p90 of `reps` repetitions in GB/s (1e9 bytes/s; a repetition of a small array loops enough times
to last >= ~0.5 ms). And once, first touch: a fresh array of `first_touch_mib` (torch.empty + fill_, as an
op writing a new output of that size pays when the allocator hands back memory it had returned to the OS):
GB/s and minor page faults per MiB, so a case's page faults per call can be priced in time.

bandwidth_at(profile, nbytes, kind) interpolates the p50 bandwidth at a working-set size (log-log between the
measured sizes, clamped outside them): every case's roofline uses it (benchlib.roofline_seconds). The conftest
measures the profile at the start and the end of every benchmark session, so each case's % of roofline comes
from the same run. measure_bandwidth() (one size, read and copy) is what gpu_check.py uses on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time

DEFAULT_SIZES_MIB = (1, 4, 16, 64, 256)
KINDS = ("read", "write", "copy")


def _time_reps(fn, reps: int, sync) -> list[float]:
    fn()  # first touch / page faults stay out of the measurement
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def percentile(values, q: float) -> float:
    """q in [0, 100], linear interpolation between the sorted values (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_bandwidth(threads: int = 2, mib: int = 256, reps: int = 15, device: str = "cpu") -> dict:
    """{'read_gbps', 'read_best_gbps', 'copy_gbps', 'copy_best_gbps', ...} at one size; medians unless named best."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = mib * 2**20 // 4
        src = torch.ones(n, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        read_times = _time_reps(lambda: src.sum(), reps, sync)
        copy_times = _time_reps(lambda: dst.copy_(src), reps, sync)
        nbytes = src.numel() * src.element_size()
        del src, dst
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "device": device,
        "threads": threads,
        "array_mib": mib,
        "reps": reps,
        "read_gbps": nbytes / statistics.median(read_times) / 1e9,
        "read_best_gbps": nbytes / min(read_times) / 1e9,
        "copy_gbps": 2 * nbytes / statistics.median(copy_times) / 1e9,
        "copy_best_gbps": 2 * nbytes / min(copy_times) / 1e9,
    }


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_first_touch(mib: int = 64, reps: int = 3, device: str = "cpu") -> dict:
    """A fresh array each time (torch.empty + fill_): GB/s and minor page faults per MiB (p50 of reps)."""
    import torch

    n = mib * 2**20 // 4
    times, faults = [], []
    for _ in range(reps):
        f0 = _minflt()
        t0 = time.perf_counter()
        x = torch.empty(n, dtype=torch.float32, device=device)
        x.fill_(1.0)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        faults.append(_minflt() - f0)
        del x
    t, f = statistics.median(times), statistics.median(faults)
    return {"mib": mib, "gbps": n * 4 / t / 1e9, "seconds": t, "faults_per_mib": f / mib,
            "us_per_fault": 1e6 * t / f if f else None}


def measure_profile(threads: int = 2, sizes_mib=DEFAULT_SIZES_MIB, reps: int = 15, device: str = "cpu",
                    first_touch_mib: int | None = 64, min_rep_s: float = 5e-4) -> dict:
    """Read/write/copy bandwidth at each size, warm; p10/p50/p90 GB/s of `reps` repetitions per size and kind.

    Returns {'device', 'threads', 'reps', 'sizes': [{'mib', 'read': {'p10','p50','p90'}, 'write': ..., 'copy': ...}],
    'first_touch': {...} or None, plus the single-size keys read_gbps/copy_gbps/array_mib of the largest size
    (what the report showed before the per-size profile)}."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sizes = []
    try:
        for mib in sizes_mib:
            n = max(1, int(mib * 2**20) // 4)
            src = torch.ones(n, dtype=torch.float32, device=device)
            dst = torch.ones(n, dtype=torch.float32, device=device)  # both touched: no page fault is timed
            nbytes = n * 4
            ops = {"read": (lambda: src.sum(), nbytes),
                   "write": (lambda: dst.fill_(1.0), nbytes),
                   "copy": (lambda: dst.copy_(src), 2 * nbytes)}
            entry = {"mib": mib}
            for kind, (fn, moved) in ops.items():
                fn()
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                once = max(time.perf_counter() - t0, 1e-7)
                inner = max(1, math.ceil(min_rep_s / once))  # small arrays: loop so the timer is negligible

                def rep(fn=fn, inner=inner):
                    for _ in range(inner):
                        fn()

                times = [t / inner for t in _time_reps(rep, reps, sync)]
                gbps = [moved / t / 1e9 for t in times]
                entry[kind] = {"p10": percentile(gbps, 10), "p50": percentile(gbps, 50), "p90": percentile(gbps, 90)}
            sizes.append(entry)
            del src, dst
        first_touch = measure_first_touch(first_touch_mib, device=device) if first_touch_mib else None
    finally:
        torch.set_num_threads(previous_threads)
    largest = max(sizes, key=lambda s: s["mib"])
    return {"device": device, "threads": threads, "reps": reps, "sizes": sizes, "first_touch": first_touch,
            "array_mib": largest["mib"], "read_gbps": largest["read"]["p50"], "copy_gbps": largest["copy"]["p50"],
            "write_gbps": largest["write"]["p50"]}


def bandwidth_at(profile: dict, nbytes: float, kind: str = "read") -> float | None:
    """p50 GB/s of `kind` at a working set of `nbytes`: log-log interpolation between the measured sizes,
    the nearest measured size outside them. None for a profile without sizes (an older JSON)."""
    sizes = sorted(profile.get("sizes") or [], key=lambda s: s["mib"])
    points = [(s["mib"] * 2**20, s[kind]["p50"]) for s in sizes if kind in s and s[kind]["p50"] > 0]
    if not points:
        return None
    if nbytes <= points[0][0]:
        return points[0][1]
    if nbytes >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= nbytes <= x1:
            w = (math.log(nbytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
    return points[-1][1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the benchmarks)")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES_MIB)),
                        help="comma list of array sizes in MiB (default 1,4,16,64,256)")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions (default 15)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--single", action="store_true", help="only read/copy at --mib (the old measurement)")
    parser.add_argument("--mib", type=int, default=256, help="array size in MiB for --single (default 256)")
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(measure_bandwidth(args.threads, args.mib, args.reps, args.device), indent=2))
        return
    sizes = tuple(float(x) if "." in x else int(x) for x in args.sizes.split(",") if x.strip())
    profile = measure_profile(args.threads, sizes, args.reps, args.device)
    print(json.dumps(profile, indent=2))
    print("\n  MiB   read p50   write p50   copy p50   (GB/s)")
    for s in profile["sizes"]:
        print(f"{s['mib']:>5} {s['read']['p50']:>10.1f} {s['write']['p50']:>11.1f} {s['copy']['p50']:>10.1f}")


if __name__ == "__main__":
    main()
