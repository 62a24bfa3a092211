"""The "cpu" backend of fused_attn_at.perturbed_attention (flash-style C++ kernels, csrc/self_attention/) against
the reference with materialised maps (python_ref), in float64: values and gradients for none/AT/iAT/RP, padding,
fully masked rows, causal, bias (broadcast, -inf entries, learnable), attn_mask, Tq != Tk, B = 1, odd sizes
crossing the 64-query and 512-key block edges; the AT step through a CleanPassRecord (G recomputed from the clean
pass's saved tensors) and through SelfAttentionAT; gradcheck with r held fixed; opcheck of every op;
torch.compile(fullgraph=True); a memory trace: at T = 2048 the AT step allocates nothing of B*nh*T*T; and
hypothesis fuzzing (random sizes, layouts, masks, causal, bias, kinds, eps and dropout against the reference)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

import fused_attn_at
import python_ref
import _self_attention_cases as cases
from _self_attention_cases import F64
from _self_attention_cases import leaves as _leaves
from _self_attention_cases import map_shape as _map_shape
from _self_attention_cases import t as _t
from fused_attn_at.ops import cpp_self_attention as cpu_sa

pytestmark = pytest.mark.skipif(not cpu_sa.AVAILABLE, reason=f"cpu backend: {cpu_sa.UNAVAILABLE_REASON}")

# name: B, nh, Tq, Tk, d, dv, key-mask pattern, causal, bias shape (None = no bias), attn_mask
CASES = {
    "padding": (2, 2, 67, 67, 8, 5, "pad", False, None, False),
    "causal_bias": (2, 2, 70, 70, 4, 4, None, True, (1, 2), False),
    "cross_fullymasked_bias_inf": (2, 3, 5, 133, 6, 3, "empty", False, (2, 1), False),
    "b1_causal_pad": (1, 1, 129, 129, 3, 7, "pad", True, (1, 1), False),
    "attn_mask_rows": (2, 2, 9, 130, 4, 4, "pad", False, None, True),
    "tq_gt_tk_causal": (2, 1, 131, 66, 5, 2, "pad", True, (2, 1), False),
    # past the kernels' 512-key block: the online softmax's rescaling, the backward and G's rebuild across blocks
    "keys_cross_512_block": (2, 2, 7, 1030, 3, 2, "pad", False, (2, 1), False),
    "causal_cross_512_block": (1, 1, 520, 520, 2, 3, "pad", True, None, False),
}


def make_case(name, seed=0):
    return cases.make_case(CASES, name, seed)


def _compare(out, ref, args, kw, atol=1e-10):
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-9)
    leaves = _leaves(args, kw)
    w = _t(*out.shape, seed=99)
    g1 = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    g2 = torch.autograd.grad((ref * w).sum(), leaves, allow_unused=True)
    for a, b in zip(g1, g2):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind,norm", [(None, "example"), ("at", "example"), ("at", "row"), ("rp", "example"),
                                       ("rp", "row"), ("iat", "example"), ("iat", "row")])
def test_values_and_gradients_vs_reference(name, kind, norm):
    args, kw = make_case(name)
    if kind == "iat" and args[0].shape[0] == 1:  # no other example: r = 0, said by a warning (kernel and reference)
        with pytest.warns(UserWarning, match="iAT perturbation with a batch of one"):
            out, ref = cases.values_vs_reference(args, kw, kind, norm, "cpu")
    else:
        out, ref = cases.values_vs_reference(args, kw, kind, norm, "cpu")
    _compare(out, ref, args, kw)


def test_default_backend_for_cpu_tensors_is_cpu(monkeypatch):
    monkeypatch.delenv("FUSED_ATTN_AT_BACKEND", raising=False)
    args, kw = make_case("padding")
    calls = []
    real = cpu_sa._ops.sa_fwd

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.fused_attn_at, name)

        def sa_fwd(self, *a):
            calls.append(1)
            return real(*a)

    monkeypatch.setattr(cpu_sa, "_ops", Spy())
    fused_attn_at.perturbed_attention(*args, **kw)
    assert calls
    monkeypatch.setenv("FUSED_ATTN_AT_BACKEND", "reference")  # the environment picks the self-attention backend
    fused_attn_at.perturbed_attention(*args, **kw)
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["padding", "cross_fullymasked_bias_inf", "b1_causal_pad"])
@pytest.mark.parametrize("norm", ["example", "row"])
def test_rp_hashed_noise_equals_reference_fed_the_same_noise(name, norm):
    """RP without a noise tensor: the kernels hash standard normal numbers from a seed drawn from `generator`;
    the reference given those numbers (sa_rp_noise materialises them) gives the same values and gradients."""
    args, kw = make_case(name)
    out, ref = cases.rp_seeded_vs_reference(args, kw, "cpu", cpu_sa.rp_noise, norm=norm)
    _compare(out, ref, args, kw)


def test_rp_hashed_noise_is_standard_normal_and_seeded():
    q, k = torch.zeros(2, 3, 100, 1), torch.zeros(2, 3, 200, 1)
    z = cpu_sa.rp_noise(q.double(), k.double(), 12345)
    assert z.shape == (2, 3, 100, 200)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert abs((z ** 4).mean().item() - 3) < 0.1  # Gaussian kurtosis
    assert torch.equal(z, cpu_sa.rp_noise(q.double(), k.double(), 12345))
    assert not torch.equal(z, cpu_sa.rp_noise(q.double(), k.double(), 12346))
    # different seeds from the generator: different r; the same generator state: the same r
    args, kw = make_case("padding")
    o1 = fused_attn_at.perturbed_attention(*args, perturbation="rp", generator=torch.Generator().manual_seed(1))
    o2 = fused_attn_at.perturbed_attention(*args, perturbation="rp", generator=torch.Generator().manual_seed(1))
    o3 = fused_attn_at.perturbed_attention(*args, perturbation="rp", generator=torch.Generator().manual_seed(2))
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)


# ---------------------------------------------------------------------------------------------------------
# float32: the row kernels' AVX2 build (and the portable one) against the float64 reference


def _to32(args, kw):
    q, k, v, m = args
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    kw32 = dict(kw)
    if kw.get("bias") is not None:
        kw32["bias"] = kw["bias"].detach().float().requires_grad_(True)
    return (q32, k32, v32, m), kw32


@pytest.mark.parametrize("isa", ["avx2", "default"])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind", [None, "at", "rp", "at_record"])
def test_float32_matches_float64_reference(monkeypatch, isa, name, kind):
    if isa == "default":
        monkeypatch.setenv("FUSED_ATTN_AT_CPU_ISA", "default")
    else:
        monkeypatch.delenv("FUSED_ATTN_AT_CPU_ISA", raising=False)
    args, kw = make_case(name)
    args32, kw32 = _to32(args, kw)
    w = _t(args[0].shape[0], args[0].shape[1], args[0].shape[2], args[2].shape[3], seed=31)
    results = []
    for a, k_, backend in ((args32, kw32, "cpu"), (args, kw, "reference")):
        if kind == "at_record":
            results.append(_clean_then_adv(a, k_, backend, "example", w.to(a[0].dtype)))
            continue
        extra = dict(perturbation=kind, eps=1.7)
        if kind == "at":
            extra["grad"] = _t(*_map_shape(args), seed=7).to(a[0].dtype)
        if kind == "rp":
            extra["noise"] = _t(*_map_shape(args), seed=8).to(a[0].dtype)
        out = fused_attn_at.perturbed_attention(*a, **k_, **extra, backend=backend)
        leaves = _leaves(a, k_)
        grads = torch.autograd.grad((out * w.to(out.dtype)).sum(), leaves, allow_unused=True)
        results.append((out, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]))
    (o32, g32), (o64, g64) = results
    torch.testing.assert_close(o32.double(), o64, atol=2e-5, rtol=1e-4)
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_float32_strided_inputs_and_nan_check(monkeypatch, isa):
    """q, k, v as heads split off a fused [B, T, 3, nh, d] projection (read in place, no copies) give what
    contiguous inputs give; a NaN score is caught in float32 too."""
    if isa == "default":
        monkeypatch.setenv("FUSED_ATTN_AT_CPU_ISA", "default")
    else:
        monkeypatch.delenv("FUSED_ATTN_AT_CPU_ISA", raising=False)
    B, T, nh, d = 2, 150, 3, 16
    qkv = torch.randn(B, T, 3, nh, d, generator=torch.Generator().manual_seed(3), requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 100:] = False
    out = fused_attn_at.perturbed_attention(q, k, v, mask, backend="cpu")
    qc, kc, vc = (x.detach().contiguous().requires_grad_(True) for x in (q, k, v))
    ref = fused_attn_at.perturbed_attention(qc, kc, vc, mask, backend="cpu")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    g = torch.autograd.grad((out * w).sum(), qkv)[0].permute(2, 0, 3, 1, 4)
    gref = torch.autograd.grad((ref * w).sum(), (qc, kc, vc))
    for a, b in zip(g, gref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    bad = qc.detach().clone()
    bad[1, 2, 140, 3] = math.nan  # a padded query row of example 1 still scores its allowed keys
    with pytest.raises(ValueError, match=r"scores \(scale \* q k\^T \+ bias\) holds NaN or inf"):
        fused_attn_at.perturbed_attention(bad, kc, vc, mask, backend="cpu")


# ---------------------------------------------------------------------------------------------------------
# AT through a CleanPassRecord: G recomputed block by block from the clean pass


def _clean_then_adv(args, kw, backend, norm, clean_loss_w):
    """(out_adv, grads of L_clean + L_adv wrt the leaves): _self_attention_cases.clean_then_adv without the
    record."""
    adv, grads, _ = cases.clean_then_adv(args, kw, backend, norm, clean_loss_w)
    return adv, grads


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("norm", ["example", "row"])
def test_at_through_record_matches_reference(name, norm):
    args, kw = make_case(name)
    w = _t(args[0].shape[0], args[0].shape[1], args[0].shape[2], args[2].shape[3], seed=31)
    adv1, g1 = _clean_then_adv(args, kw, "cpu", norm, w)
    adv2, g2 = _clean_then_adv(args, kw, "reference", norm, w)
    torch.testing.assert_close(adv1, adv2, atol=1e-10, rtol=1e-9)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_record_filled_by_cpu_materialises_g_for_the_reference():
    args, kw = make_case("causal_bias")
    w = _t(2, 2, 70, 4, seed=31)
    rec_cpu, rec_ref = fused_attn_at.CleanPassRecord(), fused_attn_at.CleanPassRecord()
    for rec, backend in ((rec_cpu, "cpu"), (rec_ref, "reference")):
        out = fused_attn_at.perturbed_attention(*args, **kw, record=rec, backend=backend)
        (out * w).sum().backward()
        rec.mark_backward_done()
    assert rec_cpu.grad is None and rec_cpu.fused is not None
    torch.testing.assert_close(rec_cpu.gradient(), rec_ref.gradient(), atol=1e-12, rtol=1e-10)
    # a record of either backend feeds an adversarial call of the other
    a = fused_attn_at.perturbed_attention(*args, **kw, perturbation="at", grad=rec_cpu, backend="reference")
    b = fused_attn_at.perturbed_attention(*args, **kw, perturbation="at", grad=rec_ref, backend="cpu")
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_record_errors_and_zero_gradient():
    args, _ = make_case("padding")
    cases.check_record_errors_and_zero_gradient(args, "cpu", lambda a: (a[0][:, :1], a[1][:, :1], a[2][:, :1], a[3]))


def test_record_two_backwards_accumulate_g():
    args, kw = make_case("padding")
    w1, w2 = _t(2, 2, 67, 5, seed=1), _t(2, 2, 67, 5, seed=2)
    outs = []
    for backend in ("cpu", "reference"):
        rec = fused_attn_at.CleanPassRecord()
        clean = fused_attn_at.perturbed_attention(*args, record=rec, backend=backend)
        (clean * w1).sum().backward(retain_graph=True)
        (clean * w2).sum().backward()
        rec.mark_backward_done()
        outs.append(fused_attn_at.perturbed_attention(*args, perturbation="at", grad=rec, backend=backend))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# The whole-model step


class TinyAttention(torch.nn.Module):
    def __init__(self, dim, nh, causal, backend):
        super().__init__()
        self.nh, self.causal, self.backend = nh, causal, backend
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.nh, D // self.nh).permute(2, 0, 3, 1, 4)
        o = fused_attn_at.perturbed_attention(q, k, v, mask, causal=self.causal, layer=self, backend=self.backend)
        return x + self.out(o.transpose(1, 2).reshape(B, T, D))


class TinyModel(torch.nn.Module):
    def __init__(self, dim=8, nh=2, layers=2, causal=False, backend=None):
        super().__init__()
        self.layers = torch.nn.ModuleList(TinyAttention(dim, nh, causal, backend) for _ in range(layers))
        self.head = torch.nn.Linear(dim, 3)

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x[:, 0])

    def set_backend(self, backend):
        for layer in self.layers:
            layer.backend = backend


@pytest.mark.parametrize("perturbation", ["at", "rp", "iat"])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_at_step_cpu_equals_reference(perturbation, causal):
    torch.manual_seed(0)
    model = TinyModel(causal=causal).double()
    x = torch.randn(3, 70, 8, dtype=F64)
    mask = torch.ones(3, 70, dtype=torch.bool)
    mask[1, 50:] = False
    y = torch.tensor([0, 2, 1])
    results = []
    for backend in ("cpu", "reference"):
        model.set_backend(backend)
        model.zero_grad()
        gen = torch.Generator().manual_seed(5)
        if perturbation == "rp" and backend == "reference":
            # the reference is fed the kernels' hashed noise for the same seeds, in call order
            seeds = [int(torch.randint(0, 2**62, (1,), generator=gen).item()) for _ in range(2)]
            noises = iter(cpu_sa.rp_noise(torch.zeros(3, 2, 70, 1, dtype=F64), torch.zeros(3, 2, 70, 1, dtype=F64),
                                          s) for s in seeds)
            real = fused_attn_at.self_attention._perturbed_attention

            def with_noise(*a, **kw):
                if kw.get("perturbation") == "rp":
                    kw = {**kw, "noise": next(noises), "generator": None}
                return real(*a, **kw)

            fused_attn_at.self_attention._perturbed_attention = with_noise
        try:
            at = fused_attn_at.SelfAttentionAT(model, perturbation, eps=0.7, generator=gen)
            step = at.step(lambda: torch.nn.functional.cross_entropy(model(x, mask), y))
        finally:
            if perturbation == "rp" and backend == "reference":
                fused_attn_at.self_attention._perturbed_attention = real
        results.append((step.loss, [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-10, rtol=1e-9)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# gradcheck (r held fixed: G, the noise or the seed, and the clean pass are constants), opcheck, compile


@pytest.mark.parametrize("kind", [None, "at", "rp_noise", "rp_seed", "at_record"])
@pytest.mark.parametrize("size", ["small", "block_edges", "key_blocks"])
def test_gradcheck(kind, size):
    # block_edges crosses the 64-query block, key_blocks the 512-key block (fast mode: a random projection of the
    # Jacobian)
    B, nh, Tq, Tk, d = {"small": (2, 2, 5, 7, 3), "block_edges": (2, 1, 66, 130, 2), "key_blocks": (1, 1, 5, 515, 2)}[size]
    q, k, v, key_mask, attn_mask, bias = cases.gradcheck_inputs(B, nh, Tq, Tk, d)
    kw = dict(causal=True, attn_mask=attn_mask, query_mask=torch.ones(B, Tq, dtype=torch.bool), eps=0.8)
    if kind == "at":
        kw.update(perturbation="at", grad=_t(B, nh, Tq, Tk, seed=5))
    elif kind == "rp_noise":
        kw.update(perturbation="rp", noise=_t(B, nh, Tq, Tk, seed=6))
    elif kind == "at_record":
        rec = fused_attn_at.CleanPassRecord()
        with torch.enable_grad():
            cq, ck, cv, cb = (x.detach().clone().requires_grad_(True) for x in (q, k, v, bias))
            out = fused_attn_at.perturbed_attention(cq, ck, cv, key_mask, **{**kw, "eps": 1.0}, bias=cb, record=rec,
                                                    backend="cpu")
            (out * _t(*out.shape, seed=7)).sum().backward()
        rec.mark_backward_done()
        kw.update(perturbation="at", grad=rec)

    def f(q, k, v, bias):
        extra = {}
        if kind == "rp_seed":
            extra = dict(perturbation="rp", generator=torch.Generator().manual_seed(11))
        return fused_attn_at.perturbed_attention(q, k, v, key_mask, **{**kw, "bias": bias}, **extra, backend="cpu")

    inputs = (q, k, v, bias) if size == "small" else (q, k, v, bias.detach())
    assert torch.autograd.gradcheck(f, inputs, atol=1e-7, fast_mode=size != "small")


def _op_args(kind, dtype=F64):
    return cases.op_args(torch.ops.fused_attn_at, 2, kind, dtype)


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_opcheck_sa_fwd(kind, dtype):
    q, k, v, key_mask, bias, coef, dense, clean = _op_args(kind, dtype)
    for x in (q, k, v, bias):
        x.requires_grad_(True)
    torch.library.opcheck(torch.ops.fused_attn_at.sa_fwd,
                          (q, k, v, key_mask, bias, True, 0.5, kind, coef, dense, 1234, *clean))


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_opcheck_sa_bwd_rowsq_noise(kind):
    q, k, v, key_mask, bias, coef, dense, clean = _op_args(kind)
    out, lse = torch.ops.fused_attn_at.sa_fwd(q, k, v, key_mask, bias, False, 0.5, kind, coef, dense, 9, *clean)
    dout = _t(*out.shape, seed=12)
    for bias_grad in (False, True):
        torch.library.opcheck(torch.ops.fused_attn_at.sa_bwd, (dout, q, k, v, out, lse, key_mask, bias, False, 0.5,
                                                               bias_grad, kind, coef, dense, 9, *clean))
    torch.library.opcheck(torch.ops.fused_attn_at.sa_rowsq, (q, k, key_mask, bias, True, dense, 9))
    torch.library.opcheck(torch.ops.fused_attn_at.sa_rp_noise, (q, k, 9))


@pytest.mark.parametrize("kind", [None, "at", "iat"])
def test_compile_fullgraph_matches_eager(kind):
    args, kw = make_case("causal_bias")
    out, ref = cases.compiled_and_eager(args, kw, kind, "cpu")
    _compare(out, ref, args, kw)


@pytest.mark.parametrize("extra", [dict(dropout_p=0.3), dict(perturbation="rp", eps=0.5)])
def test_compile_fullgraph_with_drawn_seeds_runs_the_reference(extra):
    """Under torch.compile a call that would draw a kernel seed (dropout_p > 0, RP without noise) runs the
    reference (its random numbers are traceable; the kernels' seed would be a traced host value): fullgraph
    compiles, the output and gradients are finite and show the randomness (the output differs from the eager call
    without it)."""
    args, kw = make_case("padding")
    q, k, v, m = args

    def f(q, k, v):
        return fused_attn_at.perturbed_attention(q, k, v, m, backend="cpu", **extra)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out - fused_attn_at.perturbed_attention(q, k, v, m, backend="cpu")).abs().max() > 1e-3


def test_half_precision_runs_in_float32():
    args, kw = make_case("padding")
    q, k, v, m = (x.detach().to(torch.bfloat16) if x.dtype == F64 else x for x in args)
    q.requires_grad_(True)
    out = fused_attn_at.perturbed_attention(q, k, v, m, perturbation="at", grad=_t(2, 2, 67, 67, seed=3),
                                            backend="cpu")
    assert out.dtype == torch.bfloat16
    ref = python_ref.perturbed_attention(q.float(), k.float(), v.float(), m, perturbation="at",
                                         grad=_t(2, 2, 67, 67, seed=3).float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16


def test_errors_and_what_runs_the_reference():
    args, _ = make_case("padding")
    cases.check_errors_and_what_runs_the_reference(args, "cpu")


# ---------------------------------------------------------------------------------------------------------
# Memory: no tensor of B * nh * T * T elements during the AT step at T = 2048


def _largest_tensors(backend, perturbation, B, T, D, nh):
    """(the most bytes any one op allocated for itself, the most elements of any op's input) over one
    SelfAttentionAT step; the profiler sees every ATen op, the kernels' block matmuls on worker threads included."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = TinyModel(dim=D, nh=nh, layers=1, causal=True, backend=backend)
    x = torch.randn(B, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - 48:] = False
    y = torch.tensor([1] * B)
    at = fused_attn_at.SelfAttentionAT(model, perturbation, eps=1.0, generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        step = at.step(lambda: torch.nn.functional.cross_entropy(model(x, mask), y))
    assert torch.isfinite(step.loss)
    return cases.largest_sizes(prof)


@pytest.mark.parametrize("perturbation", ["at", "rp"])
def test_memory_at_step_allocates_no_map(perturbation):
    B, T, D, nh = 1, 2048, 16, 1
    map_numel = B * nh * T * T
    cases.assert_no_map(*_largest_tensors("cpu", perturbation, B, T, D, nh), map_numel)
    if perturbation == "at":  # the measurement sees the maps where they exist
        allocated, numel = _largest_tensors("reference", perturbation, B, T, D, nh)
        assert allocated >= map_numel * 4 and numel >= map_numel


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("norm", ["example", "row"])
def test_iat_in_chunks_of_examples_matches_reference(monkeypatch, chunk, norm):
    """The differences D_ij formed for `chunk` examples i at a time (5 = 2 + 2 + 1: a short last chunk)."""
    from fused_attn_at.ops import self_attention_iat

    B, nh, T, d = 5, 2, 9, 4
    monkeypatch.setattr(self_attention_iat, "CHUNK_BYTES", chunk * B * nh * T * T * 8)
    q, k, v = (_t(B, nh, T, d, seed=s, grad=True) for s in (1, 2, 3))
    key_mask = torch.arange(T)[None, :] < torch.tensor([9, 7, 0, 9, 3])[:, None]  # example 2 fully masked
    grad = _t(B, nh, T, T, seed=4)
    out = fused_attn_at.perturbed_attention(q, k, v, key_mask, perturbation="iat", grad=grad, eps=2.0, norm=norm,
                                            backend="cpu")
    ref = python_ref.perturbed_attention(q, k, v, key_mask, perturbation="iat", grad=grad, eps=2.0, norm=norm)
    _compare(out, ref, ((q, k, v, key_mask)), dict(bias=None))
    assert (out - python_ref.perturbed_attention(q, k, v, key_mask)).abs().max() > 1e-3  # r is not zero


def test_memory_iat_step_holds_maps_not_batch_squared_differences(monkeypatch):
    """iAT on the cpu backend materialises a few [B, nh, T, T] maps (S, G, u) and the differences of a chunk of
    examples at a time (here one: CHUNK_BYTES below one map), never the reference's [B, B, nh*T*T]."""
    from fused_attn_at.ops import self_attention_iat

    B, T, D, nh = 4, 256, 16, 1
    map_bytes = B * nh * T * T * 4
    monkeypatch.setattr(self_attention_iat, "CHUNK_BYTES", 1)
    allocated, _ = _largest_tensors("cpu", "iat", B, T, D, nh)
    assert allocated <= map_bytes, f"an op allocated {allocated} bytes (one map is {map_bytes})"
    allocated, _ = _largest_tensors("reference", "iat", B, T, D, nh)  # the measurement sees the differences
    assert allocated >= B * map_bytes


# ------------------------------------------------------------------------------------------ fused dropout

def test_dropout_mask_is_seeded_and_has_the_dropout_distribution():
    m = cases.check_dropout_mask(cpu_sa.dropout_mask, F64)
    z = cpu_sa.rp_noise(torch.zeros(2, 3, 67, 1, dtype=F64), torch.zeros(2, 3, 300, 1, dtype=F64), 2**40 + 7)
    assert abs(torch.corrcoef(torch.stack([z.flatten(), m.flatten()]))[0, 1].item()) < 0.015


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind", [None, "rp"])
def test_dropout_values_and_gradients_vs_reference_given_the_mask(name, kind):
    """With dropout_p > 0 the cpu kernels hash the mask; the reference fed that mask (sa_dropout_mask) gives the
    same values and gradients. RP draws its seed after the dropout's from the same generator."""
    args, kw = make_case(name)
    out, ref = cases.dropout_vs_reference(args, kw, "cpu", cpu_sa.dropout_mask,
                                          cpu_sa.rp_noise if kind == "rp" else None)
    _compare(out, ref, args, kw)


@pytest.mark.parametrize("name", ["padding", "causal_bias", "cross_fullymasked_bias_inf"])
@pytest.mark.parametrize("same_mask", [True, False])
def test_dropout_at_step_recomputes_g_with_the_clean_mask(name, same_mask):
    args, kw = make_case(name)
    cases.dropout_at_step(args, kw, "cpu", cpu_sa.dropout_mask, same_mask)


def test_dropout_gradcheck_and_opcheck():
    """The op with a fixed dropout seed is a deterministic function: gradcheck in fp64; opcheck of sa_fwd/sa_bwd
    with the dropout arguments and of sa_dropout_mask."""
    args, kw = make_case("padding")
    q, k, v, m = (x[:1, :1, :9].detach().clone().requires_grad_(x.requires_grad) if x.dim() == 4 else x[:1, :9]
                  for x in args)

    def f(q, k, v):
        torch.manual_seed(5)  # the same mask at every call
        return fused_attn_at.perturbed_attention(q, k, v, m, dropout_p=0.4, backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, v))
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    torch.library.opcheck(torch.ops.fused_attn_at.sa_fwd,
                          (qd, kd, vd, m, None, False, 0.5, 0, None, None, 0) + (None,) * 7 + (0.4, 123, 0.0, 0))
    out, lse = torch.ops.fused_attn_at.sa_fwd(qd, kd, vd, m, None, False, 0.5, 0, None, None, 0, *(None,) * 7,
                                              0.4, 123, 0.0, 0)
    torch.library.opcheck(torch.ops.fused_attn_at.sa_bwd,
                          (torch.ones_like(out), qd, kd, vd, out, lse, m, None, False, 0.5, False, 0, None, None, 0)
                          + (None,) * 7 + (0.4, 123, 0.0, 0))
    torch.library.opcheck(torch.ops.fused_attn_at.sa_dropout_mask, (qd, kd, 0.4, 123))
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1"):
        torch.ops.fused_attn_at.sa_fwd(qd, kd, vd, m, None, False, 0.5, 0, None, None, 0, *(None,) * 7, 1.0, 1,
                                       0.0, 0)


def test_dropout_float32_row_kernels_keep_the_masks_entries():
    """float32 runs the selected row kernels (AVX2 where the CPU has it): their dropout keeps exactly the entries of
    sa_dropout_mask (built by the portable kernel), so the output matches the reference fed that mask to fp32
    rounding, on rows whose key count is not a multiple of 8 and blocks past 512 keys."""
    args, _ = make_case("cross_fullymasked_bias_inf")  # Tk = 133
    short = (args[0].float().detach(), *(torch.cat([x, x.flip(2)], 2).float().detach() for x in args[1:3]))  # 266
    long = tuple(torch.randn(*shape, generator=torch.Generator().manual_seed(i))
                 for i, shape in enumerate([(1, 1, 70, 4), (1, 1, 1037, 4), (1, 1, 1037, 3)]))
    for (q, k, v), p, seed in ((short, 0.3, 8), (long, 0.5, 9)):
        torch.manual_seed(seed)
        out = fused_attn_at.perturbed_attention(q, k, v, dropout_p=p, backend="cpu")
        mask = cpu_sa.dropout_mask(q, k, p, cases.drawn_seed(seed))
        ref = python_ref.perturbed_attention(q.double(), k.double(), v.double(), dropout_p=p,
                                             dropout_mask=mask.double())
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------
# Property test (hypothesis): random calls against the reference


@pytest.mark.parametrize("kind", cases.FUZZ_KINDS)
def test_random_calls_match_reference(kind):
    @settings(max_examples=12, deadline=None, derandomize=True, database=None)
    @given(case=cases.sa_cases(kind))
    def check(case):
        cases.fuzz_vs_reference(case, "cpu", cpu_sa.dropout_mask, cpu_sa.rp_noise)

    check()


def test_mask_noise_and_rowsq_ops_are_not_differentiable():
    cases.check_not_differentiable(torch.ops.fused_attn_at)


# ------------------------------------------------------------------------------------------ iAT through records


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clean_backend,adv_backend", [("cpu", "reference"), ("reference", "cpu"), ("cpu", "cpu")])
def test_iat_record_across_backends_in_half_precision(dtype, clean_backend, adv_backend):
    """A record filled by one backend serves the other's iAT call (the fused record's S is float32: the reference
    casts it to the call's dtype); all pairs give the fp64 reference's values within half precision."""
    args, kw = make_case("padding")
    w = _t(*args[0].shape[:3], args[2].shape[3], seed=31)
    ref, _, _ = cases.clean_then_adv(args, kw, "reference", "example", w, "iat", eps=8.0)
    low = tuple(x.detach().to(dtype).requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point()
                else x for x in args)
    rec = fused_attn_at.CleanPassRecord(keep_scores=True)
    clean = fused_attn_at.perturbed_attention(*low, **kw, record=rec, backend=clean_backend)
    (clean.double() * w).sum().backward()
    rec.mark_backward_done()
    adv = fused_attn_at.perturbed_attention(*low, **kw, perturbation="iat", grad=rec, eps=8.0, backend=adv_backend)
    assert adv.dtype == dtype
    torch.testing.assert_close(adv.double(), ref.detach(), atol=3e-2, rtol=3e-2)
    assert (ref - python_ref.perturbed_attention(*args, **kw)).abs().max() > 0.1  # r matters at this tolerance


@pytest.mark.parametrize("clean_backend,adv_backend", [("cpu", "cpu"), ("cpu", "reference"), ("reference", "cpu"),
                                                       ("reference", "reference")])
def test_iat_record_of_a_call_the_clean_loss_does_not_reach_gives_r_zero(clean_backend, adv_backend):
    """A frozen layer (no input requires grad) or one the clean loss does not use: G = 0, so r = 0 and the
    adversarial call returns the clean output, as AT does (no request for the clean scores)."""
    args, kw = make_case("padding")
    frozen = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args)
    rec = fused_attn_at.CleanPassRecord(keep_scores=True)
    fused_attn_at.perturbed_attention(*frozen, **kw, record=rec, backend=clean_backend)
    rec.mark_backward_done()
    adv = fused_attn_at.perturbed_attention(*frozen, **kw, perturbation="iat", grad=rec, backend=adv_backend)
    torch.testing.assert_close(adv, fused_attn_at.perturbed_attention(*frozen, **kw, backend="reference"),
                               atol=1e-12, rtol=1e-10)


def test_iat_memory_limit_is_checked_before_any_map(monkeypatch):
    args, kw = make_case("padding")
    w = _t(*args[0].shape[:3], args[2].shape[3], seed=31)
    rec = fused_attn_at.CleanPassRecord(keep_scores=True)
    (fused_attn_at.perturbed_attention(*args, **kw, record=rec, backend="cpu") * w).sum().backward()
    rec.mark_backward_done()

    def materialises(self):
        raise AssertionError("a map was materialised before the memory check")

    monkeypatch.setattr(cpu_sa.FusedCleanPass, "grad_map", materialises)
    monkeypatch.setattr(cpu_sa.FusedCleanPass, "scores", materialises)
    with pytest.raises(MemoryError, match="FUSED_ATTN_AT_IAT_MAX_BYTES"):
        fused_attn_at.perturbed_attention(*args, **kw, perturbation="iat", grad=rec, backend="cpu", iat_max_bytes=1)


def test_iat_memory_limit_defaults_to_2_gib_and_reads_the_environment(monkeypatch):
    """The fused backends' iAT limit: 2 GiB unless FUSED_ATTN_AT_IAT_MAX_BYTES (or iat_max_bytes=) says
    otherwise. check_iat_memory sizes S, G, u, one example's differences (float32 here) and their bool masks:
    (4 * 4 + 2) bytes per map entry; nothing is allocated to check."""
    from fused_attn_at.ops.self_attention_iat import check_iat_memory

    monkeypatch.delenv("FUSED_ATTN_AT_IAT_MAX_BYTES", raising=False)
    per_entry = 4 * 4 + 2
    fits = (2**31 // per_entry // (12 * 128 * 128), 12, 128, 128)  # just under 2 GiB
    check_iat_memory(fits, torch.float32)
    with pytest.raises(MemoryError, match="above the limit of 2048 MiB"):
        check_iat_memory((fits[0] + 1, *fits[1:]), torch.float32)
    args, kw = make_case("padding")
    G = _t(*_map_shape(args), seed=8)
    monkeypatch.setenv("FUSED_ATTN_AT_IAT_MAX_BYTES", "1000")
    with pytest.raises(MemoryError, match="FUSED_ATTN_AT_IAT_MAX_BYTES"):
        fused_attn_at.perturbed_attention(*args, **kw, perturbation="iat", grad=G, backend="cpu")
    fused_attn_at.perturbed_attention(*args, **kw, perturbation="iat", grad=G, backend="cpu", iat_max_bytes=2**30)


def test_first_layer_record_shares_the_adversarial_inputs(monkeypatch):
    """Under SelfAttentionAT the first layer's adversarial Q, K, V equal the clean ones, and its record drops its
    own copies for them (README); the second layer's differ (the first is perturbed), and its record keeps its
    own."""
    shared = []
    original = cpu_sa.FusedCleanPass.share_inputs

    def spy(self, q, k, v):
        original(self, q, k, v)
        shared.append(self.q is q and self.k is k and self.v is v)

    monkeypatch.setattr(cpu_sa.FusedCleanPass, "share_inputs", spy)
    B, T, D = 2, 9, 8
    projections = torch.nn.ModuleList(torch.nn.Linear(D, 3 * D) for _ in range(2)).double()

    def loss():
        x = _t(B, T, D, seed=3)
        mask = torch.arange(T)[None, :] < torch.tensor([[T], [T - 4]])
        for proj in projections:
            q, k, v = proj(x).reshape(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
            o = fused_attn_at.perturbed_attention(q, k, v, mask, layer=proj, backend="cpu")
            x = x + o.transpose(1, 2).reshape(B, T, D)
        return x.square().mean()

    fused_attn_at.SelfAttentionAT(projections, "at", eps=0.5).step(loss)
    assert shared == [True, False]


def test_double_backward_raises():
    cases.check_double_backward_raises("cpu")


def test_record_misuse_raises():
    cases.check_record_misuse_raises("cpu")


def test_input_validation():
    cases.check_input_validation("cpu")
