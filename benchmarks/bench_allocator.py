"""The allocator table of the report: allocator.py's variants (glibc defaults, glibc thresholds raised,
jemalloc and tcmalloc preloaded) on the default training step, each in a subprocess of its own.

goal/full: every variant, 200 timed steps per method (200 x --bench-time) (attention_at, vanilla) in two interleaved passes;
smoke (--benchmark-disable): one variant (the first installed preload, else glibc), one step, to exercise the
path in seconds. The result goes into the session JSON as fused_attn_at_extras["allocator"].
"""
from __future__ import annotations

import torch

import allocator
import benchlib


def test_allocator_variants(bench_settings, roofline):
    if bench_settings["disabled"]:
        preload = [v for v, (_, lib, _) in allocator.VARIANTS.items() if lib and allocator.find_library(lib)]
        variant = (preload or ["glibc"])[0]  # one subprocess: a preload when one is installed (the longer path)
        result = allocator.run_all(methods=("attention_at",), steps=1, warmup=0, threads=bench_settings["threads"],
                                   smoke=True, variants=(variant,), passes=1)
        assert "methods" in result["variants"][variant], result["variants"][variant]
        return
    roofline("cpu")  # the session's bandwidth profile first, as for every timed case
    steps = max(10, round(200 * bench_settings["time"]))  # 200 at the default --bench-time 1.0
    result = allocator.run_all(steps=steps, warmup=10, threads=bench_settings["threads"],
                               smoke=bench_settings["set"] == "smoke")
    result["torch_threads_parent"] = torch.get_num_threads()
    benchlib.RUN_EXTRAS["allocator"] = result
    for name, variant in result["variants"].items():
        if "absent" in variant:
            print(f"allocator variant {name}: {variant['absent']}")


