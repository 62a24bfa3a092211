"""What the benchmarks measure, shared by conftest.py, the bench_*.py cases and report.py.

A case is one call pattern of the op: (device, dtype, B, T, H, perturbation, mode, backend).
    backend "eager"   python_ref.attention_pool, plain PyTorch (the reference that defines truth)
            "compile" torch.compile(python_ref.attention_pool), compiled once per shape, warmed up untimed
            "cpu"     fused_attn_at.attention_pool(..., backend="cpu"), the C++ kernel
            "cuda" / "triton"  the GPU kernels (only where a GPU exists)
    mode    "fwd" (forward with autograd recording, as in training), "bwd" (backward alone: a fresh untimed
            forward before each timed backward), "fwdbwd" (both).
The inputs: h [B, T, H] and scores [B, T] require grad, mask is a bool tensor that is all True (every row
full length, so the ideal byte count is exact), grad/noise are fixed standard normal [B, T] tensors (RP gets
its noise passed in, so no backend pays for drawing it), the backward seeds dcontext [B, H].

This module imports torch lazily: report.py uses the pure-python parts (bytes, sets, goals) without it.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]

BATCHES = (1, 32, 64)
LENGTHS = (16, 64, 256, 1024, 4096)
HIDDENS = (128, 256, 512)
PERTURBATIONS = ("none", "at", "iat", "rp")
MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = ("float32", "bfloat16")
# (device, backend) in the order the report shows them; the fused ones per device come last.
BACKENDS = (("cpu", "eager"), ("cpu", "compile"), ("cpu", "cpu"),
            ("cuda", "eager"), ("cuda", "compile"), ("cuda", "cuda"), ("cuda", "triton"))
FUSED = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
BASELINES = ("eager", "compile")

# The goals (issue 17 item 4; CPU, float32, 2 threads), each a ratio measured in one run.
GOAL_SHAPE = (64, 256, 256)
GOAL_EAGER_SPEEDUP = 4.0  # op fwd+bwd end-to-end p50 vs python_ref eager
GOAL_COMPILE_SPEEDUP = 2.5  # ... vs torch.compile(python_ref)
GOAL_ROOFLINE_FRACTION = 0.70  # ... roofline time at its working-set size / p50
GOAL_P90_P50 = 1.3  # ... p90 / p50 of the end-to-end time
GOAL_LONG_T = 1024
GOAL_READ_FRACTION = 0.70  # T >= 1024, fwd and bwd: effective GB/s / read bandwidth at the working-set size
GOAL_LONG_MODES = ("fwd", "bwd")
GOAL_PAIR_RATIO = 1.3  # pooling part of an attention_at step (both branches, fwd+bwd) / vanilla's pooling part
GOAL_AT_STEP_RATIO = 1.25  # whole training step (issue 14), still reported

# Results of a session that are not pytest-benchmark cases (the allocator table): conftest writes them into the
# JSON as fused_attn_at_extras.
RUN_EXTRAS: dict = {}

ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    dtype: str
    B: int
    T: int
    H: int
    perturbation: str  # "none", "at", "iat", "rp"
    mode: str  # "fwd", "bwd", "fwdbwd"
    backend: str  # "eager", "compile", "cpu", "cuda", "triton"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.B, self.T, self.H)

    @property
    def id(self) -> str:
        dev = "" if self.device == "cpu" else f"{self.device}-"
        return f"{dev}{self.dtype}-B{self.B}-T{self.T}-H{self.H}-{self.perturbation}-{self.mode}-{self.backend}"

    @property
    def group(self) -> str:
        """pytest-benchmark group: one per shape (and device/dtype, which change what a shape costs)."""
        return f"{self.device} {self.dtype} B={self.B} T={self.T} H={self.H}"

    @property
    def compile_key(self) -> tuple:
        """Everything that makes torch.compile trace a new graph (the mode does not: one graph serves all)."""
        return (self.device, self.dtype, self.B, self.T, self.H, self.perturbation)


def ideal_bytes(B: int, T: int, H: int, dtype: str, perturbation: str, mode: str) -> int:
    """Bytes an ideal kernel must move between memory and the cores for one call.

    forward:  read h [B,T,H] once, scores, mask (1 byte), direction (if perturbed); write context, attention.
    backward: read dcontext, h, attention; write dh [B,T,H] once and dscores.
    fwdbwd:   the sum (the forward's h read cannot be shared with the backward's: the loss sits in between).
    """
    e = ELEMENT_SIZE[dtype]
    bt, bth, bh = B * T, B * T * H, B * H
    fwd = bth * e + bt * e + bt + (bt * e if perturbation != "none" else 0) + bh * e + bt * e
    bwd = bh * e + bth * e + bt * e + bth * e + bt * e
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def ideal_bytes_split(B: int, T: int, H: int, dtype: str, perturbation: str, mode: str) -> tuple[int, int]:
    """(bytes read, bytes written) of ideal_bytes: the roofline prices reads and writes at their own bandwidth."""
    e = ELEMENT_SIZE[dtype]
    bt, bth, bh = B * T, B * T * H, B * H
    fwd = (bth * e + bt * e + bt + (bt * e if perturbation != "none" else 0), bh * e + bt * e)
    bwd = (bh * e + bth * e + bt * e, bth * e + bt * e)
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


def working_set_bytes(B: int, T: int, H: int, dtype: str, mode: str) -> int:
    """Distinct bytes a call touches, i.e. what has to fit in a cache level for the call to run from it:
    forward h (+ the [B,T]/[B,H] arrays); backward and fwd+bwd h and dh (each read or written once per pass,
    so fwd+bwd at B=64 T=256 H=256 touches 32 MiB although it moves 48 MiB)."""
    e = ELEMENT_SIZE[dtype]
    bt, bth, bh = B * T, B * T * H, B * H
    small = 6 * bt * e + 2 * bh * e
    return (bth if mode == "fwd" else 2 * bth) * e + small


def roofline_seconds(profile: dict, B: int, T: int, H: int, dtype: str, perturbation: str, mode: str):
    """The least time a kernel needs to move a call's ideal bytes: reads at the read bandwidth and writes at
    the write bandwidth measured at the call's working-set size (bandwidth.bandwidth_at). None without a
    per-size profile."""
    import bandwidth

    ws = working_set_bytes(B, T, H, dtype, mode)
    read_bw, write_bw = bandwidth.bandwidth_at(profile, ws, "read"), bandwidth.bandwidth_at(profile, ws, "write")
    if read_bw is None or write_bw is None:
        return None
    nread, nwrite = ideal_bytes_split(B, T, H, dtype, perturbation, mode)
    return nread / (read_bw * 1e9) + nwrite / (write_bw * 1e9)


def percentiles(times) -> dict:
    """{'p10', 'p50', 'p90'} of a list of seconds."""
    import bandwidth

    return {f"p{q}": bandwidth.percentile(times, q) for q in (10, 50, 90)}


def round_percentiles(stats) -> dict:
    """p10/p50/p90 of a pytest-benchmark case's timed rounds, per call (scaled so that p50 is its median)."""
    data = list(getattr(stats, "data", []) or [])
    if not data:
        return {}
    p = percentiles(data)
    scale = stats.median / p["p50"] if p["p50"] else 1.0
    return {k: v * scale for k, v in p.items()}


def bench_set_of(config) -> str:
    """--bench-set, else $FUSED_ATTN_AT_BENCH_SET, else full (as conftest.bench_option reads it)."""
    return config.getoption("--bench-set") or os.environ.get("FUSED_ATTN_AT_BENCH_SET", "full")


# ---------------------------------------------------------------------------------------------- case sets
BENCH_SETS = ("smoke", "goal", "full")
SMOKE_SHAPES = ((4, 16, 32),)
SMOKE_COMPILED = ("none", "at")
GOAL_SHAPES = (GOAL_SHAPE, (64, 1024, 256), (64, 4096, 256), (1, 16, 128), (32, 64, 128))


def set_axes(bench_set: str) -> dict:
    """The axes of a named set; conftest narrows them further with the --bench-* selection options."""
    if bench_set == "smoke":
        # Seconds with --benchmark-disable: one tiny shape, every path once; bfloat16 only for "none",
        # torch.compile only for SMOKE_COMPILED.
        return dict(shapes=SMOKE_SHAPES, perturbations=PERTURBATIONS, modes=MODES, dtypes=DTYPES,
                    devices=("cpu", "cuda"), backends=None)
    if bench_set == "goal":
        # The goal rows (B=64,T=256,H=256; T >= 1024) and two small shapes for "never slower than eager".
        return dict(shapes=GOAL_SHAPES, perturbations=PERTURBATIONS, modes=MODES, dtypes=("float32",),
                    devices=("cpu", "cuda"), backends=None)
    if bench_set == "full":
        shapes = tuple(itertools.product(BATCHES, LENGTHS, HIDDENS))
        return dict(shapes=shapes, perturbations=PERTURBATIONS, modes=MODES, dtypes=DTYPES,
                    devices=("cpu", "cuda"), backends=None)
    raise ValueError(f"--bench-set must be one of {', '.join(BENCH_SETS)}; got {bench_set!r}")


def make_cases(shapes, perturbations, modes, dtypes, devices, backends=None, smoke=False) -> list[Case]:
    """Cases ordered device -> shape -> dtype -> perturbation -> mode -> backend, so that consecutive cases
    share one torch.compile graph (each is compiled once, then reset) and the report can pair backends."""
    cases = []
    for device, (B, T, H), dtype, pert, mode in itertools.product(devices, shapes, dtypes, perturbations, modes):
        if smoke and dtype != "float32" and pert != "none":
            continue
        for dev, backend in BACKENDS:
            if dev != device or (backends is not None and backend not in backends):
                continue
            if smoke and backend == "compile" and (dtype != "float32" or pert not in SMOKE_COMPILED):
                continue  # each compiled graph costs seconds; two cover the compile path
            cases.append(Case(device, dtype, B, T, H, pert, mode, backend))
    return cases


def parse_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """'64x256x256,1x16x128' -> ((64, 256, 256), (1, 16, 128))."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--bench-shapes expects BxTxH items like 64x256x256, separated by commas; got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return tuple(shapes)


# ---------------------------------------------------------------------------------------- machine facts
def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def software_info() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure means "no triton" here
        triton_version = f"unavailable ({type(exc).__name__})"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "commit": git_commit(),
    }


# --------------------------------------------------------------------------------- availability of cases
def _fused_reason(backend: str, device: str) -> str | None:
    import torch

    try:
        from fused_attn_at import _backend
    except Exception as exc:  # noqa: BLE001
        return f"fused_attn_at is not importable ({type(exc).__name__}: {exc})"
    try:
        return _backend.why_unavailable(backend, torch.device(device))
    except ImportError as exc:
        # The backend module itself has not landed yet (e.g. fused_attn_at/ops/cpp.py).
        return f"the {backend!r} backend module is missing from fused_attn_at ({type(exc).__name__}: {exc})"


@functools.lru_cache(maxsize=None)
def unavailable_reason(device: str, backend: str, dtype: str) -> str | None:
    """None if this (device, backend, dtype) can run here, else why not (printed as the skip reason).

    For a fused backend the only reason is fused_attn_at._backend.why_unavailable (not built, no GPU, no
    Triton): a backend that is available but raises when run is a failure of the benchmark, never a skip
    (a probe that turned any exception into a skip hid crashes as "not supported")."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False)"
    if backend == "triton" and device == "cpu":
        return "Triton on CPU tensors runs only under its interpreter, which is a debugging aid, not a kernel"
    if backend == "compile":
        try:
            import torch._dynamo

            if not torch._dynamo.is_dynamo_supported():
                return "torch.compile (dynamo) is not supported on this Python/platform"
        except Exception as exc:  # noqa: BLE001
            return f"torch.compile is unusable here ({type(exc).__name__}: {exc})"
        return None
    if backend == "eager":
        return None
    return _fused_reason(backend, device)


# ------------------------------------------------------------------------------------------ the callables
def make_inputs(case: Case, seed: int = 0) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, case.dtype)
    B, T, H = case.shape

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=case.device, dtype=dt)

    inputs = {
        "h": randn(B, T, H).requires_grad_(),
        "scores": randn(B, T).requires_grad_(),
        "mask": torch.ones(B, T, dtype=torch.bool, device=case.device),
        "grad": randn(B, T) if case.perturbation in ("at", "iat") else None,
        "noise": randn(B, T) if case.perturbation == "rp" else None,
        "dcontext": randn(B, H),
    }
    return inputs


def pool_kwargs(case: Case, inputs: dict) -> dict:
    return dict(perturbation=None if case.perturbation == "none" else case.perturbation,
                grad=inputs["grad"], noise=inputs["noise"], eps=1.0)


class CompiledReference:
    """torch.compile(python_ref.attention_pool), one live graph at a time.

    Dynamo keeps every graph of a function in one cache with a recompile limit (beyond it, it silently runs
    eager) and checks the guards of all of them on each call, which would tax small shapes. So the cache is
    reset whenever the shape/perturbation changes (cases arrive ordered by compile_key) and the new graph is
    compiled and warmed up, forward and backward, before anything is timed."""

    def __init__(self):
        self.key = None
        self.fn = None

    def get(self, case: Case, inputs: dict):
        import torch
        import torch._dynamo

        import python_ref

        if case.compile_key != self.key:
            torch._dynamo.reset()
            self.fn = torch.compile(python_ref.attention_pool, dynamic=False)
            self.key = case.compile_key
            out = self.fn(inputs["h"], inputs["scores"], inputs["mask"], **pool_kwargs(case, inputs))
            torch.autograd.grad(out.context, (inputs["h"], inputs["scores"]), inputs["dcontext"])
        return self.fn


def pool_function(case: Case, compiled: CompiledReference | None, inputs: dict):
    """The (h, scores, mask, **kw) -> (context, attention) callable that `case.backend` names."""
    if case.backend == "eager":
        import python_ref

        return python_ref.attention_pool
    if case.backend == "compile":
        return compiled.get(case, inputs)
    import fused_attn_at

    return functools.partial(fused_attn_at.attention_pool, backend=case.backend)


def timed_callable(case: Case, pool, inputs: dict):
    """(run, setup): run is what the case times (it synchronises the GPU when on one); setup is None, or
    for "bwd" an untimed forward before each round whose graph run(out) then back-propagates once (no
    retain_graph: every backend frees its saved tensors as in training)."""
    import torch

    h, scores, mask, dc = inputs["h"], inputs["scores"], inputs["mask"], inputs["dcontext"]
    kw = pool_kwargs(case, inputs)
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    if case.mode == "fwd":
        def run():
            out = pool(h, scores, mask, **kw)
            sync()
            return out
        return run, None
    if case.mode == "bwd":
        def setup():
            out = pool(h, scores, mask, **kw)
            sync()
            return (out.context,), {}

        def run(context):
            grads = torch.autograd.grad(context, (h, scores), dc)
            sync()
            return grads
        return run, setup
    if case.mode == "fwdbwd":
        def run():
            out = pool(h, scores, mask, **kw)
            grads = torch.autograd.grad(out.context, (h, scores), dc)
            sync()
            return grads
        return run, None
    raise ValueError(f"mode must be one of {MODES}; got {case.mode!r}")


def outputs_of(case: Case, pool, inputs: dict):
    """(context, dh, dscores) of one forward+backward through `pool`: what the sanity check compares."""
    import torch

    out = pool(inputs["h"], inputs["scores"], inputs["mask"], **pool_kwargs(case, inputs))
    dh, ds = torch.autograd.grad(out.context, (inputs["h"], inputs["scores"]), inputs["dcontext"])
    return out.context.detach(), dh, ds


def relative_error(x, ref) -> float:
    """max |x - ref| / max |ref| in float64 (0 when both are 0)."""
    x, ref = x.double(), ref.double()
    scale = ref.abs().max().item()
    diff = (x - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


# Loose on purpose: tests/ checks accuracy; this only catches a benchmark that times the wrong thing.
SANITY_RTOL = {"float32": 1e-3, "bfloat16": 6e-2, "float16": 1e-2, "float64": 1e-9}


# ------------------------------------------------------------------ kernel vs end-to-end (issue 17 item 2)
# Where the end-to-end time of the op beyond its kernels goes, measured: bench_op_breakdown.py.
BREAKDOWN_GOAL_CASES = tuple((GOAL_SHAPE, p) for p in PERTURBATIONS) + (((64, 1024, 256), "none"),
                                                                          ((64, 4096, 256), "none"))
BREAKDOWN_SMOKE_CASES = (((4, 16, 32), "none"), ((4, 16, 32), "at"))
ALLOC_OPS = ("aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zeros", "aten::zeros_like",
             "aten::zero_", "aten::fill_", "aten::new_empty", "aten::new_zeros", "aten::new_empty_strided")


def rusage_counters() -> dict:
    """This process's minor page faults and context switches (voluntary: waits; involuntary: preempted by
    another process, i.e. the host taking the core) so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"minflt": r.ru_minflt, "nvcsw": r.ru_nvcsw, "nivcsw": r.ru_nivcsw}


def timed_samples(fn, rounds: int) -> tuple[list[float], dict]:
    """(seconds of each of `rounds` calls, rusage counters per call over them)."""
    import time

    before = rusage_counters()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    after = rusage_counters()
    return times, {k: (after[k] - before[k]) / max(rounds, 1) for k in before}


def breakdown_callables(case: Case, inputs: dict) -> dict:
    """name -> callable of one fwd+bwd of the cpu op, at three depths:
        e2e      the public op: fused_attn_at.attention_pool(...) + torch.autograd.grad (what training pays)
        public_fwd_nograd  the public op's forward under no_grad (Python checks, dispatch, kernel; no autograd)
        ops      torch.ops.fused_attn_at.attention_pool_fwd + attention_pool_bwd called directly under no_grad
                 on pre-allocated, reused inputs: the kernels and the allocation of their outputs (the C++ ops
                 have no out= entry), nothing of Python's or autograd's
        ops_fwd, ops_bwd   each of the two alone."""
    import torch

    import fused_attn_at
    from fused_attn_at.ops import KIND

    h, scores, mask, dc = inputs["h"], inputs["scores"], inputs["mask"], inputs["dcontext"]
    kw = pool_kwargs(case, inputs)
    kind = KIND[kw["perturbation"]]
    direction = inputs["noise"] if case.perturbation == "rp" else inputs["grad"]
    hd, sd = h.detach(), scores.detach()
    ops = torch.ops.fused_attn_at
    with torch.no_grad():
        _, attention = ops.attention_pool_fwd(hd, sd, mask, direction, kind, 1.0)

    def e2e():
        out = fused_attn_at.attention_pool(h, scores, mask, backend="cpu", **kw)
        return torch.autograd.grad(out.context, (h, scores), dc)

    def public_fwd_nograd():
        with torch.no_grad():
            return fused_attn_at.attention_pool(h, scores, mask, backend="cpu", **kw)

    def ops_fwd():
        with torch.no_grad():
            return ops.attention_pool_fwd(hd, sd, mask, direction, kind, 1.0)

    def ops_bwd():
        with torch.no_grad():
            return ops.attention_pool_bwd(dc, None, hd, attention)

    def ops_both():
        with torch.no_grad():
            _, att = ops.attention_pool_fwd(hd, sd, mask, direction, kind, 1.0)
            return ops.attention_pool_bwd(dc, None, hd, att)

    return {"e2e": e2e, "public_fwd_nograd": public_fwd_nograd, "ops": ops_both, "ops_fwd": ops_fwd,
            "ops_bwd": ops_bwd}


def profile_breakdown(fn, calls: int) -> dict:
    """Per call, from torch.profiler (CPU) over `calls` calls of fn: self CPU seconds of the fused_attn_at::
    kernels, of allocation ops (ALLOC_OPS), of autograd's engine and nodes, of other aten ops, and the wall
    time per call under the profiler; 'outside_ops' = wall - all of them: Python (the op's checks, the
    autograd.grad call) and whatever the profiler does not see. Self times, so nothing is counted twice."""
    import time

    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - t0) / calls
    parts = {"kernel_s": 0.0, "alloc_s": 0.0, "autograd_s": 0.0, "other_ops_s": 0.0}
    kernels = {}
    for ev in prof.key_averages():
        self_s = ev.self_cpu_time_total * 1e-6 / calls
        if ev.key.startswith("fused_attn_at::"):
            parts["kernel_s"] += self_s
            kernels[ev.key] = self_s
        elif ev.key in ALLOC_OPS:
            parts["alloc_s"] += self_s
        elif "autograd" in ev.key:
            parts["autograd_s"] += self_s
        else:
            parts["other_ops_s"] += self_s
    parts["profiled_wall_s"] = wall
    parts["outside_ops_s"] = max(0.0, wall - sum(v for k, v in parts.items() if k != "profiled_wall_s"))
    parts["kernels"] = kernels
    return parts
