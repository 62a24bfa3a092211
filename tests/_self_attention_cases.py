"""What the fused self-attention backends' tests share (tests/test_self_attention_cpu.py, ..._triton.py): input
builders (each file has its own CASES: sizes that cross its kernels' block edges) and checks parametrised by the
backend's name, its ops namespace or module; each file still runs them against its own backend."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fused_attn_at
import python_ref
from fused_attn_at.ops.cpp_self_attention import _draw_seed

F64 = torch.float64


def t(*shape, seed=0, dtype=F64, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def make_case(cases, name, seed=0, dtype=F64):
    """((q, k, v, key_mask), dict(causal, bias, attn_mask)) of cases[name] = (B, nh, Tq, Tk, d, dv, key-mask
    pattern (None, "pad": the last example's last third padded, "empty": also example 0 fully masked), causal,
    bias shape (None = no bias; rows 1 (all) and 2 (every third key) -inf), attn_mask)."""
    B, nh, Tq, Tk, d, dv, mask, causal, bias_shape, with_attn_mask = cases[name]
    q, k, v = (t(B, nh, Tq, d, seed=seed, dtype=dtype, grad=True), t(B, nh, Tk, d, seed=seed + 1, dtype=dtype,
               grad=True), t(B, nh, Tk, dv, seed=seed + 2, dtype=dtype, grad=True))
    key_mask = None
    if mask is not None:
        key_mask = torch.ones(B, Tk, dtype=torch.bool)
        key_mask[-1, Tk - Tk // 3:] = False
        if mask == "empty":
            key_mask[0] = False  # example 0: every query row fully masked
    bias = None
    if bias_shape is not None:
        bias = t(*bias_shape, Tq, Tk, seed=seed + 3, dtype=dtype)
        bias[..., 1, :] = -math.inf  # a fully masked row in every example/head
        bias[..., 2, ::3] = -math.inf
        bias.requires_grad_(True)
    attn_mask = None
    if with_attn_mask:
        g = torch.Generator().manual_seed(seed + 4)
        attn_mask = torch.rand(B, 1, Tq, Tk, generator=g) > 0.3
        attn_mask[:, :, 0] = False
    return (q, k, v, key_mask), dict(causal=causal, bias=bias, attn_mask=attn_mask)


def leaves(args, kw):
    q, k, v, _ = args
    return [x for x in (q, k, v, kw.get("bias")) if x is not None and x.requires_grad]


def map_shape(args):
    q, k, _, _ = args
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def values_vs_reference(args, kw, kind, norm, backend):
    """(the backend's output, the reference's) with perturbation `kind`: a given G (AT, iAT) or noise (RP)."""
    extra = dict(perturbation=kind, norm=norm, eps=1.7)
    if kind in ("at", "iat"):
        extra["grad"] = t(*map_shape(args), seed=7)
    if kind == "rp":
        extra["noise"] = t(*map_shape(args), seed=8)
    out = fused_attn_at.perturbed_attention(*args, **kw, **extra, backend=backend)
    ref = python_ref.perturbed_attention(*args, **kw, **extra)
    return out, ref


def rp_seeded_vs_reference(args, kw, backend, rp_noise, **extra):
    """(the backend's RP output with the noise its kernels make from a seed drawn from a generator, the reference's
    fed that noise as materialised by rp_noise)."""
    out = fused_attn_at.perturbed_attention(*args, **kw, perturbation="rp", eps=0.9, backend=backend,
                                            generator=torch.Generator().manual_seed(3), **extra)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)).item())
    noise = rp_noise(args[0].detach(), args[1].detach(), seed)
    ref = python_ref.perturbed_attention(*args, **kw, perturbation="rp", eps=0.9, noise=noise, **extra)
    return out, ref


def drawn_seed(generator_seed: int) -> int:
    """The seed a fused call draws first from a generator seeded with generator_seed: its RP seed from the call's
    `generator`, its dropout seed from the global generator after torch.manual_seed(generator_seed)."""
    return _draw_seed(torch.Generator().manual_seed(generator_seed))


def dropout_vs_reference(args, kw, backend, dropout_mask, rp_noise=None):
    """(the backend's output with dropout 0.3 (and RP when rp_noise is given), the reference's fed the kernels'
    mask (dropout_mask materialises it) and noise): the same values and gradients are expected."""
    q, k = args[0].detach(), args[1].detach()
    extra = dict(perturbation="rp", eps=0.9) if rp_noise is not None else {}
    torch.manual_seed(3)  # the dropout seed: the global generator's; RP's: the call's generator
    out = fused_attn_at.perturbed_attention(*args, **kw, dropout_p=0.3, backend=backend,
                                            generator=torch.Generator().manual_seed(4), **extra)
    if rp_noise is not None:
        extra["noise"] = rp_noise(q, k, drawn_seed(4))
    mask = dropout_mask(q, k, 0.3, drawn_seed(3)).to(q.dtype)
    ref = python_ref.perturbed_attention(*args, **kw, dropout_p=0.3, dropout_mask=mask, **extra)
    # the mask matters: without it the output differs
    assert (out - python_ref.perturbed_attention(*args, **kw, **extra)).abs().max() > 1e-3
    return out, ref


def dropout_at_step(args, kw, backend, dropout_mask, same_mask, atol=1e-10):
    """An AT step with dropout 0.25: the clean call (record) and the adversarial call each draw their mask; G is
    recomputed with the clean call's. Checked against the reference: G = dL_clean/dS through the clean mask, then
    the AT call fed G and the adversarial mask; values and the gradients of L_clean + L_adv in fp64, and the
    record's materialised G."""
    q, k, v, m = args
    w_clean = t(*q.shape[:3], v.shape[3], seed=41)
    rec = fused_attn_at.CleanPassRecord()
    torch.manual_seed(11)
    clean = fused_attn_at.perturbed_attention(*args, **kw, record=rec, dropout_p=0.25, backend=backend)
    grad_leaves = leaves(args, kw)
    g_clean = torch.autograd.grad((clean * w_clean).sum(), grad_leaves)
    rec.mark_backward_done()
    adv_seed = 11 if same_mask else 12
    torch.manual_seed(adv_seed)
    adv = fused_attn_at.perturbed_attention(*args, **kw, perturbation="at", grad=rec, eps=1.3, dropout_p=0.25,
                                            backend=backend)
    w_adv = t(*adv.shape, seed=50)
    g_adv = torch.autograd.grad((adv * w_adv).sum(), grad_leaves)

    mask_clean = dropout_mask(q.detach(), k.detach(), 0.25, drawn_seed(11)).to(q.dtype)
    mask_adv = dropout_mask(q.detach(), k.detach(), 0.25, drawn_seed(adv_seed)).to(q.dtype)
    assert torch.equal(mask_clean, mask_adv) == same_mask
    ref_clean = python_ref.perturbed_attention(*args, **kw, dropout_p=0.25, dropout_mask=mask_clean)
    torch.testing.assert_close(clean, ref_clean, atol=atol, rtol=1e-9)
    allowed, _ = python_ref.self_attention_masks(q, k, m, causal=kw["causal"], attn_mask=kw["attn_mask"],
                                                 bias=kw["bias"])
    s = python_ref.attention_scores(q.detach(), k.detach(), None if kw["bias"] is None else kw["bias"].detach(),
                                    None).requires_grad_(True)
    o_ref, _ = python_ref.self_attention.attend(s, allowed, v.detach(), 0.25, mask_clean)
    G = torch.autograd.grad((o_ref * w_clean).sum(), s)[0]
    ref_adv = python_ref.perturbed_attention(*args, **kw, perturbation="at", grad=G, eps=1.3, dropout_p=0.25,
                                             dropout_mask=mask_adv)
    torch.testing.assert_close(adv, ref_adv, atol=atol, rtol=1e-9)
    g_ref = torch.autograd.grad((ref_clean * w_clean).sum() + (ref_adv * w_adv).sum(), grad_leaves)
    for a, b in zip([x + y for x, y in zip(g_clean, g_adv)], g_ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-9)
    torch.testing.assert_close(torch.where(allowed, rec.fused.grad_map(), 0.0), torch.where(allowed, G, 0.0),
                               atol=atol, rtol=1e-9)


def check_dropout_mask(dropout_mask, dtype):
    """The materialised multipliers: 0 or 1 / (1 - p), about 1 - p of them kept, a function of the seed, apart
    from the RP noise's stream, all ones at p = 0."""
    q, k = torch.zeros(2, 3, 67, 1, dtype=dtype), torch.zeros(2, 3, 300, 1, dtype=dtype)
    m = dropout_mask(q, k, 0.3, 2**40 + 7)
    values = m.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7, rel=1e-7)
    assert abs((m > 0).double().mean().item() - 0.7) < 0.01  # 121k entries: sd of the share 0.0013
    assert torch.equal(m, dropout_mask(q, k, 0.3, 2**40 + 7))
    assert not torch.equal(m, dropout_mask(q, k, 0.3, 2**40 + 8))
    assert torch.equal(dropout_mask(q, k, 0.0, 5), torch.ones_like(m))
    return m


def clean_then_adv(args, kw, backend, norm, clean_loss_w, kind="at", eps=1.3):
    """Clean call with a record, backward of a clean loss, adversarial call (`kind` "at" or "iat") with the record;
    returns (out_adv, grads of L_clean + L_adv wrt the leaves, the record)."""
    rec = fused_attn_at.CleanPassRecord(keep_scores=kind == "iat")
    clean = fused_attn_at.perturbed_attention(*args, **kw, record=rec, backend=backend)
    grad_leaves = leaves(args, kw)
    g_clean = torch.autograd.grad((clean * clean_loss_w).sum(), grad_leaves)
    rec.mark_backward_done()
    adv = fused_attn_at.perturbed_attention(*args, **kw, perturbation=kind, grad=rec, eps=eps, norm=norm,
                                            backend=backend)
    g_adv = torch.autograd.grad((adv * t(*adv.shape, seed=50)).sum(), grad_leaves)
    return adv, [a + b for a, b in zip(g_clean, g_adv)], rec


def check_record_errors_and_zero_gradient(args, backend, other_shape):
    """A record without a clean backward, marked done (G = 0: the clean output), and used for a call whose scores
    have another shape (other_shape(args): such a call's q, k, v, key_mask)."""
    rec = fused_attn_at.CleanPassRecord()
    fused_attn_at.perturbed_attention(*args, record=rec, backend=backend)
    with pytest.raises(RuntimeError, match="no gradient has reached the clean scores"):
        fused_attn_at.perturbed_attention(*args, perturbation="at", grad=rec, backend=backend)
    rec.mark_backward_done()  # the clean loss did not use this call: G = 0, r = 0
    out = fused_attn_at.perturbed_attention(*args, perturbation="at", grad=rec, backend=backend)
    torch.testing.assert_close(out, fused_attn_at.perturbed_attention(*args, backend=backend))
    for kind in ("at", "iat"):
        with pytest.raises(ValueError, match="CleanPassRecord holds a map of shape"):
            fused_attn_at.perturbed_attention(*other_shape(args), perturbation=kind, grad=rec, backend=backend)


def largest_sizes(prof):
    """(the most bytes any one op allocated for itself, the most elements of any op's input) in a profile."""
    events = prof.events()
    allocated = max(e.self_cpu_memory_usage for e in events)
    numel = max((math.prod(shape) for e in events for shape in (e.input_shapes or [])
                 if isinstance(shape, list) and shape and all(isinstance(n, int) for n in shape)), default=0)
    return allocated, numel


def assert_no_map(allocated, numel, map_numel):
    assert allocated < map_numel * 4 // 8, f"an op allocated {allocated} bytes (a map is {map_numel * 4})"
    assert numel < map_numel // 8, f"an op read a tensor of {numel} elements (a map is {map_numel})"


def gradcheck_inputs(B, nh, Tq, Tk, d):
    """q, k, v, key_mask (the last example's last 3 keys padded), attn_mask (row 3 fully masked), bias (learnable)."""
    q, k, v = t(B, nh, Tq, d, seed=1, grad=True), t(B, nh, Tk, d, seed=2, grad=True), \
        t(B, nh, Tk, d, seed=3, grad=True)
    key_mask = torch.ones(B, Tk, dtype=torch.bool)
    key_mask[B - 1, Tk - 3:] = False
    attn_mask = torch.ones(1, 1, Tq, Tk, dtype=torch.bool)
    attn_mask[..., 3, :] = False  # a fully masked row
    bias = (t(1, nh, Tq, Tk, seed=4) * 0.3).requires_grad_(True)
    return q, k, v, key_mask, attn_mask, bias


def op_args(ops, nh, kind, dtype=F64):
    """Arguments of the sa_* ops of the namespace `ops` for `kind` (3: a clean pass run by ops.sa_fwd)."""
    B, Tq, Tk, d = 2, 5, 7, 3
    q, k, v = t(B, nh, Tq, d, seed=1, dtype=dtype), t(B, nh, Tk, d, seed=2, dtype=dtype), \
        t(B, nh, Tk, 4, seed=3, dtype=dtype)
    key_mask = torch.ones(B, Tk, dtype=torch.bool)
    key_mask[1, 5:] = False
    bias = t(1, nh, Tq, Tk, seed=4, dtype=dtype)
    coef = t(B, nh, Tq, seed=5, dtype=dtype).abs() if kind else None
    dense = t(B, nh, Tq, Tk, seed=6, dtype=dtype) if kind == 1 else None
    clean = (None,) * 7
    if kind == 3:
        cout, clse = ops.sa_fwd(q, k, v, key_mask, bias, False, 0.5, 0, None, None, 0, *(None,) * 7)
        clean = (q, k, v, cout, t(B, nh, Tq, 4, seed=8, dtype=dtype), clse, bias)
    return q, k, v, key_mask, bias, coef, dense, clean


def compiled_and_eager(args, kw, kind, backend, compile_backend="inductor"):
    """(torch.compile(fullgraph=True)'s output, eager's) of a causal call with a bias, clean or AT/iAT (a given G,
    norm="row")."""
    torch._dynamo.reset()
    extra = {} if kind is None else dict(perturbation=kind, grad=t(*map_shape(args), seed=5), norm="row")

    def f(q, k, v, key_mask, bias):
        return fused_attn_at.perturbed_attention(q, k, v, key_mask, causal=True, bias=bias, backend=backend,
                                                 **extra)

    compiled = torch.compile(f, fullgraph=True, dynamic=False, backend=compile_backend)
    q, k, v, m = args
    out = compiled(q, k, v, m, kw["bias"])
    return out, f(q, k, v, m, kw["bias"])


def check_errors_and_what_runs_the_reference(args, backend):
    """NaN scores and a NaN G are errors; iAT's maps have a memory limit; return_attention runs the reference,
    dropout runs in the kernels without a warning; unknown and not built backends are errors."""
    q, k, v, m = args
    shape = map_shape(args)
    bad = q.detach().clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"scores \(scale \* q k\^T \+ bias\) holds NaN or inf"):
        fused_attn_at.perturbed_attention(bad, k, v, m, backend=backend)
    g = t(*shape, seed=1)
    g[0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="grad holds NaN or inf"):
        fused_attn_at.perturbed_attention(q, k, v, m, perturbation="at", grad=g, backend=backend)
    with pytest.raises(MemoryError, match="FUSED_ATTN_AT_IAT_MAX_BYTES"):  # iAT's maps, bounded
        fused_attn_at.perturbed_attention(q, k, v, m, perturbation="iat", grad=t(*shape), backend=backend,
                                          iat_max_bytes=1000)
    with warnings.catch_warnings():  # dropout is fused: no fallback, no warning (test_dropout_* check the values)
        warnings.simplefilter("error")
        out = fused_attn_at.perturbed_attention(q, k, v, m, dropout_p=0.5, backend=backend)
    assert out.shape == (*shape[:3], v.shape[3])
    res = fused_attn_at.perturbed_attention(q, k, v, m, return_attention=True, backend=backend)
    assert res.attention.shape == shape
    with pytest.raises(ValueError, match="backend must be None, 'cpu', 'triton' or 'reference'"):
        fused_attn_at.perturbed_attention(q, k, v, backend="flash")
    with pytest.raises(NotImplementedError, match="not built yet"):
        fused_attn_at.perturbed_attention(q, k, v, backend="cuda")


# ---------------------------------------------------------------------------------------------------------
# Hypothesis: random self-attention calls of a fused backend against the reference, float64


FUZZ_KINDS = (None, "at", "rp", "at_record", "rp_seeded", "iat", "iat_record")


def sa_cases(kind, max_batch=3, max_heads=3, max_length=80, max_dim=9, dropout=True):
    """A hypothesis strategy of dict(args=(q, k, v, key_mask), kw, kind, norm, eps, dropout_p): sizes (Tq != Tk
    allowed), q/k/v contiguous or heads split off a [B, T, nh, d] tensor (strided), a key mask (none, right padding
    with possibly empty examples, or any pattern), an attn_mask, a query_mask, causal, a bias (none, broadcast or
    per example and head, with
    -inf entries), score magnitudes 0.1-10, eps, norm and dropout, for `kind` (FUZZ_KINDS): None / "at" or "iat"
    (a given G) / "rp" (given noise) / "at_record" or "iat_record" (G from a clean call's CleanPassRecord) /
    "rp_seeded" (the kernels' own noise)."""
    from hypothesis import strategies as st

    @st.composite
    def draw_case(draw):
        B, nh = draw(st.integers(1, max_batch)), draw(st.integers(1, max_heads))
        Tq = draw(st.integers(1, max_length))
        Tk = draw(st.one_of(st.just(Tq), st.integers(1, max_length)))
        d, dv = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
        seed = draw(st.integers(0, 2**16))
        magnitude = draw(st.sampled_from((0.1, 1.0, 3.0, 10.0)))
        strided = draw(st.booleans())

        def head_tensor(T, width, s):
            if strided:  # [B, T, nh, width] viewed as [B, nh, T, width]: the layout a fused projection gives
                base = (t(B, T, nh, width, seed=s) * magnitude ** 0.5).requires_grad_(True)
                return base.transpose(1, 2)
            return (t(B, nh, T, width, seed=s) * magnitude ** 0.5).requires_grad_(True)

        q, k, v = head_tensor(Tq, d, seed), head_tensor(Tk, d, seed + 1), head_tensor(Tk, dv, seed + 2)
        mask_kind = draw(st.sampled_from(("none", "lengths", "any")))
        key_mask = None
        if mask_kind == "lengths":  # right padding; a length may be 0 (every row of that example fully masked)
            lengths = draw(st.lists(st.integers(0, Tk), min_size=B, max_size=B))
            key_mask = torch.arange(Tk)[None, :] < torch.tensor(lengths)[:, None]
        elif mask_kind == "any":
            bits = draw(st.lists(st.booleans(), min_size=B * Tk, max_size=B * Tk))
            key_mask = torch.tensor(bits, dtype=torch.bool).reshape(B, Tk)
        bias_shape = draw(st.sampled_from((None, (1, 1), (1, nh), (B, nh))))
        bias = None
        if bias_shape is not None:
            bias = t(*bias_shape, Tq, Tk, seed=seed + 3)
            if draw(st.booleans()):
                bias[..., ::3] = -math.inf  # every third key masked out by the bias
            bias.requires_grad_(draw(st.booleans()))
        attn_mask = None
        if draw(st.booleans()):  # another pattern, e.g. a block mask; a query row may lose every key
            bits = draw(st.lists(st.booleans(), min_size=Tq * Tk, max_size=Tq * Tk))
            attn_mask = torch.tensor(bits, dtype=torch.bool).reshape(1, 1, Tq, Tk)
        kw = dict(causal=draw(st.booleans()), bias=bias, attn_mask=attn_mask)
        if draw(st.booleans()):  # the real queries, where r may be non-zero
            kw["query_mask"] = torch.tensor(draw(st.lists(st.booleans(), min_size=B * Tq, max_size=B * Tq)),
                                            dtype=torch.bool).reshape(B, Tq)
        norm = draw(st.sampled_from(("example", "row")))
        eps = draw(st.one_of(st.sampled_from((0.0, 1.0)), st.floats(0.0, 20.0)))
        dropout_p = draw(st.sampled_from((0.0, 0.0, 0.3))) if dropout and kind in (None, "at", "rp", "iat") else 0.0
        return dict(args=(q, k, v, key_mask), kw=kw, kind=kind, norm=norm, eps=eps, dropout_p=dropout_p,
                    seed=seed)

    return draw_case()


def _outputs_and_gradients(out, args, kw, w):
    grad_leaves = leaves(args, kw)
    grads = torch.autograd.grad((out * w).sum(), grad_leaves, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(x) if g is None else g for g, x in zip(grads, grad_leaves)]


def _sensitivity_to_g(args, kw, kind, norm, eps, g_ref, g_alt):
    """max |x(G_alt) - x(G_ref)| of the reference's adversarial output and gradients (of <w, out>, w as
    clean_then_adv's) for two G that differ only by rounding: how much this case amplifies G's rounding. A row
    whose G is at rounding level (a saturated softmax, one allowed key) gets r = eps G / ||G|| of that rounding's
    direction under norm="row", in every implementation."""
    results = []
    for g in (g_ref, g_alt):
        out = python_ref.perturbed_attention(*args, **kw, perturbation=kind, grad=g, eps=eps, norm=norm)
        results.append(_outputs_and_gradients(out, args, kw, t(*out.shape, seed=50)))
    return [(a - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(*results)]


def fuzz_vs_reference(case, backend, dropout_mask, rp_noise, atol=1e-9):
    """One sa_cases() case: the backend's output and gradients (of <w, out>, or of L_clean + L_adv for
    "at_record") against the reference's, fed the same G / noise / dropout mask. Through a record, G is the
    backend's own (recomputed from its record) against the reference's (autograd): each tensor may differ by
    atol + 2x what the reference itself moves when fed the backend's G (flash-attention's rule)."""
    args, kw, kind, norm, eps, p = (case[k] for k in ("args", "kw", "kind", "norm", "eps", "dropout_p"))
    q, k = args[0].detach(), args[1].detach()
    slack = None
    if kind in ("at_record", "iat_record"):
        w = t(*q.shape[:3], args[2].shape[3], seed=case["seed"] + 5)
        kind = kind.split("_")[0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "iAT perturbation with a batch of one")  # r = 0: still compared
            out, got, rec = clean_then_adv(args, kw, backend, norm, w, kind, eps)
            ref, want, rec_ref = clean_then_adv(args, kw, "reference", norm, w, kind, eps)
            slack = _sensitivity_to_g(args, kw, kind, norm, eps, rec_ref.gradient(), rec.gradient())
        got, want = [out.detach(), *got], [ref.detach(), *want]
    else:
        extra = dict(perturbation=kind, norm=norm, eps=eps)
        ref_extra = dict(extra)
        if kind in ("at", "iat"):
            extra["grad"] = ref_extra["grad"] = t(*map_shape(args), seed=case["seed"] + 7)
        elif kind == "rp":
            extra["noise"] = ref_extra["noise"] = t(*map_shape(args), seed=case["seed"] + 8)
        elif kind == "rp_seeded":
            extra["perturbation"] = ref_extra["perturbation"] = "rp"
            extra["generator"] = torch.Generator().manual_seed(case["seed"])
            ref_extra["noise"] = rp_noise(q, k, drawn_seed(case["seed"]))
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "iAT perturbation with a batch of one")  # r = 0: still compared
            torch.manual_seed(case["seed"])  # the dropout seed the fused call draws
            out = fused_attn_at.perturbed_attention(*args, **kw, **extra, dropout_p=p, backend=backend)
            if p > 0:
                ref_extra["dropout_mask"] = dropout_mask(q, k, p, drawn_seed(case["seed"])).to(q.dtype)
            ref = python_ref.perturbed_attention(*args, **kw, **ref_extra, dropout_p=p)
        w = t(*out.shape, seed=case["seed"] + 9)
        got, want = _outputs_and_gradients(out, args, kw, w), _outputs_and_gradients(ref, args, kw, w)
    assert all(torch.isfinite(x).all() for x in got), f"{backend}: a non-finite output or gradient"
    for i, (name, a, b) in enumerate(zip(["out", "q", "k", "v", "bias"], got, want)):
        tol = atol + (0.0 if slack is None else 2 * slack[i])
        torch.testing.assert_close(a, b, atol=tol, rtol=1e-8, msg=lambda m: f"{backend} {name}: {m}")


def check_not_differentiable(ops, test_utils=None):
    """sa_rowsq, sa_rp_noise and sa_dropout_mask of the namespace `ops` with q, k (and the dense tensor) that
    require grad: outputs that do not require grad, and opcheck's autograd registration test passes."""
    q, k = t(2, 2, 5, 3, seed=1, grad=True), t(2, 2, 7, 3, seed=2, grad=True)
    dense = t(2, 2, 5, 7, seed=3, grad=True)
    calls = {ops.sa_rowsq: (q, k, None, None, False, dense, 0), ops.sa_rp_noise: (q, k, 9),
             ops.sa_dropout_mask: (q, k, 0.3, 9)}
    for op, args in calls.items():
        out = op(*args)
        assert not out.requires_grad, f"{op}: the output requires grad"
        kwargs = {} if test_utils is None else dict(test_utils=test_utils)
        torch.library.opcheck(op, args, **kwargs)


def check_double_backward_raises(backend):
    """A second derivative through a fused backend raises (plain call, and the clean call of an AT step), rather
    than torch's fallback returning zeros for an op with no autograd kernel; the reference's is plain autograd."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 3, generator=gen, dtype=F64, requires_grad=True) for _ in range(3))
    for record in (None, fused_attn_at.CleanPassRecord()):
        out = fused_attn_at.perturbed_attention(q, k, v, backend=backend, record=record)
        (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="has no second derivative"):
            torch.autograd.grad(gq.square().sum(), v)
    out = fused_attn_at.perturbed_attention(q, k, v, backend="reference")
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (hv,) = torch.autograd.grad(gq.square().sum(), v)
    assert hv.abs().max() > 0


def check_record_misuse_raises(backend):
    """Uses of a CleanPassRecord that would give a wrong G (or a silently dropped perturbation) raise, naming what
    is wrong: record= with a perturbation; a second clean call into one record; an adversarial call whose causal,
    scale or masks differ from the clean call's; (fused backends) a clean tensor changed in place before the
    adversarial call."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 5, 3, generator=gen, dtype=F64, requires_grad=True) for _ in range(3))
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    op = fused_attn_at.perturbed_attention
    with pytest.raises(ValueError, match="record= is for the clean call"):
        op(q, k, v, key_mask, perturbation="at", grad=torch.zeros(2, 2, 5, 5, dtype=F64),
           record=fused_attn_at.CleanPassRecord(), backend=backend)

    def filled(**kw):
        rec = fused_attn_at.CleanPassRecord(keep_scores=True)
        out = op(q, k, v, key_mask, record=rec, backend=backend, **kw)
        out.square().sum().backward()
        rec.mark_backward_done()
        return rec

    rec = fused_attn_at.CleanPassRecord()
    op(q, k, v, key_mask, record=rec, backend=backend)
    with pytest.raises(ValueError, match="already holds a clean call"):
        op(q, k, v, key_mask, record=rec, backend=backend)
    other_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    attn_mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    for clean, adversarial, name in (
            (dict(causal=True), {}, "causal"), (dict(scale=0.3), {}, "scale"), ({}, dict(scale=0.3), "scale"),
            ({}, dict(key_mask=other_mask), "key_mask"), (dict(attn_mask=attn_mask), {}, "attn_mask"),
            ({}, dict(query_mask=key_mask), "query_mask")):
        for kind in ("at", "iat"):
            rec = filled(**clean)
            kw = {"key_mask": key_mask, **adversarial}
            with pytest.raises(ValueError, match=f"^{name} differs from the clean call"):
                op(q, k, v, kw.pop("key_mask"), perturbation=kind, grad=rec, backend=backend, **kw)
    rec = filled(scale=3 ** -0.5)  # the default scale, given as a number: the same call
    op(q, k, v, key_mask, perturbation="at", grad=rec, backend=backend)
    if backend != "reference":  # a fused record holds the clean call's tensors, in its kernel dtype
        rec = filled()
        with pytest.raises(TypeError, match="filled by a clean call computing in torch.float64"):
            op(q.float(), k.float(), v.float(), key_mask, perturbation="at", grad=rec, backend=backend)
    if backend != "reference":  # the reference's record holds G itself, not the clean tensors
        for kind in ("at", "iat"):
            rec = filled()
            with torch.no_grad():
                k.mul_(1.0)  # an in-place write (the values do not even change)
            with pytest.raises(RuntimeError, match="the clean call's k changed in place"):
                op(q, k, v, key_mask, perturbation=kind, grad=rec, backend=backend)


def check_input_validation(backend):
    """d = 0 needs an explicit scale; iat_max_bytes must be a number of bytes >= 0."""
    z = torch.zeros(1, 1, 2, 0, dtype=F64)
    v = torch.randn(1, 1, 2, 3, dtype=F64)
    with pytest.raises(ValueError, match="d = 0 features"):
        fused_attn_at.perturbed_attention(z, z, v, backend=backend)
    out = fused_attn_at.perturbed_attention(z, z, v, scale=1.0, backend=backend)
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand(1, 1, 2, 3))
    q = torch.randn(2, 1, 3, 2, dtype=F64)
    G = torch.randn(2, 1, 3, 3, dtype=F64)
    for bad in (-1, "1e9", float("nan"), True):
        with pytest.raises(ValueError, match="iat_max_bytes must be None or a number of bytes >= 0"):
            fused_attn_at.perturbed_attention(q, q, q, perturbation="iat", grad=G, iat_max_bytes=bad,
                                              backend=backend)
