"""Kernel time vs end-to-end time of the cpu op, fwd+bwd, and where the difference goes (issue 17 item 2).

Per case (goal set: B=64 T=256 H=256 for each perturbation, B=64 T in {1024, 4096} H=256 without; smoke: a tiny
shape), float32, the benchmarks' threads, all measured in this one process:
    e2e      fused_attn_at.attention_pool(..., backend="cpu") + torch.autograd.grad: timed by pytest-benchmark
             (the case's median), and p10/p50/p90 of its rounds
    ops      torch.ops.fused_attn_at.attention_pool_fwd + attention_pool_bwd called directly under no_grad on
             pre-allocated inputs (the C++ ops have no out= entry: their outputs are allocated inside, as in
             training): the kernel time, p10/p50/p90; also fwd and bwd alone, and the public forward under no_grad
    profile  torch.profiler over the e2e call: self CPU time of the fused_attn_at:: kernels, of allocation ops,
             of autograd, of other aten ops, and what lies outside any op (Python)
    rusage   minor page faults and involuntary context switches per call (the host preempting the process),
             priced with the first-touch cost per fault of bandwidth.py
Everything lands in the case's extra_info (kind "op_breakdown"); report.py renders it.
"""
from __future__ import annotations

import statistics

import pytest
import torch

import benchlib


def _cases(bench_set: str):
    specs = benchlib.BREAKDOWN_SMOKE_CASES if bench_set == "smoke" else benchlib.BREAKDOWN_GOAL_CASES
    return [pytest.param((shape, pert), id=f"B{shape[0]}-T{shape[1]}-H{shape[2]}-{pert}") for shape, pert in specs]


def pytest_generate_tests(metafunc):
    if "breakdown_case" in metafunc.fixturenames:
        cases = _cases(benchlib.bench_set_of(metafunc.config))
        metafunc.parametrize("breakdown_case", [p.values[0] for p in cases], ids=[p.id for p in cases])


@pytest.mark.filterwarnings("ignore:iAT perturbation with a batch of one")
def test_op_breakdown(benchmark, breakdown_case, roofline, bench_settings):
    reason = benchlib.unavailable_reason("cpu", "cpu", "float32")
    if reason:
        pytest.skip(f"cpu/cpu: {reason}")
    (B, T, H), pert = breakdown_case
    case = benchlib.Case("cpu", "float32", B, T, H, pert, "fwdbwd", "cpu")
    inputs = benchlib.make_inputs(case)
    fns = benchlib.breakdown_callables(case, inputs)
    # The direct ops compute what the public op computes (a benchmark of the wrong call must fail).
    ref = fns["e2e"]()
    dh, ds = fns["ops"]()
    for name, x, r in (("dh", dh, ref[0]), ("dscores", ds, ref[1])):
        err = benchlib.relative_error(x, r)
        assert err <= 1e-5, f"{case.id}: direct ops' {name} differs from the public op's ({err:.3g})"

    benchmark.group = "op breakdown: kernel vs end-to-end (cpu, float32, fwd+bwd)"
    info = benchmark.extra_info
    info.update(kind="op_breakdown", device="cpu", dtype="float32", B=B, T=T, H=H, perturbation=pert,
                mode="fwdbwd", backend="cpu", ideal_bytes=benchlib.ideal_bytes(B, T, H, "float32", pert, "fwdbwd"),
                working_set_bytes=benchlib.working_set_bytes(B, T, H, "float32", "fwdbwd"))
    info.update(benchlib.software_info())
    info["threads"] = torch.get_num_threads()

    if bench_settings["disabled"]:
        benchmark(fns["e2e"])  # once, untimed; then every other path once
        for name in ("public_fwd_nograd", "ops", "ops_fwd", "ops_bwd"):
            benchlib.timed_samples(fns[name], 1)
        benchlib.profile_breakdown(fns["e2e"], 1)
        return

    bw = roofline("cpu")
    for fn in fns.values():  # warm-up: allocator, caches, lazy initialisation
        fn()
    per_call = statistics.median(benchlib.timed_samples(fns["e2e"], 3)[0])
    rounds = max(bench_settings["min_rounds"], min(1000, round(bench_settings["time"] / per_call)))
    measured = {}
    # Interleaved in two halves, so a slow phase of the machine does not land on one of them only.
    for half in range(2):
        for name in ("ops", "ops_fwd", "ops_bwd", "public_fwd_nograd"):
            times, counters = benchlib.timed_samples(fns[name], max(3, rounds // 2))
            prev = measured.setdefault(name, {"times": [], "counters": []})
            prev["times"] += times
            prev["counters"].append(counters)
    for name, m in measured.items():
        info[f"{name}_pct"] = benchlib.percentiles(m["times"])
        info[f"{name}_rusage"] = {k: statistics.mean(c[k] for c in m["counters"]) for k in m["counters"][0]}
    before = benchlib.rusage_counters()
    benchmark.pedantic(fns["e2e"], rounds=rounds, iterations=1, warmup_rounds=1)
    after = benchlib.rusage_counters()
    info["e2e_rusage"] = {k: (after[k] - before[k]) / (rounds + 1) for k in before}
    info["e2e_pct"] = benchlib.round_percentiles(benchmark.stats.stats)
    info["profile"] = benchlib.profile_breakdown(fns["e2e"], max(5, min(50, rounds // 4)))
    first_touch = bw.get("first_touch") or {}
    info["us_per_fault"] = first_touch.get("us_per_fault")
    info["roofline_s"] = benchlib.roofline_seconds(bw, B, T, H, "float32", pert, "fwdbwd")
