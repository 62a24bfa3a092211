"""The pooling part of an AT training step, fwd+bwd: the pair op vs two single ops vs vanilla (issue 17 items 3-4).

At B=64 T=256 H=256 (smoke: a tiny shape), float32, cpu backend; h [B,T,H] and scores [B,T] are leaves that
require grad, the head is a Linear(H, 1) and the loss binary cross-entropy with fixed labels. Each row times
what a training step does with the pooling, from h and scores to their gradients:
    vanilla   attention_pool (clean only) -> head -> loss; torch.autograd.grad(loss, (h, scores))
    two_ops   fused_attn_at.training._two_op_step: clean op, g by torch.autograd.grad, perturbed op, both branches'
              backward (the path before the pair op: 11 passes over h for at/iat, 9 for rp)
    pair      fused_attn_at.adversarial_attention_loss on cpu: clean forward without autograd, g by
              attention_scores_grad, attention_pool_pair, the pair's one backward (5 passes; rp 3)
for perturbations at, iat, rp. The goal: pair (at) / vanilla <= 1.3 (benchlib.GOAL_PAIR_RATIO). Rows are in
extra_info kind "pair_step" with p10/p50/p90, page faults per call and the profiler's split (self CPU time of the
fused_attn_at:: kernels, allocation, autograd, other ops: benchlib.profile_breakdown).
"""
from __future__ import annotations

import statistics

import pytest
import torch

import benchlib

VARIANTS = ("vanilla",) + tuple(f"{path}-{p}" for p in ("at", "iat", "rp") for path in ("two_ops", "pair"))


def pytest_generate_tests(metafunc):
    if "pair_variant" in metafunc.fixturenames:
        metafunc.parametrize("pair_variant", VARIANTS)


def make_step(variant: str, B: int, T: int, H: int, seed: int = 0):
    """(callable returning (dh, dscores) of one pooling fwd+bwd, its inputs)."""
    import fused_attn_at
    from fused_attn_at import training

    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=gen).requires_grad_()
    scores = torch.randn(B, T, generator=gen).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    labels = (torch.rand(B, generator=gen) > 0.5).float()
    head = torch.nn.Linear(H, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, H, generator=gen) / H**0.5)
        head.bias.zero_()

    def head_fn(c):
        return head(c).squeeze(-1)

    def loss_fn(logits):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)

    path, _, pert = variant.partition("-")
    noise_gen = torch.Generator()

    def step():
        noise_gen.manual_seed(1)  # rp: the same noise each call, and for both paths
        if path == "vanilla":
            result = fused_attn_at.adversarial_attention_loss(h, scores, mask, head_fn, loss_fn, perturbation=None,
                                                              backend="cpu")
        elif path == "two_ops":
            result = training._two_op_step(h, scores, mask, head_fn, loss_fn, pert, 1.0, 1.0, None, noise_gen, "cpu")
        else:
            result = fused_attn_at.adversarial_attention_loss(h, scores, mask, head_fn, loss_fn, perturbation=pert,
                                                              eps=1.0, lam=1.0, generator=noise_gen, backend="cpu")
        return torch.autograd.grad(result.loss, (h, scores))

    return step


@pytest.mark.filterwarnings("ignore:iAT perturbation with a batch of one")
def test_pair_step(benchmark, pair_variant, roofline, bench_settings):
    reason = benchlib.unavailable_reason("cpu", "cpu", "float32")
    if reason:
        pytest.skip(f"cpu/cpu: {reason}")
    from fused_attn_at.ops import cpp

    if "cpu" not in cpp.PAIR_DEVICES:
        pytest.skip("cpu/cpu: the compiled module lacks the pair ops")
    B, T, H = (4, 16, 32) if bench_settings["set"] == "smoke" else benchlib.GOAL_SHAPE
    step = make_step(pair_variant, B, T, H)
    path, _, pert = pair_variant.partition("-")
    if path == "pair":  # the pair path computes what the two single ops compute
        ref = make_step(f"two_ops-{pert}", B, T, H)()
        for name, x, r in zip(("dh", "dscores"), step(), ref):
            err = benchlib.relative_error(x, r)
            assert err <= 1e-4, f"{pair_variant}: {name} differs from the two-op path ({err:.3g})"

    benchmark.group = f"AT step, pooling part (cpu, float32, B={B} T={T} H={H}, fwd+bwd)"
    info = benchmark.extra_info
    info.update(kind="pair_step", variant=pair_variant, path=path, perturbation=pert or "none", B=B, T=T, H=H,
                dtype="float32", backend="cpu")
    info.update(benchlib.software_info())
    info["threads"] = torch.get_num_threads()
    if bench_settings["disabled"]:
        benchmark(step)
        benchlib.profile_breakdown(step, 1)
        return
    roofline("cpu")  # the session's bandwidth profile is measured before any timing, as for the op cases
    step()
    per_call = statistics.median(benchlib.timed_samples(step, 3)[0])
    rounds = max(bench_settings["min_rounds"], min(1000, round(bench_settings["time"] / per_call)))
    before = benchlib.rusage_counters()
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    after = benchlib.rusage_counters()
    info["rusage"] = {k: (after[k] - before[k]) / (rounds + 1) for k in before}
    info["pct"] = benchlib.round_percentiles(benchmark.stats.stats)
    info["profile"] = benchlib.profile_breakdown(step, max(5, min(30, rounds // 4)))
