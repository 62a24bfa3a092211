"""Self-attention on the CPU (issue 18's performance goals): the op against SDPA, and a whole-model AT step.

(1) test_sa_op: forward + backward (torch.autograd.grad of a fixed dO into q, k, v) of
        cpu        fused_attn_at.perturbed_attention(q, k, v, None, backend="cpu", perturbation=None)
        sdpa       torch.nn.functional.scaled_dot_product_attention(q, k, v)
        reference  fused_attn_at.perturbed_attention(..., backend="reference") (the [B,nh,T,T] maps materialised)
    at B=8 nh=4 T=512 d=64 float32 (smoke: a tiny shape), side by side in one run; no key mask (no padding), so
    SDPA runs its own fastest CPU path. The cpu and reference outputs and gradients are checked against SDPA's
    (untimed) first. Goal: cpu p50 / sdpa p50 <= 1.5 (report.SA_GOAL_SDPA_RATIO).

(2) test_sa_step: one training step (zero_grad, the loss's backward, AdamW step) of a 2-layer Transformer
    classifier (`Classifier` below: token + position embeddings, 2 pre-LN blocks of multi-head attention that calls
    fused_attn_at.perturbed_attention and a GELU MLP, masked mean pooling, a linear head; d_model 256, 4 heads,
    ff 512, vocabulary 1000, 2 classes; dropout 0) at B=2 T=1024 (smoke: B=2 T=32, d_model 32, 2 heads, ff 64),
    padded batch (example i has T - i*T/8 tokens), per variant:
        vanilla-cpu        L_clean.backward(), attention on the cpu backend
        at-cpu             fused_attn_at.SelfAttentionAT(model, "at", eps=1, lam=1).step(...): clean pass +
                           adversarial pass with both layers perturbed, cpu backend (no T x T tensor)
        vanilla-reference  as vanilla-cpu on the reference backend (maps materialised)
        at-reference       as at-cpu on the reference backend: what an eager materialised implementation keeps
        at-cpu-dropout     at-cpu with attention dropout 0.1 (a BERT's; the kernels hash the mask)
        at-reference-dropout  at-reference with attention dropout 0.1 (what the fused backends ran before they
                           fused dropout)
        iat-cpu            SelfAttentionAT(model, "iat") on the cpu backend: S, G and iAT's direction u
                           materialised as [B,nh,T,T] maps (differences formed a chunk of examples at a time),
                           then the AT kernels
        iat-reference      as iat-cpu on the reference backend ([B,B,nh*T*T] differences)
    Time: pytest-benchmark rounds in this process. Peak memory: a fresh subprocess per variant (`--memory-worker`)
    builds the model, runs one warm-up step at T=16 (Adam's state, thread pools, lazy library set-up), then
    reads its peak resident set (VmHWM in /proc/self/status; getrusage's ru_maxrss elsewhere) before and after
    one step at the measured T: the growth is the step's peak memory beyond what was resident before it, not
    polluted by the pytest process (VmHWM, not ru_maxrss, on Linux: ru_maxrss survives fork + exec, so a child
    would start at its parent's peak). Goals: at-cpu / vanilla-cpu <= 2.3x in time and <= 1.2x in peak growth.
    A second worker per variant runs with glibc's mmap threshold fixed at 64 KiB (LIVE_BYTES_ENV): its growth
    follows the live bytes at the step's peak ("memory_live"), without the default allocator's retained blocks.
Rows carry extra_info kind "sa_op" / "sa_step"; report.py renders them ("Self-attention (issue 18)").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent

OP_SHAPE = {"goal": (8, 4, 512, 64), "smoke": (2, 2, 32, 16)}  # B, nh, T, d
STEP_DIMS = {  # B, T, d_model, heads, ff
    "goal": dict(B=2, T=1024, dim=256, heads=4, ff=512),
    "smoke": dict(B=2, T=32, dim=32, heads=2, ff=64),
}
VOCAB, CLASSES, WARMUP_T = 1000, 2, 16
OP_BACKENDS = ("sdpa", "cpu", "reference")
STEP_VARIANTS = {
    "vanilla-cpu": "clean forward + backward, cpu backend",
    "at-cpu": "SelfAttentionAT('at') step: clean + adversarial pass, cpu backend",
    "vanilla-reference": "clean forward + backward, reference backend (maps materialised)",
    "at-reference": "SelfAttentionAT('at') step, reference backend (maps materialised)",
    # a BERT trains with attention dropout 0.1: fused in the cpu kernels, materialised by the reference
    "at-cpu-dropout": "SelfAttentionAT('at') step, cpu backend, attention dropout 0.1 (mask hashed in the kernels)",
    "at-reference-dropout": "SelfAttentionAT('at') step, reference backend, attention dropout 0.1",
    # iAT is not fused: S, G and its direction u are maps; the reference also forms [B, B, ...] differences
    "iat-cpu": "SelfAttentionAT('iat') step, cpu backend (S, G, u materialised, then the AT kernels)",
    "iat-reference": "SelfAttentionAT('iat') step, reference backend ([B,B,nh*T*T] differences)",
}
ATTENTION_DROPOUT = 0.1


def _set_name(bench_settings) -> str:
    return "smoke" if bench_settings["set"] == "smoke" else "goal"


def _cpu_reason() -> str | None:
    try:
        from fused_attn_at import self_attention
    except Exception as exc:  # noqa: BLE001
        return f"fused_attn_at is not importable ({type(exc).__name__}: {exc})"
    return self_attention.why_unavailable("cpu", torch.device("cpu"))


def _software() -> dict:
    import benchlib

    info = dict(benchlib.software_info())
    info["threads"] = torch.get_num_threads()
    return info


def _time(benchmark, fn, bench_settings, most: int = 1000):
    """pedantic rounds of fn for about --bench-time seconds (at least --bench-min-rounds), p10/p50/p90 into
    extra_info; one untimed call when benchmarking is disabled."""
    import benchlib

    if bench_settings["disabled"]:
        benchmark(fn)
        return
    fn()
    per_call = statistics.median(benchlib.timed_samples(fn, 3)[0])
    rounds = max(bench_settings["min_rounds"], min(most, round(bench_settings["time"] / per_call)))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["pct"] = benchlib.round_percentiles(benchmark.stats.stats)


# ------------------------------------------------------------------------------------------------ (1) the op
def op_inputs(B, nh, T, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, nh, T, d, generator=gen).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(B, nh, T, d, generator=gen)


def op_function(backend: str):
    if backend == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention
    import fused_attn_at

    return lambda q, k, v: fused_attn_at.perturbed_attention(q, k, v, None, perturbation=None, backend=backend)


def op_fwdbwd(fn, q, k, v, dout):
    out = fn(q, k, v)
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("sa_backend", OP_BACKENDS)
def test_sa_op(benchmark, sa_backend, bench_settings, roofline):
    import benchlib

    if sa_backend == "cpu" and _cpu_reason():
        pytest.skip(f"cpu/cpu: {_cpu_reason()}")
    B, nh, T, d = OP_SHAPE[_set_name(bench_settings)]
    q, k, v, dout = op_inputs(B, nh, T, d)
    fn = op_function(sa_backend)
    if sa_backend != "sdpa":  # it computes what SDPA computes (loosely: tests/ checks accuracy)
        ref = op_fwdbwd(op_function("sdpa"), q, k, v, dout)
        for name, x, r in zip(("out", "dq", "dk", "dv"), op_fwdbwd(fn, q, k, v, dout), ref):
            err = benchlib.relative_error(x, r)
            assert err <= 1e-3, f"{sa_backend}: {name} differs from SDPA's ({err:.3g})"

    benchmark.group = f"self-attention fwd+bwd (cpu, float32, B={B} nh={nh} T={T} d={d}, no mask)"
    info = benchmark.extra_info
    info.update(kind="sa_op", sa_backend=sa_backend, B=B, nh=nh, T=T, d=d, dtype="float32", **_software())
    if not bench_settings["disabled"]:
        roofline("cpu")  # the session's bandwidth profile is measured before any timing, as for every case
    _time(benchmark, lambda: op_fwdbwd(fn, q, k, v, dout), bench_settings)


# --------------------------------------------------------------------------------------- (2) the training step
class Block(torch.nn.Module):
    def __init__(self, dim, heads, ff, backend, dropout=0.0):
        super().__init__()
        self.heads, self.backend, self.dropout = heads, backend, dropout
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.ff = torch.nn.Sequential(torch.nn.Linear(dim, ff), torch.nn.GELU(), torch.nn.Linear(ff, dim))

    def forward(self, x, mask):
        import fused_attn_at

        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = fused_attn_at.perturbed_attention(q, k, v, mask, layer=self, backend=self.backend,
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(o.transpose(1, 2).reshape(B, T, D))
        return x + self.ff(self.ln2(x))


class Classifier(torch.nn.Module):
    """A 2-layer pre-LN Transformer encoder classifier whose attention is fused_attn_at.perturbed_attention."""

    def __init__(self, dim=256, heads=4, ff=512, layers=2, vocab=VOCAB, classes=CLASSES, max_len=1024,
                 backend="cpu", dropout=0.0):
        super().__init__()
        self.emb, self.pos = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(max_len, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, ff, backend, dropout) for _ in range(layers))
        self.ln, self.head = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, classes)

    def forward(self, ids, mask):
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x, mask)
        m = mask[..., None].to(x.dtype)
        return self.head((self.ln(x) * m).sum(1) / m.sum(1).clamp_min(1))


def step_batch(B, T, seed=0):
    """(ids, key mask, labels): example i has T - i*T/8 tokens (at least 1), the rest padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=gen)
    lengths = torch.tensor([max(1, T - i * T // 8) for i in range(B)])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask, torch.randint(0, CLASSES, (B,), generator=gen)


def make_step(variant: str, B, T, dim, heads, ff, seed=0):
    """(step(ids, mask, y) -> detached loss, model): zero_grad, the variant's backward, AdamW step."""
    import fused_attn_at

    kind, backend, *extra = variant.split("-")
    torch.manual_seed(seed)
    model = Classifier(dim, heads, ff, max_len=max(T, WARMUP_T), backend=backend,
                       dropout=ATTENTION_DROPOUT if "dropout" in extra else 0.0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    at = fused_attn_at.SelfAttentionAT(model, kind, eps=1.0, lam=1.0) if kind in ("at", "iat") else None

    def step(ids, mask, y):
        optimizer.zero_grad(set_to_none=True)

        def forward():
            return torch.nn.functional.cross_entropy(model(ids, mask), y)

        if at is None:
            loss = forward()
            loss.backward()
            loss = loss.detach()
        else:
            loss = at.step(forward).loss
        optimizer.step()
        return loss

    return step, model


def _peak_bytes() -> tuple[int, str]:
    """(this process's peak resident set in bytes, where it was read)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM"
    except (OSError, ValueError, IndexError):
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def memory_worker(variant, B, T, dim, heads, ff, threads) -> dict:
    """Runs in a fresh process: one warm-up step at T=WARMUP_T, then the peak resident growth of one step at T."""
    import gc

    torch.set_num_threads(threads)
    step, _ = make_step(variant, B, T, dim, heads, ff)
    step(*step_batch(B, WARMUP_T, seed=1))
    batch = step_batch(B, T)
    gc.collect()
    before, source = _peak_bytes()
    loss = step(*batch)
    after, _ = _peak_bytes()
    return {"growth_bytes": after - before, "peak_before_bytes": before, "peak_after_bytes": after,
            "source": source, "loss": float(loss), "threads": torch.get_num_threads()}


# glibc malloc with every block of 64 KiB or more mmapped and unmapped when freed (a fixed threshold: no dynamic
# raise, no trimming lag): the resident set then follows the live bytes, so the growth is what the step holds at
# its peak, without what the default allocator keeps of freed blocks (reported beside the default's growth).
LIVE_BYTES_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


def measure_memory(variant, dims, threads, timeout=900, env_extra=None) -> dict:
    """memory_worker in a fresh Python (this file run as a script: benchmarks/ goes on sys.path, not the
    checkout, so the installed fused_attn_at is the one used)."""
    args = [sys.executable, str(pathlib.Path(__file__).resolve()), "--memory-worker", variant,
            *(str(dims[k]) for k in ("B", "T", "dim", "heads", "ff")), str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env_extra or {})}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("sa_variant", list(STEP_VARIANTS))
def test_sa_step(benchmark, sa_variant, bench_settings, roofline):
    if sa_variant.split("-")[1] == "cpu" and _cpu_reason():
        pytest.skip(f"cpu/cpu: {_cpu_reason()}")
    set_name = _set_name(bench_settings)
    dims = STEP_DIMS[set_name]
    B, T = dims["B"], dims["T"]
    step, model = make_step(sa_variant, **dims)
    batch = step_batch(B, T)
    if sa_variant in ("at-reference", "iat-reference") and not _cpu_reason():
        # the two steps compute the same loss from the same start (untimed; tests/ checks the gradients)
        cpu_variant = sa_variant.replace("reference", "cpu")
        cpu_step, _ = make_step(cpu_variant, **dims)
        a, b = float(step(*batch)), float(cpu_step(*batch))
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), f"{sa_variant} loss {a} != {cpu_variant} loss {b}"

    benchmark.group = (f"2-layer Transformer classifier step (cpu, float32, B={B} T={T} d_model={dims['dim']} "
                       f"heads={dims['heads']} ff={dims['ff']})")
    info = benchmark.extra_info
    info.update(kind="sa_step", variant=sa_variant, description=STEP_VARIANTS[sa_variant], dtype="float32",
                d_model=dims["dim"], heads=dims["heads"], ff=dims["ff"], B=B, T=T, layers=len(model.blocks),
                parameters=sum(p.numel() for p in model.parameters()), **_software())
    if not bench_settings["disabled"] or sa_variant == "at-cpu":  # smoke: one worker exercises the path
        info["memory"] = measure_memory(sa_variant, dims, bench_settings["threads"])
        if not bench_settings["disabled"]:
            info["memory_live"] = measure_memory(sa_variant, dims, bench_settings["threads"],
                                                 env_extra=LIVE_BYTES_ENV)
    if not bench_settings["disabled"]:
        roofline("cpu")
    loss = step(*batch)
    assert math.isfinite(float(loss)), f"{sa_variant}: the training loss is not finite"
    _time(benchmark, lambda: step(*batch), bench_settings, most=200)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="peak-memory worker of bench_self_attention.py (one variant)")
    parser.add_argument("--memory-worker", required=True, choices=list(STEP_VARIANTS))
    parser.add_argument("dims", nargs=6, type=int, metavar="B T d_model heads ff threads")
    args = parser.parse_args(argv)
    B, T, dim, heads, ff, threads = args.dims
    print(json.dumps(memory_worker(args.memory_worker, B, T, dim, heads, ff, threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
