#!/usr/bin/env python
"""Peak memory and time of one iAT call (forward + backward with a given G) of perturbed_attention, in a fresh
process: the README's "MiniLM-like" iAT numbers (B=32, 12 heads, d=32; T=64 and T=256).

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python benchmarks/iat_memory.py --backend cpu --T 64
    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python benchmarks/iat_memory.py --backend reference --T 64

    python benchmarks/iat_memory.py --B 2 --heads 4 --T 1024 --d 64 --repeat 7 [--heap]   # the forward's time

Prints the growth of the peak resident set (VmHWM in /proc/self/status, Linux) over the call, with glibc's mmap
threshold fixed as above so that it follows the live bytes (bench_self_attention.py's LIVE_BYTES_ENV), and the
wall time; a MemoryError (the iAT byte limit, FUSED_ATTN_AT_IAT_MAX_BYTES) is printed as such. One thread.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import torch


def peak_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main(argv=None) -> int:
    import fused_attn_at

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("cpu", "triton", "reference"), default="cpu")
    parser.add_argument("--B", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=0, metavar="N",
                        help="then time N more forward calls (the same call again: its maps' sizes recur) and print "
                             "their median")
    parser.add_argument("--heap", action="store_true",
                        help="fused_attn_at.cpu_allocator.tune_glibc_malloc(mmap_max=0) first: blocks of any size "
                             "come from glibc's heap and are reused, instead of fresh mmaps that fault their pages in")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.heap and not fused_attn_at.cpu_allocator.tune_glibc_malloc(mmap_max=0):
        print("--heap: the C library is not glibc; nothing changed")
    gen = torch.Generator().manual_seed(0)
    B, nh, T, d = args.B, args.heads, args.T, args.d
    q, k, v = (torch.randn(B, nh, T, d, generator=gen, requires_grad=True) for _ in range(3))
    key_mask = torch.arange(T)[None] < torch.randint(T // 2, T + 1, (B,), generator=gen)[:, None]  # padded
    G = torch.randn(B, nh, T, T, generator=gen) * 1e-3
    before = peak_mib()
    start = time.perf_counter()
    where = f"{args.backend} B={B} nh={nh} T={T} d={d}"
    try:
        out = fused_attn_at.perturbed_attention(q, k, v, key_mask, perturbation="iat", grad=G, backend=args.backend)
        out.square().sum().backward()
    except MemoryError as exc:
        print(f"{where}: MemoryError: {exc}")
        return 0
    print(f"{where}: {time.perf_counter() - start:.2f} s, peak growth {peak_mib() - before:.0f} MiB "
          f"(G itself {G.numel() * 4 / 2**20:.0f} MiB)")
    if args.repeat > 0:
        times = []
        with torch.no_grad():
            for _ in range(args.repeat):
                start = time.perf_counter()
                fused_attn_at.perturbed_attention(q, k, v, key_mask, perturbation="iat", grad=G, backend=args.backend)
                times.append(time.perf_counter() - start)
        print(f"{where}: forward median {1e3 * sorted(times)[len(times) // 2]:.0f} ms over {args.repeat} calls"
              f"{' (heap)' if args.heap else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
