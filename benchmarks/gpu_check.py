"""The GPU benchmark of benchmarks/gpu_check.sh, and its report: one JSON and one markdown table.

    python benchmarks/gpu_check.py --out DIR [--budget-s 300] [--lengths 64,256,1024,4096,8192] [--hiddens 256,512]
        [--batch 64] [--dtype float32] [--kind at] [--backends cuda,triton,eager,compile] [--passes fwd,bwd,fwdbwd]
        [--junit tests.xml] [--build-status ok] [--build-seconds 95] [--device cuda]

Per shape (B, T, H) and backend (fused CUDA, fused Triton, the eager reference python_ref.attention_pool, and
torch.compile of it with dynamic shapes: one compile for the run) it times the forward (recording autograd, as
in training), the backward alone (an untimed forward builds a fresh graph before each call) and both: on a GPU
with triton.testing.do_bench (median, L2 flushed before each call) and CUDA events around the backward alone.
It reports ms, effective GB/s over the ideal byte count (benchlib.ideal_bytes: h read once per pass, dh written
once) and that as a % of the device copy bandwidth measured at the start of the same run
(bandwidth.measure_bandwidth). Each fused backend is first checked against the eager result (loose, untimed:
tests/ checks accuracy). Cases run in priority order (the main grid, longest rows first; a Triton
launch-parameter sweep; extra rows) until --budget-s is spent; the rest are reported as skipped.
Self-attention rows (issue 18, after the pooling rows, with --sa-share of the budget kept for them):
fused_attn_at.perturbed_attention with --sa-backend (default triton), perturbation None and "at" (a dense G,
where B*nh*T*T float32 stays under 8 GiB), against torch.nn.functional.scaled_dot_product_attention, fwd and
fwd+bwd, at --sa-lengths (default 1024..16384 on a GPU, none on the CPU), nh=8, d=64, --sa-dtype (bfloat16),
B = min(4, 16384 // T) unless --sa-batch. First a numerical check at the smallest T: outputs and dq, dk, dv vs
SDPA (perturbation None) and vs python_ref in float32 ("at"), which fails the run (exit status 1) on a mismatch.
Writes DIR/gpu_check.json and DIR/gpu_check.md.
With --device cpu (and CPU backends: eager, compile, cpu) it runs the same code on the CPU: the tests use it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
import xml.etree.ElementTree as ElementTree

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bandwidth  # noqa: E402
import benchlib  # noqa: E402

PASSES = ("fwd", "bwd", "fwdbwd")
BACKENDS = ("cuda", "triton", "eager", "compile")
FUSED = ("cuda", "triton", "cpu")
# The goal on a GPU: at large shapes >= 70% of the measured copy bandwidth and >= 3x eager.
GOAL_COPY_FRACTION = 0.70
GOAL_EAGER_SPEEDUP = 3.0
GOAL_MIN_T = 4096
# Triton launch parameters tried at the longest rows (block_t, block_h, num_warps): data for tuning the defaults.
TRITON_SWEEP = ((64, 64, 4), (128, 32, 4), (64, 32, 4), (128, 64, 8), (32, 128, 4))
# Self-attention rows: heads, head dim, the largest dense G ("at" rows) in bytes, and the check's tolerances
# (max |x - y| / max |y| of each tensor, low precision results vs SDPA or the float32 reference).
SA_LENGTHS_GPU = (1024, 2048, 4096, 8192, 16384)
SA_HEADS, SA_DIM = 8, 64
SA_DENSE_G_MAX_BYTES = 8 << 30
SA_CHECK_RTOL = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-4}
# the iAT row compares with python_ref's iAT, whose [B, B, nh*T*T] differences must fit its default limit
SA_IAT_BATCH, SA_IAT_REFERENCE_MAX_BYTES = 2, 2 << 30


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _choice_list(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(item.strip() for item in text.split(",") if item.strip())
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma list among {','.join(allowed)}, got {text!r}")
        return values
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("OUT", "gpu_check_out")),
                        help="folder for gpu_check.json and gpu_check.md (default $OUT, else ./gpu_check_out)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="seconds for the whole benchmark; cases left when it is spent are reported skipped")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lengths", type=_int_list, default=(64, 256, 1024, 4096, 8192))
    parser.add_argument("--hiddens", type=_int_list, default=(256, 512))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--kind", choices=benchlib.PERTURBATIONS, default="at",
                        help="perturbation of the main grid (default at: the paper's method)")
    parser.add_argument("--backends", type=_choice_list(BACKENDS + ("cpu",)), default=BACKENDS)
    parser.add_argument("--passes", type=_choice_list(PASSES), default=PASSES)
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the extra rows (bfloat16, iat, none at two lengths) run after the main grid")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the Triton launch-parameter sweep at the longest rows (run after the main grid)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--warmup-ms", type=float, default=10.0)
    parser.add_argument("--rep-ms", type=float, default=60.0)
    parser.add_argument("--copy-mib", type=int, default=1024, help="array size of the copy-bandwidth measurement")
    parser.add_argument("--sa-lengths", type=_int_list, default=None,
                        help="self-attention rows' T (default 1024,2048,4096,8192,16384 on cuda, none on cpu)")
    parser.add_argument("--sa-batch", type=int, default=None, help="self-attention B (default min(4, 16384 // T))")
    parser.add_argument("--sa-heads", type=int, default=SA_HEADS)
    parser.add_argument("--sa-dim", type=int, default=SA_DIM)
    parser.add_argument("--sa-dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--sa-backend", choices=("triton", "cpu", "reference"), default="triton",
                        help="the perturbed_attention backend of the self-attention rows (vs SDPA)")
    parser.add_argument("--sa-share", type=float, default=0.25,
                        help="fraction of --budget-s kept for the self-attention rows (they also get what the "
                             "pooling rows leave)")
    parser.add_argument("--no-self-attention", action="store_true", help="skip the self-attention rows")
    parser.add_argument("--junit", type=pathlib.Path, help="pytest --junitxml file of the GPU tests, summarised")
    parser.add_argument("--tests-status", help="what gpu_check.sh's test step reported when it left no junit file")
    parser.add_argument("--build-status", default="not run", help="what gpu_check.sh's build step reported")
    parser.add_argument("--build-seconds", type=float)
    args = parser.parse_args(argv)
    if args.batch <= 0:
        parser.error(f"--batch must be positive, got {args.batch}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if not 0 <= args.sa_share < 1:
        parser.error(f"--sa-share must be in [0, 1), got {args.sa_share}")
    if args.sa_batch is not None and args.sa_batch <= 0:
        parser.error(f"--sa-batch must be positive, got {args.sa_batch}")
    if args.sa_lengths is None:
        args.sa_lengths = SA_LENGTHS_GPU if args.device == "cuda" else ()
    if args.no_self_attention:
        args.sa_lengths = ()
    return args


@dataclasses.dataclass(frozen=True)
class Row:
    """One (dtype, kind, B, T, H): every backend and pass of it is timed together."""
    dtype: str
    kind: str
    B: int
    T: int
    H: int
    extra: bool = False


def plan_rows(args: argparse.Namespace) -> list[Row]:
    """The main grid (args.dtype, args.kind, every T x H), then extras that widen the picture at two lengths."""
    # Longest rows first: the goal is judged there, and a spent budget should cut the small ones.
    rows = [Row(args.dtype, args.kind, args.batch, T, H) for T in sorted(args.lengths, reverse=True)
            for H in args.hiddens]
    if args.no_extras:
        return rows
    lengths = sorted({min(args.lengths), max(args.lengths)} | ({1024} & set(args.lengths)))
    H = max(args.hiddens)
    extras = [Row(dtype, kind, args.batch, T, H, extra=True)
              for dtype, kind in (("bfloat16", args.kind), (args.dtype, "iat"), (args.dtype, "none"))
              for T in lengths if (dtype, kind) != (args.dtype, args.kind)]
    return rows + extras


def parse_junit(path: pathlib.Path | None) -> dict | None:
    """{'tests', 'failures', 'errors', 'skipped', 'passed', 'seconds', 'failed': [names]} of a pytest junit file."""
    if path is None:
        return None
    if not path.exists():
        return {"missing": str(path)}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "seconds": 0.0}
    failed = []
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            total[key] += int(suite.get(key, 0))
        total["seconds"] += float(suite.get("time", 0.0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    total["failed"] = failed
    return total


# ------------------------------------------------------------------------------------------------- timing

def time_ms(run, device: str, warmup_ms: float, rep_ms: float, setup=None) -> float:
    """Median milliseconds of one call of run() (run(setup()) when setup is given: setup runs untimed before each
    call). On a GPU: triton.testing.do_bench, or CUDA events around run alone, the L2 flushed before each call."""
    if device == "cuda" and setup is None:
        from triton.testing import do_bench

        return float(do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    call = run if setup is None else (lambda: run(setup()))
    call()  # warm-up: first-call costs stay out
    start = time.perf_counter()
    call()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    reps = max(5, min(500, int(rep_ms / estimate_ms)))
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        call()
    if device == "cuda":
        import torch

        flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        times = []
        for _ in range(reps):
            argument = setup()
            flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run(argument)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        argument = None if setup is None else setup()
        start = time.perf_counter()
        run() if setup is None else run(argument)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def pass_callables(mode: str, pool, case: benchlib.Case, inputs: dict):
    """(setup, run) of one timed pass: the forward (recording autograd, as in training), the backward alone (setup:
    an untimed forward before each call, so no graph is back-propagated twice), or both. run does not synchronise
    the GPU: the timers do."""
    import torch

    h, scores, mask, dc = inputs["h"], inputs["scores"], inputs["mask"], inputs["dcontext"]
    kwargs = benchlib.pool_kwargs(case, inputs)
    if mode == "fwd":
        return None, lambda: pool(h, scores, mask, **kwargs)
    if mode == "bwd":
        return (lambda: pool(h, scores, mask, **kwargs).context,
                lambda context: torch.autograd.grad(context, (h, scores), dc))
    if mode == "fwdbwd":
        def run():
            out = pool(h, scores, mask, **kwargs)
            return torch.autograd.grad(out.context, (h, scores), dc)
        return None, run
    raise ValueError(f"mode must be one of {PASSES}, got {mode!r}")


class DynamicCompiledReference:
    """torch.compile(python_ref.attention_pool, dynamic=True): one graph for every shape of the run (benchlib's
    CompiledReference compiles each shape statically, about 10 s apiece on a GPU host: the 8-minute budget
    cannot afford ten of them). Each new shape is warmed up, forward and backward, before it is timed."""

    def __init__(self):
        self.fn = None
        self.warm = set()

    def get(self, case: benchlib.Case, inputs: dict):
        import torch

        import python_ref

        if self.fn is None:
            self.fn = torch.compile(python_ref.attention_pool, dynamic=True)
        if case.compile_key not in self.warm:
            out = self.fn(inputs["h"], inputs["scores"], inputs["mask"], **benchlib.pool_kwargs(case, inputs))
            torch.autograd.grad(out.context, (inputs["h"], inputs["scores"]), inputs["dcontext"])
            self.warm.add(case.compile_key)
        return self.fn


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def run_row(row: Row, args, compiled: DynamicCompiledReference, copy_gbps: float, deadline: float) -> list[dict]:
    """Every backend and pass of one row: check each fused backend against eager, then time."""
    import torch

    results = []
    base = benchlib.Case(args.device, row.dtype, row.B, row.T, row.H, row.kind, "fwdbwd", "eager")
    inputs = benchlib.make_inputs(base)
    eager_out = benchlib.outputs_of(base, benchlib.pool_function(base, None, inputs), inputs)
    for backend in args.backends:
        case = dataclasses.replace(base, backend=backend)
        record = dict(dtype=row.dtype, kind=row.kind, B=row.B, T=row.T, H=row.H, extra=row.extra, backend=backend)
        reason = benchlib.unavailable_reason(args.device, backend, row.dtype)
        if reason is not None:
            results += [dict(record, mode=mode, skipped=reason) for mode in args.passes]
            continue
        if time.monotonic() > deadline:
            results += [dict(record, mode=mode, skipped="time budget spent") for mode in args.passes]
            continue
        try:
            pool = benchlib.pool_function(case, compiled, inputs)
            check = None
            if backend != "eager":
                got = benchlib.outputs_of(case, pool, inputs)
                check = max(benchlib.relative_error(g, e) for g, e in zip(got, eager_out))
        except Exception as exc:  # noqa: BLE001 - one failing backend must not end the run (OOM, compile error)
            results += [dict(record, mode=mode, error=_error_text(exc)) for mode in args.passes]
            continue
        for mode in args.passes:
            if time.monotonic() > deadline:
                results.append(dict(record, mode=mode, skipped="time budget spent"))
                continue
            try:
                setup, timed = pass_callables(mode, pool, case, inputs)
                ms = time_ms(timed, args.device, args.warmup_ms, args.rep_ms, setup=setup)
            except Exception as exc:  # noqa: BLE001
                results.append(dict(record, mode=mode, error=_error_text(exc)))
                continue
            finally:
                if args.device == "cuda":
                    torch.cuda.synchronize()
            nbytes = benchlib.ideal_bytes(row.B, row.T, row.H, row.dtype, row.kind, mode)
            gbps = nbytes / (ms * 1e-3) / 1e9
            results.append(dict(record, mode=mode, ms=ms, bytes=nbytes, gbps=gbps,
                                copy_fraction=gbps / copy_gbps if copy_gbps else None,
                                max_rel_err_vs_eager=check,
                                check_ok=None if check is None else check <= benchlib.SANITY_RTOL[row.dtype]))
    del inputs, eager_out
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return results


def run_triton_sweep(args, copy_gbps: float, deadline: float) -> list[dict]:
    """fwd and bwd of the Triton backend at the longest T, for each H, under each TRITON_SWEEP setting."""
    if args.no_sweep or args.device != "cuda" or "triton" not in args.backends:
        return []
    if benchlib.unavailable_reason(args.device, "triton", args.dtype) is not None:
        return []
    from fused_attn_at.ops import triton_attention_pool as tri

    T = max(args.lengths)
    results = []
    for H in args.hiddens:
        case = benchlib.Case(args.device, args.dtype, args.batch, T, H, args.kind, "fwd", "triton")
        inputs = benchlib.make_inputs(case)
        pool = benchlib.pool_function(case, None, inputs)
        for block_t, block_h, num_warps in TRITON_SWEEP:
            for mode in ("fwd", "bwd"):
                record = dict(dtype=args.dtype, kind=args.kind, B=args.batch, T=T, H=H, mode=mode, block_t=block_t,
                              block_h=block_h, num_warps=num_warps)
                if time.monotonic() > deadline:
                    results.append(dict(record, skipped="time budget spent"))
                    continue
                try:
                    with tri.launch_overrides(block_t=block_t, block_h=block_h, num_warps=num_warps):
                        setup, timed = pass_callables(mode, pool, case, inputs)
                        ms = time_ms(timed, args.device, args.warmup_ms, args.rep_ms, setup=setup)
                except Exception as exc:  # noqa: BLE001
                    results.append(dict(record, error=_error_text(exc)))
                    continue
                gbps = benchlib.ideal_bytes(args.batch, T, H, args.dtype, args.kind, mode) / (ms * 1e-3) / 1e9
                results.append(dict(record, ms=ms, gbps=gbps, copy_fraction=gbps / copy_gbps))
        del inputs
    return results


# ------------------------------------------------------------------------------------ self-attention rows

def _sa_inputs(args, B: int, T: int, seed: int = 0) -> dict:
    import torch

    dtype = getattr(torch, args.sa_dtype)
    g = torch.Generator(device=args.device).manual_seed(seed)
    shape = (B, args.sa_heads, T, args.sa_dim)
    q, k, v, dout = (torch.randn(shape, generator=g, device=args.device, dtype=dtype) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    return dict(q=q, k=k, v=v, dout=dout)


def _sa_dense_g_bytes(args, B: int, T: int) -> int:
    return B * args.sa_heads * T * T * 4


def _sa_functions(args, inputs: dict, B: int, T: int) -> dict:
    """{name: f() -> O}: the fused backend without and with a dense-G AT perturbation (when G fits), and SDPA."""
    import torch

    import fused_attn_at

    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    fns = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
           "fused": lambda: fused_attn_at.perturbed_attention(q, k, v, backend=args.sa_backend)}
    if _sa_dense_g_bytes(args, B, T) <= SA_DENSE_G_MAX_BYTES:
        g = torch.randn((B, args.sa_heads, T, T), generator=torch.Generator(device=args.device).manual_seed(1),
                        device=args.device, dtype=torch.float32)
        fns["fused_at"] = lambda: fused_attn_at.perturbed_attention(q, k, v, perturbation="at", grad=g, eps=1.0,
                                                                     backend=args.sa_backend)
        inputs["grad"] = g
    return fns


def _sa_outputs(fn, inputs: dict) -> list:
    import torch

    out = fn()
    return [out.detach()] + list(torch.autograd.grad(out, (inputs["q"], inputs["k"], inputs["v"]), inputs["dout"]))


def _sa_reference_error(got: list, inputs: dict, **kwargs) -> float:
    """The largest relative error of `got` (O, dq, dk, dv of a fused call) against python_ref.perturbed_attention
    (q, k, v, **kwargs) in float32 with the same dO."""
    import torch

    import python_ref

    q32, k32, v32 = (inputs[n].detach().float().requires_grad_(True) for n in ("q", "k", "v"))
    ref = python_ref.perturbed_attention(q32, k32, v32, **kwargs)
    want = [ref.detach()] + list(torch.autograd.grad(ref, (q32, k32, v32), inputs["dout"].float()))
    return max(benchlib.relative_error(a, b) for a, b in zip(got, want))


# the fused backends' modules, whose dropout_mask materialises the mask their kernels draw
SA_DROPOUT_MASKS = {"cpu": "cpp_self_attention", "triton": "triton_self_attention"}


def _sa_dropout_error(args, inputs: dict) -> float:
    """Attention dropout 0.1 in the kernels vs python_ref fed the kernels' own mask (the backend's dropout_mask
    materialises it from the seed the call drew from the global generator), float32; the largest relative error
    of O, dq, dk, dv."""
    import importlib

    import torch

    import fused_attn_at
    from fused_attn_at.ops.cpp_self_attention import _draw_seed

    dropout_mask = importlib.import_module(f"fused_attn_at.ops.{SA_DROPOUT_MASKS[args.sa_backend]}").dropout_mask
    torch.manual_seed(5)
    got = _sa_outputs(lambda: fused_attn_at.perturbed_attention(inputs["q"], inputs["k"], inputs["v"], dropout_p=0.1,
                                                                backend=args.sa_backend), inputs)
    torch.manual_seed(5)
    seed = _draw_seed(None)  # the call's first draw: its dropout seed
    mask = dropout_mask(inputs["q"].detach().float(), inputs["k"].detach().float(), 0.1, seed).float()
    return _sa_reference_error(got, inputs, dropout_p=0.1, dropout_mask=mask)


def _sa_iat_error(args, T: int) -> float | None:
    """iAT (a dense G, batch SA_IAT_BATCH: iAT needs other examples) in the fused backend (S, G and u as maps, then
    the AT kernels) vs python_ref in float32; None where the reference's differences would not fit its limit."""
    import torch

    import fused_attn_at

    B = SA_IAT_BATCH
    if 3 * B * B * args.sa_heads * T * T * 4 > SA_IAT_REFERENCE_MAX_BYTES:
        return None
    inputs = _sa_inputs(args, B, T, seed=3)
    g = torch.randn((B, args.sa_heads, T, T), generator=torch.Generator(device=args.device).manual_seed(4),
                    device=args.device, dtype=torch.float32)
    got = _sa_outputs(lambda: fused_attn_at.perturbed_attention(inputs["q"], inputs["k"], inputs["v"],
                                                                perturbation="iat", grad=g, eps=1.0,
                                                                backend=args.sa_backend), inputs)
    return _sa_reference_error(got, inputs, perturbation="iat", grad=g, eps=1.0)


def check_self_attention(args, T: int) -> dict:
    """The numerical check at T: the fused backend (no perturbation) vs SDPA, and with a dense-G AT perturbation,
    with attention dropout and (where the reference's iAT fits) with a dense-G iAT perturbation vs python_ref in
    float32; each of O, dq, dk, dv within SA_CHECK_RTOL of max |reference|."""
    B = args.sa_batch or min(4, max(1, 16384 // T))
    inputs = _sa_inputs(args, B, T, seed=2)
    fns = _sa_functions(args, inputs, B, T)
    tol = SA_CHECK_RTOL[args.sa_dtype]
    errors = {}
    got, want = _sa_outputs(fns["fused"], inputs), _sa_outputs(fns["sdpa"], inputs)
    errors["none_vs_sdpa"] = max(benchlib.relative_error(a, b) for a, b in zip(got, want))
    if "fused_at" in fns:
        errors["at_vs_reference"] = _sa_reference_error(_sa_outputs(fns["fused_at"], inputs), inputs,
                                                        perturbation="at", grad=inputs["grad"], eps=1.0)
        if args.sa_backend in SA_DROPOUT_MASKS:  # the reference's dropout is torch's draw: nothing to feed it
            errors["dropout_vs_reference"] = _sa_dropout_error(args, inputs)
    if args.sa_backend != "reference":
        iat = _sa_iat_error(args, T)
        if iat is not None:
            errors["iat_vs_reference"] = iat
    del inputs, fns
    return dict(T=T, B=B, dtype=args.sa_dtype, backend=args.sa_backend, rtol=tol, errors=errors,
                check_ok=all(e <= tol for e in errors.values()))


def run_self_attention(args, deadline: float) -> dict:
    """{"check": ..., "cases": [...]} of the self-attention rows (empty without --sa-lengths)."""
    if not args.sa_lengths:
        return dict(check=None, cases=[])
    import torch

    import fused_attn_at

    reason = fused_attn_at.self_attention.why_unavailable(args.sa_backend, torch.device(args.device))
    if reason is not None:
        return dict(check=dict(skipped=reason), cases=[])
    try:
        check = check_self_attention(args, min(args.sa_lengths))
    except Exception as exc:  # noqa: BLE001 - reported, and a failed run
        check = dict(T=min(args.sa_lengths), error=_error_text(exc))
    finally:
        if args.device == "cuda":
            torch.cuda.empty_cache()
    cases = []
    for T in sorted(args.sa_lengths):
        B = args.sa_batch or min(4, max(1, 16384 // T))
        base = dict(dtype=args.sa_dtype, B=B, nh=args.sa_heads, d=args.sa_dim, T=T)
        try:
            inputs = _sa_inputs(args, B, T)
            fns = _sa_functions(args, inputs, B, T)
        except Exception as exc:  # noqa: BLE001
            cases.append(dict(base, name="all", mode="fwdbwd", error=_error_text(exc)))
            continue
        if "fused_at" not in fns:
            cases += [dict(base, name="fused_at", mode=mode, skipped=f"dense G of "
                           f"{_sa_dense_g_bytes(args, B, T) / 2**30:.0f} GiB") for mode in ("fwd", "fwdbwd")]
        for name, fn in fns.items():
            for mode in ("fwd", "fwdbwd"):
                record = dict(base, name=name, mode=mode)
                if time.monotonic() > deadline:
                    cases.append(dict(record, skipped="time budget spent"))
                    continue
                run = fn if mode == "fwd" else (lambda fn=fn: torch.autograd.grad(
                    fn(), (inputs["q"], inputs["k"], inputs["v"]), inputs["dout"]))
                try:
                    ms = time_ms(run, args.device, args.warmup_ms, args.rep_ms)
                except Exception as exc:  # noqa: BLE001
                    cases.append(dict(record, error=_error_text(exc)))
                    continue
                finally:
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                flops = 4 * B * args.sa_heads * T * T * args.sa_dim * (1 if mode == "fwd" else 3.5)
                cases.append(dict(record, ms=ms, tflops=flops / (ms * 1e-3) / 1e12))
        del inputs, fns
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(f"[gpu_check] self-attention T={T} B={B}", flush=True)
    sdpa = {(c["T"], c["mode"]): c["ms"] for c in cases if c["name"] == "sdpa" and "ms" in c}
    for c in cases:
        if "ms" in c and (c["T"], c["mode"]) in sdpa:
            c["sdpa_ms_over_ms"] = sdpa[(c["T"], c["mode"])] / c["ms"]
    return dict(check=check, cases=cases)


def add_speedups(cases: list[dict]) -> None:
    """speedup_vs_eager (eager ms / ms) on every timed case whose eager twin was timed."""
    eager = {(c["dtype"], c["kind"], c["B"], c["T"], c["H"], c["mode"]): c["ms"]
             for c in cases if c["backend"] == "eager" and "ms" in c}
    for c in cases:
        key = (c["dtype"], c["kind"], c["B"], c["T"], c["H"], c["mode"])
        if "ms" in c and key in eager:
            c["speedup_vs_eager"] = eager[key] / c["ms"]


def goal_summary(cases: list[dict]) -> dict:
    """Per fused backend over the timed main-grid cases: at T >= GOAL_MIN_T the worst copy fraction and the worst
    speedup vs eager (the issue's goals, judged there), and the range of speedups over every T.
    At long rows eager's batched GEMVs already stream h about once per pass, so the speedup there is bounded
    by eager's own distance from the bandwidth floor; the small rows show the saved launches."""
    summary = {}
    for backend in FUSED:
        timed = [c for c in cases if c["backend"] == backend and not c["extra"] and "ms" in c]
        large = [c for c in timed if c["T"] >= GOAL_MIN_T]
        if not large:
            continue
        fractions = [c["copy_fraction"] for c in large if c.get("copy_fraction") is not None]
        large_speedups = [c["speedup_vs_eager"] for c in large if "speedup_vs_eager" in c]
        all_speedups = [c["speedup_vs_eager"] for c in timed if "speedup_vs_eager" in c]
        worst_fraction = min(fractions) if fractions else None
        worst_speedup = min(large_speedups) if large_speedups else None
        summary[backend] = dict(
            cases=len(large), worst_copy_fraction=worst_fraction, worst_speedup_vs_eager=worst_speedup,
            speedup_range=[min(all_speedups), max(all_speedups)] if all_speedups else None,
            bandwidth_met=worst_fraction is not None and worst_fraction >= GOAL_COPY_FRACTION,
            speedup_met=worst_speedup is not None and worst_speedup >= GOAL_EAGER_SPEEDUP)
    return summary


# ------------------------------------------------------------------------------------------------ report

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(case: dict | None, what: str) -> str:
    if case is None:
        return ""
    if "error" in case:
        return "error"
    if "skipped" in case:
        return "skip"
    if what == "ms":
        flag = "" if case.get("check_ok") in (None, True) else " (!)"
        return f"{case['ms']:.3f}{flag}"
    if what == "gbps":
        return f"{case['gbps']:.0f} ({100 * case['copy_fraction']:.0f}%)" if case.get("copy_fraction") else \
            f"{case['gbps']:.0f}"
    if what == "speedup":
        return _fmt(case.get("speedup_vs_eager"), ".1f")
    raise ValueError(what)


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# GPU check: {meta['device_name']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, commit {meta['commit']}; "
             f"benchmark {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.", ""]
    build = report.get("build") or {}
    seconds = build.get("seconds")
    lines.append(f"- build: {build.get('status', 'not run')}" + (f" ({seconds:.0f} s)" if seconds else ""))
    tests = report.get("tests")
    if tests is None:
        lines.append("- GPU tests: not run")
    elif "missing" in tests:
        lines.append(f"- GPU tests: no result file ({tests['missing']})"
                     + (f": {report['tests_status']}" if report.get("tests_status") else ""))
    else:
        status = report.get("tests_status")
        lines.append(f"- GPU tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                     f"{tests['skipped']} skipped ({tests['seconds']:.0f} s)"
                     + (": " + ", ".join(tests["failed"][:10]) if tests["failed"] else "")
                     + (f"; pytest {status}" if status and status != "exit status 0" else ""))
    lines.append(f"- device copy bandwidth (read + write, {meta['copy_mib']} MiB, same run): "
                 f"{meta['copy_gbps']:.0f} GB/s; % below = effective GB/s (ideal bytes) / that")
    lines.append("")
    cases = report["cases"]
    backends = [b for b in report["backends"]]
    fused = [b for b in backends if b in FUSED]
    groups = sorted({(c["dtype"], c["kind"], c["B"], c["extra"]) for c in cases}, key=lambda g: (g[3], g[0], g[1]))
    for dtype, kind, B, extra in groups:
        lines += [f"## {dtype}, perturbation {kind}, B={B}" + (" (extra rows)" if extra else ""), ""]
        header = ["pass", "T", "H"] + [f"{b} ms" for b in backends] + [f"{b} GB/s (% copy)" for b in fused] + \
                 [f"{b} x eager" for b in fused]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        keys = sorted({(c["mode"], c["T"], c["H"]) for c in cases
                       if (c["dtype"], c["kind"], c["B"], c["extra"]) == (dtype, kind, B, extra)},
                      key=lambda k: (PASSES.index(k[0]), k[2], k[1]))
        for mode, T, H in keys:
            by_backend = {c["backend"]: c for c in cases
                          if (c["dtype"], c["kind"], c["B"], c["extra"], c["mode"], c["T"], c["H"])
                          == (dtype, kind, B, extra, mode, T, H)}
            cells = ([mode, str(T), str(H)] + [_cell(by_backend.get(b), "ms") for b in backends]
                     + [_cell(by_backend.get(b), "gbps") for b in fused]
                     + [_cell(by_backend.get(b), "speedup") for b in fused])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    goals = report.get("goals") or {}
    if goals:
        lines.append(f"Goal (T >= {GOAL_MIN_T}, main grid): >= {100 * GOAL_COPY_FRACTION:.0f}% of the copy "
                     f"bandwidth and >= {GOAL_EAGER_SPEEDUP:.0f}x eager.")
        for backend, g in goals.items():
            fraction = None if g["worst_copy_fraction"] is None else 100 * g["worst_copy_fraction"]
            speedups = g["speedup_range"]
            bandwidth_verdict = "met" if g["bandwidth_met"] else "NOT met"
            speedup_verdict = "met" if g["speedup_met"] else "NOT met"
            worst_speedup = _fmt(g["worst_speedup_vs_eager"], ".1f")
            lines.append(f"- {backend}: worst {_fmt(fraction, '.0f')}% of copy ({bandwidth_verdict}), worst "
                         f"{worst_speedup}x eager ({speedup_verdict}) over {g['cases']} cases"
                         + (f"; {speedups[0]:.1f}x to {speedups[1]:.1f}x eager over every T" if speedups else ""))
        lines.append("")
    sweep = report.get("triton_sweep") or []
    if sweep:
        lines += ["## Triton launch parameters at the longest rows (defaults: see fused_attn_at/ops/"
                  "triton_attention_pool.py _launch_params)", "",
                  "| pass | T | H | block_t | block_h | warps | ms | GB/s (% copy) |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in sweep:
            # a failed or skipped launch puts its reason in the ms column and leaves GB/s empty
            timing = ([f"{c['ms']:.3f}", f"{c['gbps']:.0f} ({100 * c['copy_fraction']:.0f}%)"] if "ms" in c
                      else [c.get("error", c.get("skipped")), ""])
            cells = [c["mode"], c["T"], c["H"], c["block_t"], c["block_h"], c["num_warps"]] + timing
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    lines += _render_self_attention(report.get("self_attention") or {})
    problems = [c for c in cases if "error" in c or c.get("check_ok") is False]
    if problems:
        lines.append("Problems: " + "; ".join(
            f"{c['backend']} {c['dtype']} {c['kind']} T={c['T']} H={c['H']} {c['mode']}: "
            + (c["error"] if "error" in c else f"differs from eager by {c['max_rel_err_vs_eager']:.2e} (!)")
            for c in problems[:12]))
        lines.append("")
    return "\n".join(lines)


def _render_self_attention(sa: dict) -> list[str]:
    check, cases = sa.get("check"), sa.get("cases") or []
    if check is None and not cases:
        return []
    lines = ["## Self-attention: perturbed_attention vs torch SDPA (fused = no perturbation, fused_at = AT with a "
             "dense G)", ""]
    if check is not None:
        if "skipped" in check or "error" in check:
            lines.append(f"- check: {check.get('skipped') or check.get('error')}")
        else:
            verdict = "ok" if check["check_ok"] else "FAILED"
            errors = ", ".join(f"{k} {v:.2e}" for k, v in check["errors"].items())
            lines.append(f"- check ({check['backend']}, {check['dtype']}, T={check['T']}, B={check['B']}): {errors} "
                         f"(tolerance {check['rtol']:g}): {verdict}")
        lines.append("")
    if cases:
        lines += ["| T | B | pass | " + " | ".join(f"{n} ms" for n in ("sdpa", "fused", "fused_at"))
                  + " | fused / sdpa time | fused TFLOP/s |", "|" + "---|" * 8]
        for T, B, mode in sorted({(c["T"], c["B"], c["mode"]) for c in cases}, key=lambda k: (k[0], k[2])):
            by = {c["name"]: c for c in cases if (c["T"], c["B"], c["mode"]) == (T, B, mode)}

            def cell(name):
                c = by.get(name)
                if c is None:
                    return ""
                return f"{c['ms']:.3f}" if "ms" in c else ("error" if "error" in c else "skip")
            fused = by.get("fused", {})
            ratio = "-" if "sdpa_ms_over_ms" not in fused else f"{1 / fused['sdpa_ms_over_ms']:.2f}x"
            tflops = f"{fused['tflops']:.3g}" if "tflops" in fused else "-"
            lines.append(f"| {T} | {B} | {mode} | {cell('sdpa')} | {cell('fused')} | {cell('fused_at')} | {ratio} "
                         f"| {tflops} |")
        lines.append("")
    return lines


def write_report(report: dict, out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=1, sort_keys=True))
    md_path.write_text(render_markdown(report))
    return json_path, md_path


# -------------------------------------------------------------------------------------------------- main

def run(args: argparse.Namespace) -> dict:
    import torch

    start = time.monotonic()
    deadline = start + args.budget_s
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device (torch.cuda.is_available() is False); use --device cpu "
                         "to exercise the script on a CPU")
    copy = bandwidth.measure_bandwidth(threads=torch.get_num_threads(), mib=args.copy_mib, reps=20, device=args.device)
    info = benchlib.software_info()
    meta = dict(device=args.device, copy_mib=args.copy_mib, copy_gbps=copy["copy_gbps"],
                read_gbps=copy["read_gbps"], torch=info["torch"], triton=info["triton"], commit=info["commit"],
                cuda=torch.version.cuda or "none",
                device_name=torch.cuda.get_device_name(0) if args.device == "cuda" else info["cpu_model"])
    compiled = DynamicCompiledReference()
    # the self-attention rows run last, with --sa-share of the budget kept for them
    pool_deadline = deadline - (args.budget_s * args.sa_share if args.sa_lengths else 0.0)
    cases, sweep, swept = [], [], False
    for row in plan_rows(args) + [None]:
        if (row is None or row.extra) and not swept:  # the sweep goes between the main grid and the extra rows
            sweep, swept = run_triton_sweep(args, copy["copy_gbps"], pool_deadline), True
        if row is None:
            break
        cases += run_row(row, args, compiled, copy["copy_gbps"], pool_deadline)
        print(f"[gpu_check] {time.monotonic() - start:6.1f} s  {row}", flush=True)
    add_speedups(cases)
    self_attention = run_self_attention(args, deadline)
    return dict(meta=meta, budget_s=args.budget_s, elapsed_s=time.monotonic() - start, backends=list(args.backends),
                passes=list(args.passes), cases=cases, goals=goal_summary(cases), triton_sweep=sweep,
                self_attention=self_attention,
                build=dict(status=args.build_status, seconds=args.build_seconds), tests=parse_junit(args.junit),
                tests_status=args.tests_status)


def failures(report: dict) -> list[str]:
    """What makes the run fail (a non-zero exit status): a fused backend whose result differs from eager beyond
    benchlib.SANITY_RTOL, a case of the main grid or the extra rows that raised, and a self-attention check or
    row that failed or raised. (Skips for the time budget
    or an unavailable backend, and errors of the Triton launch-parameter sweep, which only explores, do not.)"""
    out = []
    for c in report["cases"]:
        where = f"{c['backend']} {c['dtype']} {c['kind']} B={c['B']} T={c['T']} H={c['H']} {c['mode']}"
        if c.get("check_ok") is False:
            out.append(f"{where}: differs from eager by {c['max_rel_err_vs_eager']:.2e} "
                       f"(> {benchlib.SANITY_RTOL[c['dtype']]})")
        elif "error" in c:
            out.append(f"{where}: {c['error']}")
    sa = report.get("self_attention") or {}
    check = sa.get("check") or {}
    if "error" in check:
        out.append(f"self-attention check at T={check['T']}: {check['error']}")
    elif check.get("check_ok") is False:
        out.append(f"self-attention {check['backend']} {check['dtype']} T={check['T']}: differs from the reference "
                   f"by {check['errors']} (> {check['rtol']})")
    for c in sa.get("cases") or []:
        if "error" in c:
            out.append(f"self-attention {c['name']} T={c['T']} B={c['B']} {c['mode']}: {c['error']}")
    return out


def main(argv=None) -> int:
    """0 when every check passed and every case ran (or was skipped), 1 otherwise (the files are written either
    way), so that gpu_check.sh and CI see a failed numerical check."""
    args = parse_args(argv)
    report = run(args)
    json_path, md_path = write_report(report, args.out)
    print(md_path.read_text())
    print(f"[gpu_check] wrote {json_path} and {md_path}")
    problems = failures(report)
    for problem in problems:
        print(f"[gpu_check] FAILED {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
