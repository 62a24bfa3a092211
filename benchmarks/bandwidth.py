"""The machine's memory bandwidth, the roofline the attention benchmarks are held against.

    python benchmarks/bandwidth.py [--threads 2] [--mib 256] [--reps 15] [--device cpu]

read: torch.sum over a float32 array far larger than the last-level cache (bytes = the array);
copy: dst.copy_(src) (bytes = read + write = 2 x the array, as STREAM counts it).
Both run with `threads` torch threads (the benchmarks' thread count) and report the median and the best of
`reps` repetitions in GB/s (1e9 bytes per second). The conftest measures this at the start and the end of
every benchmark session, so that each case's % of roofline comes from the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


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


def measure_bandwidth(threads: int = 2, mib: int = 256, reps: int = 15, device: str = "cpu") -> dict:
    """{'read_gbps', 'read_best_gbps', 'copy_gbps', 'copy_best_gbps', ...}; medians unless named best."""
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the benchmarks)")
    parser.add_argument("--mib", type=int, default=256, help="array size in MiB (default 256, >> 32 MiB L3)")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions (default 15)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    print(json.dumps(measure_bandwidth(args.threads, args.mib, args.reps, args.device), indent=2))


if __name__ == "__main__":
    main()
