"""The pair ops of the AT training step (issue 17, item 3): attention_pool_pair (the clean and the perturbed
pooling of one h as one op) equals two single attention_pool calls in values and gradients (float64, every
backend that has it here: cpu, reference, triton under the interpreter), double backward included; the ops pass
torch.library.opcheck and trace under torch.compile(fullgraph=True); attention_scores_grad equals the scores
gradient of the op's backward and allocates no [B, T, H] tensor (profiler memory records), and the training step
allocates one [B, T, H] gradient instead of four; a compiled _C without a device's pair kernels raises
NotImplementedError naming the device. The CUDA kernels of the pair, on an emulation: tests/test_cuda_compile.py."""
from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fused_attn_at
import python_ref
from _helpers import cpu_kernel_paths, make_inputs, padded_float64_inputs, require_backend
from fused_attn_at import functional, training
from fused_attn_at.ops import cpp

PAIR_BACKENDS = ("cpu", "reference", "triton")
KIND_CODE = {"at": 1, "rp": 1, "iat": 2}
EPS = 0.7


def _require(backend: str) -> None:
    if backend == "cpu" and not cpp.CPU_AVAILABLE and os.environ.get("FUSED_ATTN_AT_NO_EXT") != "1":
        pytest.fail(f"the C++ extension is not usable: {cpp.UNAVAILABLE_REASON}", pytrace=False)
    require_backend(backend)


def _layout(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "along_t":  # transposed view of a [B, H, T] tensor: the kernels read h along T
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def _direction(inputs, kind):
    return dict(grad=inputs.grad if kind in ("at", "iat") else None, noise=inputs.noise if kind == "rp" else None)


def _clean_and_adversarial(pair: bool, h, scores, inputs, kind, backend):
    """(clean, adversarial) pooling outputs from the pair op, or from the two single ops it replaces."""
    if pair:
        return fused_attn_at.attention_pool_pair(h, scores, inputs.mask, perturbation=kind, eps=EPS, backend=backend,
                                                 **_direction(inputs, kind))
    clean = fused_attn_at.attention_pool(h, scores, inputs.mask, backend=backend)
    adv = fused_attn_at.attention_pool(h, scores, inputs.mask, perturbation=kind, eps=EPS, backend=backend,
                                       **_direction(inputs, kind))
    return clean, adv


def _pair_vs_singles(backend, inputs, kind, h_layout="contiguous"):
    """(pair results, two-single-op results): the four outputs, then dL/dh and dL/dscores for one random
    cotangent of each output, both as dicts of float64 tensors."""
    B, T, H = inputs.h.shape
    gen = torch.Generator().manual_seed(11)
    cot = [torch.randn(B, H, generator=gen, dtype=inputs.h.dtype), torch.randn(B, T, generator=gen, dtype=inputs.h.dtype),
           torch.randn(B, H, generator=gen, dtype=inputs.h.dtype), torch.randn(B, T, generator=gen, dtype=inputs.h.dtype)]
    results = []
    for pair in (True, False):
        h = _layout(inputs.h, h_layout).detach().requires_grad_()
        scores = inputs.scores.detach().clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # iAT with a batch of one
            clean, adv = _clean_and_adversarial(pair, h, scores, inputs, kind, backend)
        outs = (clean.context, clean.attention, adv.context, adv.attention)
        loss = sum((o * c).sum() for o, c in zip(outs, cot))
        grad_h, grad_scores = torch.autograd.grad(loss, (h, scores))
        names = ("context_clean", "attention_clean", "context_adv", "attention_adv", "grad_h", "grad_scores")
        results.append(dict(zip(names, (*[o.detach() for o in outs], grad_h, grad_scores))))
        if pair and h_layout != "contiguous" and backend == "cpu":  # (Triton's backward writes it contiguous)
            assert grad_h.stride() == torch.empty_like(h).stride(), "grad_h keeps h's layout"
    return results


def _assert_close(got: dict, expected: dict, rtol=1e-12, atol=1e-13, what=""):
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# the pair equals two single ops

@pytest.mark.parametrize("backend", PAIR_BACKENDS)
@pytest.mark.parametrize("mask", ["none", "padding", "empty_row"])
@pytest.mark.parametrize("kind", ["at", "iat", "rp"])
def test_pair_equals_two_single_ops(backend, mask, kind):
    _require(backend)
    inputs = make_inputs(4, 9, 6, mask, seed=21, dtype=torch.float64)
    pair, singles = _pair_vs_singles(backend, inputs, kind)
    _assert_close(pair, singles, what=f"{backend} {kind} {mask}")
    # and both are the definition (python_ref) for the perturbed branch
    ref = python_ref.attention_pool(inputs.h, inputs.scores, inputs.mask, perturbation=kind, eps=EPS,
                                    **_direction(inputs, kind))
    torch.testing.assert_close(pair["attention_adv"], ref.attention, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("isa", ["best", "default"])
@pytest.mark.parametrize("layout", ["contiguous", "along_t"])
@pytest.mark.parametrize("shape", [(1, 300, 256), (3, 63, 200), (5, 7, 3)], ids=str)
def test_pair_kernel_paths_equal_two_single_ops(monkeypatch, isa, layout, shape):
    """The CPU kernels' own paths: rows split into feature chunks on 2 threads ((1, 300, 256), (3, 63, 200)),
    h read along T, the portable build; padding holds NaN in the scores, a fully masked row (B > 1)."""
    _require("cpu")
    with cpu_kernel_paths(monkeypatch, isa):
        B, T, H = shape
        inputs = padded_float64_inputs(B, T, H, seed=B + T + H)
        inputs = dataclasses.replace(inputs, scores=inputs.scores.masked_fill(~inputs.mask, float("nan")))
        for kind in ("at", "iat"):
            pair, singles = _pair_vs_singles("cpu", inputs, kind, layout)
            _assert_close(pair, singles, what=f"{shape} {layout} {kind}")
            for name, value in pair.items():
                assert torch.isfinite(value).all(), f"{name}: NaN of the padding leaked"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pair_low_precision_is_as_good_as_two_single_ops(dtype):
    """float32/bfloat16 accumulate in float32: the pair is no further from the float64 result than the two
    single ops are (plus an ulp: its grad_h is rounded once, theirs twice and summed)."""
    _require("cpu")
    inputs = make_inputs(5, 40, 24, "padding", seed=5, dtype=dtype)
    pair, singles = _pair_vs_singles("cpu", inputs, "at")
    exact, _ = _pair_vs_singles("cpu", inputs.to(torch.float64), "at")
    for name, value in exact.items():
        err_pair = float((pair[name].double() - value).abs().max() / value.abs().max())
        err_singles = float((singles[name].double() - value).abs().max() / value.abs().max())
        assert err_pair <= err_singles + 2 * torch.finfo(dtype).eps, f"{name}: {err_pair:.3g} vs {err_singles:.3g}"


@pytest.mark.parametrize("backend", PAIR_BACKENDS)
@pytest.mark.parametrize("kind", ["at", "iat", "rp"])
def test_pair_double_backward_equals_two_single_ops(backend, kind):
    """create_graph=True (under it the C++ pair backward runs as differentiable ATen ops): the second
    derivatives equal those of two single ops."""
    _require(backend)
    inputs = make_inputs(3, 6, 4, "empty_row", seed=8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    w_clean, w_adv = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen,
                                                                                          dtype=torch.float64)
    results = []
    for pair in (True, False):
        h, scores = inputs.leaves()
        clean, adv = _clean_and_adversarial(pair, h, scores, inputs, kind, backend)
        loss = (torch.tanh(clean.context) * w_clean).sum() + (adv.context * w_adv).sum() + (adv.attention ** 2).sum()
        gh, gs = torch.autograd.grad(loss, (h, scores), create_graph=True)
        penalty = (gh ** 2).sum() + (gs ** 3).sum()
        results.append(torch.autograd.grad(penalty, (h, scores)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["at", "rp"])
def test_pair_gradcheck_and_gradgradcheck(kind):
    """Numerical derivatives (AT/RP: r depends on grad/noise only, so moving the scores is exact)."""
    _require("cpu")
    inputs = make_inputs(2, 5, 3, "padding", seed=4, dtype=torch.float64)
    direction = inputs.grad if kind == "at" else inputs.noise

    def f(h, scores):
        return cpp.attention_pool_pair(h, scores, inputs.mask, direction, KIND_CODE[kind], EPS)

    h, scores = inputs.leaves()
    assert torch.autograd.gradcheck(f, (h, scores))
    assert torch.autograd.gradgradcheck(f, (h, scores))


# ---------------------------------------------------------------------------------------------------------
# attention_scores_grad: the backward's grad_scores, without grad_h

@pytest.mark.parametrize("backend", PAIR_BACKENDS)
@pytest.mark.parametrize("with_grad_attention", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "along_t"])
def test_scores_grad_equals_autograd(backend, with_grad_attention, layout):
    _require(backend)
    inputs = make_inputs(4, 9, 6, "empty_row", seed=31, dtype=torch.float64)
    h, scores = inputs.leaves()
    out = fused_attn_at.attention_pool(h, scores, inputs.mask, backend=backend)
    gen = torch.Generator().manual_seed(1)
    dc = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    da = torch.randn(4, 9, generator=gen, dtype=torch.float64) if with_grad_attention else None
    loss = (out.context * dc).sum() + ((out.attention * da).sum() if da is not None else 0)
    (expected,) = torch.autograd.grad(loss, scores)
    got = functional.attention_scores_grad(dc, _layout(h, layout), out.attention, da, backend=backend)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def _allocations(fn) -> list[int]:
    """The bytes of each allocation `fn` makes on the CPU (profiler memory records: the self memory of
    every op that allocated)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.name != "[memory]" and e.self_cpu_memory_usage > 0]


B, T, H = 3, 5, 7  # a [B, T, H] float64 tensor: 840 bytes, no other tensor here has that size


def _small():
    inputs = make_inputs(B, T, H, "padding", seed=2, dtype=torch.float64)
    attention = python_ref.masked_softmax(inputs.scores, inputs.mask)
    return inputs, attention, torch.randn(B, H, dtype=torch.float64)


@pytest.mark.parametrize("call", ["attention_scores_grad", "control: attention_pool_bwd"])
def test_scores_grad_writes_no_grad_h(call):
    """attention_scores_grad allocates nothing of size B*T*H (so it writes no dh); the control shows the
    detector sees the dh that the op's full backward allocates."""
    _require("cpu")
    inputs, attention, dc = _small()
    dh_bytes = B * T * H * inputs.h.element_size()
    if call == "attention_scores_grad":
        allocations = _allocations(lambda: functional.attention_scores_grad(dc, inputs.h, attention, backend="cpu"))
        assert all(n < dh_bytes for n in allocations), f"a [B, T, H]-sized allocation: {allocations}"
        assert B * T * 8 in allocations  # grad_scores: the detector does see the op's allocations
    else:
        allocations = _allocations(lambda: torch.ops.fused_attn_at.attention_pool_bwd(dc, None, inputs.h, attention))
        assert dh_bytes in allocations, allocations


def _step(path: str, kind: str, h, scores, mask, head, labels):
    step = training._pair_step if path == "pair" else training._two_op_step
    return step(h, scores, mask, head, lambda logits: torch.nn.functional.mse_loss(logits.squeeze(-1), labels), kind,
                EPS, 0.5, None, torch.Generator().manual_seed(0), "cpu")


@pytest.mark.parametrize("kind, two_op", [("at", (3, 1)), ("iat", (3, 1)), ("rp", (2, 1))])
def test_training_step_writes_grad_h_once(kind, two_op):
    """Forward and backward of the whole step, as (allocations of [B, T, H] bytes, [B, T, H] additions): the
    pair step allocates one (the dh it writes once) and adds none; the two-op step allocates three for at/iat
    (a dh thrown away while taking g, one dh per branch) and two for rp, and sums the branches' dh (autograd
    adds one into the other in place: a pass, no allocation). h is a leaf: its gradient is not copied."""
    _require("cpu")
    inputs, _, _ = _small()
    head = torch.nn.Linear(H, 1).double()
    labels = torch.randn(B, dtype=torch.float64)
    dh_bytes = B * T * H * 8
    counts = {}
    for path in ("pair", "two_op"):
        h, scores = inputs.leaves()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            _step(path, kind, h, scores, inputs.mask, head, labels).loss.backward()
        events = [e for e in prof.events() if e.name != "[memory]"]
        allocations = sum(e.self_cpu_memory_usage == dh_bytes for e in events)
        additions = sum(e.name in ("aten::add", "aten::add_") and list(e.input_shapes[0]) == [B, T, H] for e in events)
        counts[path] = (allocations, additions)
    assert counts == {"pair": (1, 0), "two_op": two_op}


# ---------------------------------------------------------------------------------------------------------
# opcheck and torch.compile

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mask", ["none", "empty_row"])
@pytest.mark.parametrize("kind", ["at", "iat"])
def test_opcheck_pair_fwd(dtype, mask, kind):
    _require("cpu")
    inputs = make_inputs(3, 6, 5, mask, seed=3, dtype=dtype)
    h, scores = inputs.leaves()
    torch.library.opcheck(torch.ops.fused_attn_at.attention_pool_pair_fwd,
                          (h, scores, inputs.mask, inputs.grad, KIND_CODE[kind], EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("with_grad_attention", [False, True])
def test_opcheck_pair_bwd_and_scores_grad(dtype, with_grad_attention):
    _require("cpu")
    inputs = make_inputs(3, 6, 5, "empty_row", seed=4, dtype=dtype)
    attention_clean = python_ref.masked_softmax(inputs.scores, inputs.mask)
    attention_adv = python_ref.masked_softmax(inputs.scores + inputs.grad, inputs.mask)
    gen = torch.Generator().manual_seed(0)
    dc_clean, dc_adv = torch.randn(3, 5, generator=gen).to(dtype), torch.randn(3, 5, generator=gen).to(dtype)
    da_clean = torch.randn(3, 6, generator=gen).to(dtype) if with_grad_attention else None
    da_adv = torch.randn(3, 6, generator=gen).to(dtype) if with_grad_attention else None
    for h in (inputs.h, _layout(inputs.h, "along_t")):
        torch.library.opcheck(torch.ops.fused_attn_at.attention_pool_pair_bwd,
                              (dc_clean, da_clean, dc_adv, da_adv, h, attention_clean, attention_adv))
        torch.library.opcheck(torch.ops.fused_attn_at.attention_scores_grad, (dc_clean, da_clean, h, attention_clean))


@pytest.mark.parametrize("backend, compiler", [("cpu", "inductor"), ("triton", "aot_eager")])
def test_compile_fullgraph_pair_and_scores_grad(backend, compiler):
    """The pair entry point and attention_scores_grad trace without a graph break; values and gradients
    equal eager. Triton with backend="aot_eager": under the interpreter its ops are opaque to the compiler
    (triton_attention_pool._define_op), which still traces them without a break."""
    _require(backend)
    inputs = make_inputs(4, 9, 6, "empty_row", seed=6, dtype=torch.float64)
    w = torch.linspace(-1, 1, 6, dtype=torch.float64)

    def step(h, scores, mask):
        clean = fused_attn_at.attention_pool(h, scores, mask, backend=backend)
        g = functional.attention_scores_grad(torch.tanh(clean.context) * w, h, clean.attention, backend=backend)
        pair = fused_attn_at.attention_pool_pair(h, scores, mask, perturbation="iat", grad=g, eps=0.5, backend=backend)
        return pair.clean.context, pair.clean.attention, pair.adversarial.context, pair.adversarial.attention

    compiled = torch.compile(step, backend=compiler, fullgraph=True, dynamic=False)
    results = []
    for fn in (step, compiled):
        h, scores = inputs.leaves()
        cc, ac, ca, aa = fn(h, scores, inputs.mask)
        loss = (cc * w).sum() + (ca ** 2).sum() + (ac * aa).sum()
        results.append((cc, ac, ca, aa, *torch.autograd.grad(loss, (h, scores))))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# checks, and backends without the pair

def test_pair_checks_its_inputs():
    _require("cpu")
    inputs = make_inputs(2, 4, 3, "padding", seed=1)
    with pytest.raises(ValueError, match=r"perturbation must be one of 'at', 'iat', 'rp' for attention_pool_pair"):
        fused_attn_at.attention_pool_pair(inputs.h, inputs.scores, inputs.mask, perturbation=None)
    with pytest.raises(ValueError, match=r"grad \(dL_clean/dscores, \[B, T\]\) is required"):
        fused_attn_at.attention_pool_pair(inputs.h, inputs.scores, inputs.mask, perturbation="at")
    with pytest.raises(ValueError, match=r"h \[B, T, H\] and scores \[B, T\] must agree"):
        fused_attn_at.attention_pool_pair(inputs.h[:, :3], inputs.scores, inputs.mask, perturbation="at",
                                          grad=inputs.grad)
    with pytest.raises(ValueError, match=r"grad holds NaN or inf at real"):
        fused_attn_at.attention_pool_pair(inputs.h, inputs.scores, None, perturbation="at",
                                          grad=torch.full_like(inputs.grad, float("nan")), backend="cpu")
    ops = torch.ops.fused_attn_at
    with pytest.raises(ValueError, match=r"kind must be 1 \(AT/RP: normalise direction\) or 2 \(iAT\) for the pair"):
        ops.attention_pool_pair_fwd(inputs.h, inputs.scores, inputs.mask, inputs.grad, 0, 1.0)
    attention = torch.softmax(inputs.scores, -1)
    dc = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"grad_context_adv must have shape \[B, H\] = \[2, 3\]"):
        ops.attention_pool_pair_bwd(dc, None, dc[:, :2], None, inputs.h, attention, attention)
    with pytest.raises(ValueError, match=r"attention_clean must have shape \[B, T\]"):
        ops.attention_pool_pair_bwd(dc, None, dc, None, inputs.h, attention[:, :3], attention)
    with pytest.raises(TypeError, match=r"attention_adv must have the dtype of attention_clean"):
        ops.attention_pool_pair_bwd(dc, None, dc, None, inputs.h, attention, attention.double())
    with pytest.raises(ValueError, match=r"grad_context must have shape \[B, H\] = \[2, 3\]"):
        functional.attention_scores_grad(dc[:, :2], inputs.h, attention)
    with pytest.raises(ValueError, match=r"grad_context must have shape \[B, H\] = \[2, 3\]"):
        ops.attention_scores_grad(dc[:, :2], None, inputs.h, attention)


def test_every_backend_has_the_pair_and_a_device_without_kernels_says_so():
    """Every backend offers the pair calls; a _C built without a device's pair kernels (here: this CPU build, for
    CUDA) raises NotImplementedError naming the device."""
    for backend in ("cpu", "cuda", "reference", "triton"):
        for what in ("attention_pool_pair", "attention_scores_grad"):
            module = functional._pair_module(backend, what)
            assert callable(getattr(module, what))
    _require("cpu")
    if "cuda" in cpp.PAIR_DEVICES:
        pytest.skip("this _C has the CUDA pair kernels")
    with pytest.raises(NotImplementedError, match=r"the pair ops .* have no cuda kernel in fused_attn_at._C yet"):
        cpp._require_pair(torch.device("cuda"))


@pytest.mark.parametrize("shape", [(1, 300, 256), (3, 63, 200)], ids=str)
def test_pair_and_scores_grad_are_bitwise_identical_across_thread_counts(shape):
    """As the op (README, Determinism): the split of rows into feature chunks depends on the shape only."""
    _require("cpu")
    B_, T_, H_ = shape
    inputs = make_inputs(B_, T_, H_, "padding", seed=7)
    gen = torch.Generator().manual_seed(5)
    cot = [torch.randn(B_, H_, generator=gen), torch.randn(B_, T_, generator=gen)] * 2
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 2):
            torch.set_num_threads(n)
            h, scores = inputs.leaves()
            outs = cpp.attention_pool_pair(h, scores, inputs.mask, inputs.grad, 1, EPS)
            grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot)), (h, scores))
            g = torch.ops.fused_attn_at.attention_scores_grad(cot[0], None, inputs.h, outs[1].detach())
            results.append([x.detach() for x in (*outs, *grads, g)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------
# Triton (under the interpreter on CPU): its kernels' own paths, registration, compile, flags, device guard

def _triton():
    _require("triton")
    from fused_attn_at.ops import triton_attention_pool as tri

    return tri


# T = 13 is four T blocks of 4 (the last one partial), H = 6 two H blocks of 4 (forward split over two programs,
# backward's T blocks split over two programs), B = 4 two blocks of 2 other rows for iAT.
TRITON_SMALL_BLOCKS = dict(block_t=4, block_h=4, block_j=2, split=2)


@pytest.mark.parametrize("layout", ["contiguous", "along_t"])
@pytest.mark.parametrize("kind", ["at", "iat", "rp"])
def test_triton_pair_block_loops_equal_two_single_ops(kind, layout):
    """Small blocks: both softmaxes online over several T blocks, both contexts over H blocks split over
    programs, the backward's T blocks split; padding holds NaN in the scores, one row fully masked."""
    tri = _triton()
    inputs = make_inputs(4, 13, 6, "empty_row", seed=17, dtype=torch.float64)
    inputs = dataclasses.replace(inputs, scores=inputs.scores.masked_fill(~inputs.mask, float("nan")))
    with tri.launch_overrides(**TRITON_SMALL_BLOCKS):
        pair, singles = _pair_vs_singles("triton", inputs, kind, layout)
        _assert_close(pair, singles, what=f"triton small blocks {kind} {layout}")
        for name, value in pair.items():
            assert torch.isfinite(value).all(), f"{name}: NaN of the padding leaked"
        attention = pair["attention_clean"]
        gen = torch.Generator().manual_seed(2)
        dc, da = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 13, generator=gen,
                                                                                     dtype=torch.float64)
        h = _layout(inputs.h, layout)
        for ga in (None, da):
            expected = torch.ops.fused_attn_at_triton.attention_pool_bwd(dc, ga, h, attention)[1]
            got = functional.attention_scores_grad(dc, h, attention, ga, backend="triton")
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_pair_low_precision_is_as_good_as_two_single_ops(dtype):
    _triton()
    inputs = make_inputs(3, 12, 8, "padding", seed=5, dtype=dtype)
    pair, singles = _pair_vs_singles("triton", inputs, "at")
    exact, _ = _pair_vs_singles("reference", inputs.to(torch.float64), "at")
    for name, value in exact.items():
        err_pair = float((pair[name].double() - value).abs().max() / value.abs().max())
        err_singles = float((singles[name].double() - value).abs().max() / value.abs().max())
        assert err_pair <= err_singles + 2 * torch.finfo(dtype).eps, f"{name}: {err_pair:.3g} vs {err_singles:.3g}"


def test_triton_pair_gradcheck():
    """Numerical first derivatives through the Triton pair (its second derivatives: the double-backward test
    above; gradgradcheck under the interpreter costs half a minute)."""
    tri = _triton()
    inputs = make_inputs(2, 5, 3, "padding", seed=4, dtype=torch.float64)

    def f(h, scores):
        return tri.attention_pool_pair(h, scores, inputs.mask, inputs.grad, 1, EPS)

    h, scores = inputs.leaves()
    assert torch.autograd.gradcheck(f, (h, scores))


TRITON_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")  # as tests/test_triton.py


@pytest.mark.parametrize("kind", ["at", "iat"])
def test_triton_opcheck(kind):
    _triton()
    ops = torch.ops.fused_attn_at_triton
    inputs = make_inputs(3, 6, 5, "empty_row", seed=3, dtype=torch.float64)
    h, scores = inputs.leaves()
    torch.library.opcheck(ops.attention_pool_pair_fwd, (h, scores, inputs.mask, inputs.grad, KIND_CODE[kind], EPS),
                          test_utils=TRITON_OPCHECK_UTILS)
    attention_clean = python_ref.masked_softmax(inputs.scores, inputs.mask)
    attention_adv = python_ref.masked_softmax(inputs.scores + inputs.grad, inputs.mask)
    gen = torch.Generator().manual_seed(0)
    dc_clean, dc_adv = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen,
                                                                                           dtype=torch.float64)
    da = torch.randn(3, 6, generator=gen, dtype=torch.float64) if kind == "iat" else None
    torch.library.opcheck(ops.attention_pool_pair_bwd,
                          (dc_clean, da, dc_adv, da, inputs.h, attention_clean, attention_adv),
                          test_utils=TRITON_OPCHECK_UTILS)
    torch.library.opcheck(ops.attention_scores_grad, (dc_clean, da, inputs.h, attention_clean),
                          test_utils=TRITON_OPCHECK_UTILS)




@pytest.mark.parametrize("kind, which", [("at", "scores"), ("at", "grad"), ("rp", "noise"), ("iat", "grad")])
def test_triton_pair_rejects_nonfinite_real_values(kind, which):
    """The pair forward's kernels flag NaN/inf at real positions as the single op's do (ValueError on CPU
    tensors, naming the argument); at padded positions they are never read."""
    _triton()
    inputs = make_inputs(3, 6, 4, "padding", seed=9)
    direction = _direction(inputs, kind)
    scores = inputs.scores.clone()
    target = scores if which == "scores" else direction[which].clone()
    if which != "scores":
        direction[which] = target
    target[0, 0] = float("nan")  # position 0 is real in every row
    with pytest.raises(ValueError, match=rf"{which} holds NaN or inf at real"):
        fused_attn_at.attention_pool_pair(inputs.h, scores, inputs.mask, perturbation=kind, backend="triton",
                                          **direction)
    padded = ~inputs.mask
    target[0, 0] = 1.0
    target.masked_fill_(padded, float("inf"))
    out = fused_attn_at.attention_pool_pair(inputs.h, scores, inputs.mask, perturbation=kind, backend="triton",
                                            **direction)
    assert all(torch.isfinite(x).all() for x in (*out.clean, *out.adversarial))


def test_triton_pair_launches_enter_the_tensors_device(monkeypatch):
    tri = _triton()
    entered = []
    real_guard = tri._device_guard
    monkeypatch.setattr(tri, "_device_guard", lambda device: entered.append(device) or real_guard(device))
    inputs = make_inputs(3, 6, 4, "padding", seed=40)
    h, scores = inputs.leaves()
    pair = fused_attn_at.attention_pool_pair(h, scores, inputs.mask, perturbation="at", grad=inputs.grad,
                                             backend="triton")
    (pair.clean.context.sum() + pair.adversarial.context.sum()).backward()
    functional.attention_scores_grad(torch.ones(3, 4), inputs.h, pair.clean.attention.detach(), backend="triton")
    assert entered == [torch.device("cpu")] * 3  # pair forward, pair backward, scores grad


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3), (2, 5, 0)], ids=str)
def test_triton_pair_zero_sizes(shape):
    _triton()
    inputs = make_inputs(*shape, "none", seed=1, dtype=torch.float64)
    pair, singles = _pair_vs_singles("triton", inputs, "at")
    _assert_close(pair, singles, what=f"triton {shape}")
