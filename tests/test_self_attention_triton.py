"""The "triton" backend of fused_attn_at.perturbed_attention (fused_attn_at/ops/triton_self_attention.py) against
the reference with materialised maps (python_ref), under Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 without a GPU): values and gradients in float64 for none/AT (dense G, and through a
CleanPassRecord)/RP (dense noise, and the in-kernel noise compared with the reference fed rp_noise's
materialisation)/iAT (u from materialised S and G, then the AT kernels), with padding, a fully masked row, causal, bias (broadcast, -inf
entries, learnable), attn_mask, Tq != Tk, B = 1 and odd sizes crossing 16-query/16-key block edges; float32 under
the tolerance rule and bfloat16/float16 under the ulp rule (tests/_helpers.py); gradcheck; opcheck of every op;
torch.compile(fullgraph=True) with aot_eager; and a profiler trace of the AT-record path that allocates nothing of
B*nh*Tq*Tk elements; hypothesis fuzzing of random calls against the reference. The interpreter is slow: the
shapes are small and the blocks 16 x 16."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings

import fused_attn_at
import python_ref
import _self_attention_cases as cases
from _helpers import ATOL, assert_within_rule, assert_within_ulp_rule, require_backend
from _self_attention_cases import F64
from _self_attention_cases import leaves as _leaves
from _self_attention_cases import map_shape as _map_shape
from _self_attention_cases import t as _t

try:
    from fused_attn_at.ops import triton_self_attention as tsa
except Exception as exc:  # pragma: no cover - a broken triton install; require_backend says why
    tsa = None
    _IMPORT_ERROR = exc

BLOCK = 16
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")  # no torch.compile of the interpreter


@pytest.fixture(autouse=True)
def _triton_small_blocks():
    require_backend("triton")  # fails (not skips) unless triton is missing: then a skip with the reason printed
    assert tsa is not None
    with tsa.launch_overrides(block_m=BLOCK, block_n=BLOCK):
        yield


# name: B, nh, Tq, Tk, d, dv, key-mask pattern, causal, bias shape (None = no bias), attn_mask
CASES = {
    "padding": (2, 1, 35, 35, 8, 5, "pad", False, None, False),
    "causal_bias": (2, 1, 33, 33, 4, 4, None, True, (1, 1), False),
    "cross_fullymasked_bias_inf": (2, 2, 5, 37, 6, 3, "empty", False, (2, 1), False),
    "b1_causal_pad_tq_gt_tk": (1, 1, 35, 18, 3, 7, "pad", True, (1, 1), False),
    "attn_mask_rows": (2, 1, 9, 33, 4, 4, "pad", False, None, True),
}


def make_case(name, seed=0, dtype=F64):
    return cases.make_case(CASES, name, seed, dtype)


def _with_grads(out, args, kw, seed=99, w_dtype=torch.float32):
    """{"out", "grad0", ...}: the output and the gradients of <w, out> wrt the leaves (zeros where unused); w is
    drawn in float32 and rounded to w_dtype (the same values in every precision)."""
    leaves = _leaves(args, kw)
    w = _t(*out.shape, seed=seed, dtype=torch.float32).to(w_dtype).to(out.dtype)
    grads = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    result = {"out": out.detach()}
    for i, (g, x) in enumerate(zip(grads, leaves)):
        result[f"grad{i}"] = torch.zeros_like(x) if g is None else g
    return result


def _compare(out, ref, args, kw, atol=1e-10):
    a, b = _with_grads(out, args, kw), _with_grads(ref, args, kw)
    assert torch.isfinite(a["out"]).all()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-9, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# Values and gradients vs the reference, float64


VALUE_CASES = [(name, kind, norm) for name in sorted(CASES)
               for kind, norm in ((None, "example"), ("at", "example"), ("rp", "row"))]
VALUE_CASES += [("b1_causal_pad_tq_gt_tk", "iat", "example"), ("cross_fullymasked_bias_inf", "iat", "row")]


@pytest.mark.parametrize("name,kind,norm", VALUE_CASES)
def test_values_and_gradients_vs_reference(name, kind, norm):
    args, kw = make_case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iAT with a batch of one
        out, ref = cases.values_vs_reference(args, kw, kind, norm, "triton")
    _compare(out, ref, args, kw)


def test_at_row_norm_and_query_mask():
    args, kw = make_case("padding")
    query_mask = torch.ones(2, 35, dtype=torch.bool)
    query_mask[0, 30:] = False
    extra = dict(perturbation="at", grad=_t(*_map_shape(args), seed=9), norm="row", eps=0.4, query_mask=query_mask)
    out = fused_attn_at.perturbed_attention(*args, **kw, **extra, backend="triton")
    _compare(out, python_ref.perturbed_attention(*args, **kw, **extra), args, kw)


@pytest.mark.parametrize("name", ["padding", "cross_fullymasked_bias_inf", "b1_causal_pad_tq_gt_tk"])
def test_rp_in_kernel_noise_equals_reference_fed_the_same_noise(name):
    """RP without a noise tensor: the kernels generate standard normal numbers from a seed drawn from
    `generator`; the reference given those numbers (rp_noise materialises them) gives the same values and
    gradients."""
    args, kw = make_case(name)
    with tsa.launch_overrides(block_m=32, block_n=32):  # the in-kernel Philox is slow under the interpreter
        out, ref = cases.rp_seeded_vs_reference(args, kw, "triton", tsa.rp_noise)
        _compare(out, ref, args, kw)


def test_rp_noise_is_standard_normal_and_seeded():
    q, k = torch.zeros(2, 3, 50, 1), torch.zeros(2, 3, 200, 1)
    z = tsa.rp_noise(q, k, 2**40 + 12345)
    assert z.shape == (2, 3, 50, 200) and z.dtype == torch.float32
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert abs((z.double() ** 4).mean().item() - 3) < 0.15  # Gaussian kurtosis
    assert torch.equal(z, tsa.rp_noise(q, k, 2**40 + 12345))
    assert not torch.equal(z, tsa.rp_noise(q, k, 2**40 + 12346))
    args, _ = make_case("b1_causal_pad_tq_gt_tk")
    with tsa.launch_overrides(block_m=32, block_n=32):
        runs = [fused_attn_at.perturbed_attention(*args, perturbation="rp", backend="triton",
                                                  generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# ---------------------------------------------------------------------------------------------------------
# AT through a CleanPassRecord: G recomputed block by block from the clean pass


@pytest.mark.parametrize("name,norm", [("causal_bias", "example"), ("cross_fullymasked_bias_inf", "row"),
                                       ("attn_mask_rows", "example")])
def test_at_through_record_matches_reference(name, norm):
    args, kw = make_case(name)
    w = _t(*args[0].shape[:3], args[2].shape[3], seed=31)
    adv1, g1, rec = cases.clean_then_adv(args, kw, "triton", norm, w)
    adv2, g2, rec_ref = cases.clean_then_adv(args, kw, "reference", norm, w)
    assert isinstance(rec.fused, tsa.TritonCleanPass) and rec.grad is None
    torch.testing.assert_close(adv1, adv2, atol=1e-10, rtol=1e-9)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    # the record materialises G for a consumer that wants the map, and feeds the reference
    torch.testing.assert_close(rec.gradient(), rec_ref.gradient(), atol=1e-12, rtol=1e-10)
    out = fused_attn_at.perturbed_attention(*args, **kw, perturbation="at", grad=rec, norm=norm, backend="reference")
    torch.testing.assert_close(out, fused_attn_at.perturbed_attention(*args, **kw, perturbation="at", grad=rec,
                                                                      norm=norm, backend="triton"))


def test_record_errors_and_zero_gradient():
    args, _ = make_case("padding")
    cases.check_record_errors_and_zero_gradient(args, "triton", lambda a: tuple(x[:1] for x in a))


def test_at_record_path_allocates_no_map():
    """Clean call with a record, its backward, the adversarial call and its backward: no torch op allocates or
    reads a tensor of B*nh*Tq*Tk elements (the profiler sees every ATen op, the launchers' included)."""
    from torch.profiler import ProfilerActivity, profile

    B, nh, T, d = 1, 1, 256, 4  # (the interpreter copies each argument as bytes: q's 4 KiB read as 4096 numbers)
    q, k, v = (_t(B, nh, T, d, seed=s, dtype=torch.float32, grad=True) for s in (1, 2, 3))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - 20:] = False
    with tsa.launch_overrides(block_m=64, block_n=64), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        rec = fused_attn_at.CleanPassRecord()
        out = fused_attn_at.perturbed_attention(q, k, v, mask, causal=True, record=rec, backend="triton")
        out.sum().backward()
        rec.mark_backward_done()
        adv = fused_attn_at.perturbed_attention(q, k, v, mask, causal=True, perturbation="at", grad=rec,
                                                backend="triton")
        adv.square().sum().backward()
    assert torch.isfinite(adv).all() and adv.shape == (B, nh, T, d)
    cases.assert_no_map(*cases.largest_sizes(prof), B * nh * T * T)


# ---------------------------------------------------------------------------------------------------------
# float32 (the tolerance rule) and half precision (the ulp rule)


def _run(backend_or_ref, args, kw, extra, w_dtype):
    if backend_or_ref == "ref":
        out = python_ref.perturbed_attention(*args, **kw, **extra)
    else:
        out = fused_attn_at.perturbed_attention(*args, **kw, **extra, backend="triton")
    return _with_grads(out, args, kw, w_dtype=w_dtype)


def _cast_case(args, kw, extra, dtype):
    def cast(x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        return x.detach().to(dtype).requires_grad_(x.requires_grad)
    return tuple(cast(x) for x in args), {n: cast(x) for n, x in kw.items()}, {n: cast(x) for n, x in extra.items()}


@pytest.mark.parametrize("kind", [None, "at"])
@pytest.mark.parametrize("dtype,low_p", [(torch.float32, 0), (torch.bfloat16, 1), (torch.float16, 1),
                                         (torch.bfloat16, 0), (torch.float16, 0)])
def test_low_precision_within_the_tolerance_rules(kind, dtype, low_p):
    """float32: the tolerance rule. float16/bfloat16: the same rule with the reference run in that dtype (flash
    attention's own criterion), with P and dS rounded to the dtype for their matmuls (low_p=1, the default:
    tensor-core matmuls) or not (low_p=0: float32 matmuls from exact products); with low_p=0 the output also
    meets the ulp rule element by element. (The gradients cannot: the backward reads the saved O, rounded to the
    dtype, in rowsum(dO * O), as flash attention does: a row with one key gets dS = P (dO.v - dO.O) != 0.)"""
    args, kw = make_case("causal_bias", dtype=torch.float32)
    kw["bias"] = None  # the reference adds a low precision bias in that precision; the kernels in float32
    extra = dict(perturbation=kind, eps=0.8)
    if kind == "at":
        extra["grad"] = _t(*_map_shape(args), seed=7, dtype=torch.float32)
    low = _cast_case(args, kw, extra, dtype)  # the values every run starts from
    with tsa.launch_overrides(low_p=low_p):
        actual = _run("triton", *low, dtype)
    ref64 = _run("ref", *_cast_case(*low, F64), dtype)
    ref32 = _run("ref", *_cast_case(*low, torch.float32), dtype)
    what = f"triton {dtype} low_p={low_p} kind={kind}"
    assert_within_rule(actual, ref64, ref32 if dtype == torch.float32 else _run("ref", *low, dtype), atol=ATOL,
                       what=what)
    if dtype != torch.float32 and not low_p:
        assert_within_ulp_rule({"out": actual["out"]}, {"out": ref64["out"]}, {"out": ref32["out"]}, dtype,
                               what=what)


# ---------------------------------------------------------------------------------------------------------
# gradcheck (r held fixed), opcheck, torch.compile


@pytest.mark.parametrize("kind", [None, "at", "rp_seed"])
def test_gradcheck(kind):
    B, nh, Tq, Tk, d = 1, 1, 5, 18, 3  # 18 keys: two key blocks
    q, k, v, key_mask, attn_mask, bias = cases.gradcheck_inputs(B, nh, Tq, Tk, d)
    kw = dict(causal=True, attn_mask=attn_mask, eps=0.8)
    if kind == "at":
        kw.update(perturbation="at", grad=_t(B, nh, Tq, Tk, seed=5))

    def f(q, k, v, bias):
        extra = dict(perturbation="rp", generator=torch.Generator().manual_seed(11)) if kind == "rp_seed" else {}
        return fused_attn_at.perturbed_attention(q, k, v, key_mask, **kw, bias=bias, **extra, backend="triton")

    assert torch.autograd.gradcheck(f, (q, k, v, bias), atol=1e-7, fast_mode=True)


def _op_args(kind, dtype=F64):
    return cases.op_args(torch.ops.fused_attn_at_triton, 1, kind, dtype)


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_opcheck(kind):
    ops = torch.ops.fused_attn_at_triton
    q, k, v, key_mask, bias, coef, dense, clean = _op_args(kind)
    for x in (q, k, v, bias):
        x.requires_grad_(True)
    torch.library.opcheck(ops.sa_fwd, (q, k, v, key_mask, bias, True, 0.5, kind, coef, dense, 1234, *clean),
                          test_utils=OPCHECK_UTILS)
    q, k, v, bias = (x.detach() for x in (q, k, v, bias))
    out, lse = ops.sa_fwd(q, k, v, key_mask, bias, False, 0.5, kind, coef, dense, 9, *clean)
    dout = _t(*out.shape, seed=12)
    torch.library.opcheck(ops.sa_bwd, (dout, q, k, v, out, lse, key_mask, bias, False, 0.5, kind == 1, kind, coef,
                                       dense, 9, *clean), test_utils=OPCHECK_UTILS)
    if kind in (1, 2):
        torch.library.opcheck(ops.sa_rowsq, (q, k, key_mask, bias, True, dense, 9), test_utils=OPCHECK_UTILS)
    if kind == 2:
        torch.library.opcheck(ops.sa_rp_noise, (q, k, 9), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("kind", [None, "at", "iat"])
def test_compile_fullgraph_matches_eager(kind):
    args, kw = make_case("causal_bias")
    out, ref = cases.compiled_and_eager(args, kw, kind, "triton", compile_backend="aot_eager")
    _compare(out, ref, args, kw)


# ---------------------------------------------------------------------------------------------------------
# Dispatch, errors and what runs the reference


def test_dispatch_and_default_backend(monkeypatch):
    from fused_attn_at import self_attention as sa

    monkeypatch.delenv("FUSED_ATTN_AT_BACKEND", raising=False)
    assert "triton" in sa.SELF_ATTENTION_BACKENDS and "triton" not in sa._NOT_BUILT
    assert sa.why_unavailable("triton", torch.device("cpu")) is None  # the interpreter is on
    assert sa._backend_module("triton", torch.device("cpu")) is tsa
    assert sa._backend_module(None, torch.device("cpu")) is not tsa  # CPU tensors: cpu (or the reference)
    monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", "triton")
    assert sa._backend_module(None, torch.device("cpu")) is tsa
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "needs CUDA tensors" in sa.why_unavailable("triton", torch.device("cpu"))
    monkeypatch.delenv("FUSED_ATTN_AT_BACKEND")
    if not torch.cuda.is_available():  # CUDA tensors would default to triton: assert the choice without them
        monkeypatch.setattr(sa, "why_unavailable", lambda backend, device: None)
        assert sa._backend_module(None, torch.device("cuda")) is tsa


# Triton's interpreter computes the NaN/inf the op then rejects in numpy, which warns about it
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_errors_and_what_runs_the_reference():
    args, _ = make_case("padding")
    q, k, v, m = args
    padded_nan = k.detach().clone()
    padded_nan[-1, :, -1] = math.nan  # a padded key: never part of a score
    assert torch.isfinite(fused_attn_at.perturbed_attention(q, padded_nan, v, m, backend="triton")).all()
    cases.check_errors_and_what_runs_the_reference(args, "triton")


# ---------------------------------------------------------------------------------------------------------
# Fused dropout: the kernels' Philox mask, checked by feeding it (sa_dropout_mask) to the reference

def test_dropout_mask_is_seeded_and_has_the_dropout_distribution():
    with tsa.launch_overrides(block_m=32, block_n=32):
        cases.check_dropout_mask(tsa.dropout_mask, F64)


@pytest.mark.parametrize("name", ["padding", "cross_fullymasked_bias_inf", "b1_causal_pad_tq_gt_tk"])
@pytest.mark.parametrize("kind", [None, "rp"])
def test_dropout_values_and_gradients_vs_reference_given_the_mask(name, kind):
    args, kw = make_case(name)
    out, ref = cases.dropout_vs_reference(args, kw, "triton", tsa.dropout_mask,
                                          tsa.rp_noise if kind == "rp" else None)
    _compare(out, ref, args, kw)


@pytest.mark.parametrize("name,same_mask", [("padding", True), ("causal_bias", False),
                                            ("cross_fullymasked_bias_inf", False)])
def test_dropout_at_step_recomputes_g_with_the_clean_mask(name, same_mask):
    args, kw = make_case(name)
    cases.dropout_at_step(args, kw, "triton", tsa.dropout_mask, same_mask)


def test_dropout_opcheck_and_float32():
    args, _ = make_case("padding")
    q, k, v, m = (x.detach().float() if x.is_floating_point() else x for x in args)
    torch.library.opcheck(torch.ops.fused_attn_at_triton.sa_dropout_mask, (q, k, 0.4, 123), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.fused_attn_at_triton.sa_fwd,
                          (q, k, v, m, None, False, 0.5, 0, None, None, 0) + (None,) * 7 + (0.4, 123, 0.0, 0),
                          test_utils=OPCHECK_UTILS)
    torch.manual_seed(2)
    out = fused_attn_at.perturbed_attention(q, k, v, m, dropout_p=0.4, backend="triton")
    mask = tsa.dropout_mask(q, k, 0.4, cases.drawn_seed(2)).double()
    ref = python_ref.perturbed_attention(q.double(), k.double(), v.double(), m, dropout_p=0.4, dropout_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Property test (hypothesis): random calls against the reference (few and small: the interpreter is slow)


@pytest.mark.parametrize("kind", cases.FUZZ_KINDS)
def test_random_calls_match_reference(kind):
    @settings(max_examples=5, deadline=None, derandomize=True, database=None)
    @given(case=cases.sa_cases(kind, max_batch=2, max_heads=2, max_length=40, max_dim=6))
    def check(case):
        cases.fuzz_vs_reference(case, "triton", tsa.dropout_mask, tsa.rp_noise)

    check()


def test_mask_noise_and_rowsq_ops_are_not_differentiable():
    cases.check_not_differentiable(torch.ops.fused_attn_at_triton, OPCHECK_UTILS)


def test_double_backward_raises():
    cases.check_double_backward_raises("triton")


def test_record_misuse_raises():
    cases.check_record_misuse_raises("triton")


def test_input_validation():
    cases.check_input_validation("triton")
