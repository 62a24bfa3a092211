"""The op, timed: reference eager vs torch.compile(reference) vs the fused kernels, in one run.

Cases come from conftest.py (--bench-set smoke|goal|full and the --bench-* selection); benchlib.py says
what each case times. Every case first checks that it computes what the eager reference computes (loose
tolerance, untimed): a fast wrong answer must not enter the tables. Nothing here asserts a time.
"""
from __future__ import annotations

import math
import time

import pytest
import torch

import benchlib


def _call(run, setup):
    if setup is None:
        return run()
    args, kwargs = setup()
    return run(*args, **kwargs)


def _calibrate(run, setup, target_s: float, min_rounds: int) -> tuple[int, int]:
    """(rounds, iterations): each round lasts >= ~1 ms (timer and Python overhead negligible), and the
    timed rounds together last about target_s, but never fewer than min_rounds. A case with a setup (the
    backward) runs one iteration per round: pytest-benchmark calls setup once per round."""
    samples = []
    for _ in range(3):
        args, kwargs = setup() if setup is not None else ((), {})
        t0 = time.perf_counter()
        run(*args, **kwargs)
        samples.append(time.perf_counter() - t0)
    per_call = max(sorted(samples)[1], 1e-7)
    iterations = 1 if setup is not None else max(1, math.ceil(1e-3 / per_call))
    rounds = max(min_rounds, min(2_000, round(target_s / (per_call * iterations))))
    return rounds, iterations


def _sanity_check(case, pool, inputs) -> None:
    if case.backend == "eager":
        return  # it is the reference
    import python_ref

    got = benchlib.outputs_of(case, pool, inputs)
    ref = benchlib.outputs_of(case, python_ref.attention_pool, inputs)
    rtol = benchlib.SANITY_RTOL[case.dtype]
    for name, x, r in zip(("context", "dh", "dscores"), got, ref):
        err = benchlib.relative_error(x, r)
        assert err <= rtol, f"{case.id}: {name} differs from the eager reference (relative error {err:.3g} > {rtol})"


@pytest.mark.filterwarnings("ignore:iAT perturbation with a batch of one")
def test_attention_pool(benchmark, case, roofline, compiled_reference, bench_settings):
    inputs = benchlib.make_inputs(case)
    pool = benchlib.pool_function(case, compiled_reference, inputs)
    _sanity_check(case, pool, inputs)
    run, setup = benchlib.timed_callable(case, pool, inputs)

    benchmark.group = case.group
    nbytes = benchlib.ideal_bytes(case.B, case.T, case.H, case.dtype, case.perturbation, case.mode)
    info = benchmark.extra_info
    info.update(device=case.device, dtype=case.dtype, B=case.B, T=case.T, H=case.H,
                perturbation=case.perturbation, mode=case.mode, backend=case.backend, ideal_bytes=nbytes)
    info.update(benchlib.software_info())
    info["threads"] = torch.get_num_threads()

    if bench_settings["disabled"]:
        benchmark.pedantic(run, setup=setup)  # runs once, untimed (--benchmark-disable)
        return

    bw = roofline(case.device)
    info.update(read_gbps=bw["read_gbps"], copy_gbps=bw["copy_gbps"])
    _call(run, setup)  # warm-up: allocator, caches, lazy initialisation
    rounds, iterations = _calibrate(run, setup, bench_settings["time"], bench_settings["min_rounds"])
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=iterations, warmup_rounds=1)

    median = benchmark.stats.stats.median
    gbps = nbytes / median / 1e9
    info.update(effective_gbps=gbps, pct_read_bw=100 * gbps / bw["read_gbps"],
                pct_copy_bw=100 * gbps / bw["copy_gbps"])
    info.update(benchlib.round_percentiles(benchmark.stats.stats))
    info["working_set_bytes"] = benchlib.working_set_bytes(case.B, case.T, case.H, case.dtype, case.mode)
    floor = benchlib.roofline_seconds(bw, case.B, case.T, case.H, case.dtype, case.perturbation, case.mode)
    if floor is not None:
        info.update(roofline_s=floor, pct_roofline=100 * floor / median)

