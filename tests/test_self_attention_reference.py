"""The self-attention reference (python_ref.perturbed_attention, python_ref.self_attention_perturbation) and the
public op fused_attn_at.perturbed_attention against naive definitions: loops over the SPEC formulas ("Self-
attention"), in float64, values and gradients, for none/AT/iAT/RP, padding, fully masked rows, causal, bias,
attn_mask, Tq != Tk, B = 1 and odd sizes. iAT's gradients are checked with r held fixed (SPEC note)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import _self_attention_cases as cases
import fused_attn_at
import python_ref
from python_ref.self_attention import IAT_MAX_BYTES_ENV

DELTA = 1e-12
KINDS = (None, "at", "iat", "rp")


# ---------------------------------------------------------------------------------------------------------
# Naive definitions, written from SPEC "Self-attention" one entry / one example at a time


def naive_valid(B, nh, Tq, Tk, key_mask, causal, bias, attn_mask, query_mask):
    """(allowed, valid) as nested Python lists of bools [B][nh][Tq][Tk]."""
    if query_mask is None:
        query_mask = key_mask if (key_mask is not None and Tq == Tk) else None
    allowed = [[[[True] * Tk for _ in range(Tq)] for _ in range(nh)] for _ in range(B)]
    valid = [[[[True] * Tk for _ in range(Tq)] for _ in range(nh)] for _ in range(B)]
    for b in range(B):
        for h in range(nh):
            for i in range(Tq):
                for j in range(Tk):
                    ok = True
                    if key_mask is not None and not key_mask[b, j]:
                        ok = False
                    if causal and j > i:
                        ok = False
                    if attn_mask is not None and not attn_mask[b % attn_mask.shape[0], h % attn_mask.shape[1], i, j]:
                        ok = False
                    if bias is not None and bias[b % bias.shape[0], h % bias.shape[1], i, j] == -math.inf:
                        ok = False
                    allowed[b][h][i][j] = ok
                    valid[b][h][i][j] = ok and (query_mask is None or bool(query_mask[b, i]))
    return allowed, valid


def naive_scores(q, k, bias, scale):
    B, nh, Tq, d = q.shape
    Tk = k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    rows = []
    for b in range(B):
        for h in range(nh):
            for i in range(Tq):
                for j in range(Tk):
                    s = scale * sum(q[b, h, i, c] * k[b, h, j, c] for c in range(d))
                    if bias is not None:
                        s = s + bias[b % bias.shape[0], h % bias.shape[1], i, j]
                    rows.append(s)
    return torch.stack(rows).reshape(B, nh, Tq, Tk)


def naive_units(B, nh, Tq, Tk, norm):
    """The index sets over which one norm is taken: per example (all h, i, j) or per (example, head, row)."""
    if norm == "example":
        return [[(b, h, i, j) for h in range(nh) for i in range(Tq) for j in range(Tk)] for b in range(B)]
    return [[(b, h, i, j) for j in range(Tk)] for b in range(B) for h in range(nh) for i in range(Tq)]


def naive_perturbation(kind, S, valid, G=None, Z=None, eps=1.0, norm="example"):
    B, nh, Tq, Tk = S.shape
    S, r = S.detach(), torch.zeros(B, nh, Tq, Tk, dtype=S.dtype)
    units = naive_units(B, nh, Tq, Tk, norm)
    V = lambda e: valid[e[0]][e[1]][e[2]][e[3]]  # noqa: E731
    if kind in ("at", "rp"):
        X = G if kind == "at" else Z
        for unit in units:
            n = math.sqrt(sum(float(X[e]) ** 2 for e in unit if V(e)))
            for e in unit:
                if V(e):
                    r[e] = eps * X[e] / max(n, DELTA)
        return r
    # iAT: per unit position u, examples i and j: D_ij = (S_i - S_j) M_i M_j, ...
    per_example = len(units) // B
    for i in range(B):
        for u in range(per_example):
            unit_i = units[i * per_example + u]
            acc = [0.0] * len(unit_i)
            for j in range(B):
                unit_j = units[j * per_example + u]
                D = [float(S[ei] - S[ej]) if (V(ei) and V(ej)) else 0.0 for ei, ej in zip(unit_i, unit_j)]
                nd = max(math.sqrt(sum(x * x for x in D)), DELTA)
                dvec = [x / nd for x in D]
                kij = sum(float(G[ei]) * x for ei, x in zip(unit_i, dvec))
                acc = [a + kij * x for a, x in zip(acc, dvec)]
            nu = max(math.sqrt(sum(x * x for x in acc)), DELTA)
            for e, a in zip(unit_i, acc):
                r[e] = eps * a / nu
    return r


def naive_attention(q, k, v, allowed, S, r):
    """O[b, h, i] = sum_j softmax over the allowed j of (S + r) times V[b, h, j]; zeros for a row with no key."""
    B, nh, Tq, _ = q.shape
    out, probs = [], []
    for b in range(B):
        for h in range(nh):
            for i in range(Tq):
                keys = [j for j in range(k.shape[2]) if allowed[b][h][i][j]]
                p_row = torch.zeros(k.shape[2], dtype=q.dtype)
                if not keys:
                    out.append(torch.zeros(v.shape[-1], dtype=q.dtype))
                    probs.append(p_row)
                    continue
                x = torch.stack([S[b, h, i, j] + r[b, h, i, j] for j in keys])
                e = torch.exp(x - x.detach().max())
                p = e / e.sum()
                out.append(sum(p[t] * v[b, h, j] for t, j in enumerate(keys)))
                probs.append(torch.zeros(k.shape[2], dtype=q.dtype).index_put((torch.tensor(keys),), p))
    return torch.stack(out).reshape(B, nh, Tq, -1), torch.stack(probs).reshape(B, nh, Tq, -1)


# ---------------------------------------------------------------------------------------------------------
# Cases


CASES = {
    # name: (B, nh, Tq, Tk, d, dv, options)
    "plain": (3, 2, 4, 4, 3, 2, {}),
    "padding_and_empty_row": (3, 2, 5, 5, 3, 2, {"key_mask": [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]}),
    "causal_left_padding": (3, 2, 5, 5, 3, 2, {"key_mask": [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 0]],
                                               "causal": True}),
    "bias_with_minus_inf": (2, 3, 4, 4, 2, 3, {"bias": True, "key_mask": [[1, 1, 1, 1], [1, 1, 1, 0]]}),
    "cross_Tq_ne_Tk": (3, 2, 3, 5, 4, 2, {"key_mask": [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]],
                                          "query_mask": [[1, 1, 1], [1, 1, 0], [1, 1, 1]]}),
    "attn_mask_scale": (2, 2, 4, 4, 3, 3, {"attn_mask": True, "scale": 0.7}),
    "B1_odd": (1, 3, 5, 5, 5, 3, {"key_mask": [[1, 1, 1, 1, 0]], "causal": True}),
}


def make_case(name, dtype=torch.float64, seed=0):
    B, nh, Tq, Tk, d, dv, opt = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    q, k, v = rnd(B, nh, Tq, d), rnd(B, nh, Tk, d), rnd(B, nh, Tk, dv)
    kw = {}
    if "key_mask" in opt:
        kw["key_mask"] = torch.tensor(opt["key_mask"], dtype=torch.bool)
    if "query_mask" in opt:
        kw["query_mask"] = torch.tensor(opt["query_mask"], dtype=torch.bool)
    if opt.get("causal"):
        kw["causal"] = True
    if opt.get("bias"):
        bias = rnd(1, nh, Tq, Tk)
        bias[0, 1, 2, 0] = -math.inf
        kw["bias"] = bias
    if opt.get("attn_mask"):
        am = torch.rand(B, 1, Tq, Tk, generator=gen) > 0.3
        am[0, 0, 1] = False  # a row with no key
        kw["attn_mask"] = am
    if "scale" in opt:
        kw["scale"] = opt["scale"]
    G, Z = rnd(B, nh, Tq, Tk), rnd(B, nh, Tq, Tk)
    return q, k, v, kw, G, Z


def naive_all(q, k, v, kw, kind, G, Z, eps, norm):
    B, nh, Tq, _ = q.shape
    Tk = k.shape[2]
    allowed, valid = naive_valid(B, nh, Tq, Tk, kw.get("key_mask"), kw.get("causal", False), kw.get("bias"),
                                 kw.get("attn_mask"), kw.get("query_mask"))
    S = naive_scores(q, k, kw.get("bias"), kw.get("scale"))
    r = torch.zeros_like(S) if kind is None else naive_perturbation(kind, S, valid, G, Z, eps, norm)
    out, p = naive_attention(q, k, v, allowed, S, r)
    return out, p, r, valid


def op_kwargs(kind, G, Z, eps, norm):
    kw = {"perturbation": kind, "eps": eps, "norm": norm}
    if kind in ("at", "iat"):
        kw["grad"] = G
    if kind == "rp":
        kw["noise"] = Z
    return kw


# ---------------------------------------------------------------------------------------------------------
# Values and gradients against the naive definitions


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_values_and_gradients_match_naive_definitions(case, kind):
    norms = ("example",) if kind is None else ("example", "row")
    for norm in norms:
        q, k, v, kw, G, Z = make_case(case)
        eps = 0.7
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        bias_leaf = kw["bias"].clone().requires_grad_() if "bias" in kw else None
        kw_ref = {**kw, **({"bias": bias_leaf} if bias_leaf is not None else {})}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # iAT with B = 1 warns (tested below)
            out, p = python_ref.perturbed_attention(*leaves, **kw_ref, **op_kwargs(kind, G, Z, eps, norm),
                                                    return_attention=True)
            pub = fused_attn_at.perturbed_attention(*leaves, **kw_ref, **op_kwargs(kind, G, Z, eps, norm))
        naive_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        naive_bias = kw["bias"].clone().requires_grad_() if "bias" in kw else None
        kw_naive = {**kw, **({"bias": naive_bias} if naive_bias is not None else {})}
        out_n, p_n, r_n, valid = naive_all(*naive_leaves, kw_naive, kind, G, Z, eps, norm)
        torch.testing.assert_close(out, out_n, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p, p_n, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pub, out_n, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(out).all()
        # gradients (r constant in both): a random upstream gradient on every row
        dO = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad((out * dO).sum(), leaves + ([bias_leaf] if bias_leaf is not None else []))
        want = torch.autograd.grad((out_n * dO).sum(),
                                   naive_leaves + ([naive_bias] if naive_bias is not None else []))
        for name, a, b in zip(("q", "k", "v", "bias"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"d{name}")
        # the perturbation itself, by value, from the public function and the reference
        if kind is not None:
            S = python_ref.attention_scores(q, k, kw.get("bias"), kw.get("scale"))
            _, valid_t = python_ref.self_attention_masks(q, k, kw.get("key_mask"), causal=kw.get("causal", False),
                                                         attn_mask=kw.get("attn_mask"),
                                                         query_mask=kw.get("query_mask"), bias=kw.get("bias"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = fused_attn_at.self_attention_perturbation(kind, S, valid_t, grad=G, noise=Z, eps=eps, norm=norm)
            torch.testing.assert_close(r, r_n, rtol=1e-10, atol=1e-12)
            assert (r[~valid_t] == 0).all()


@pytest.mark.parametrize("kind", ("at", "iat", "rp"))
@pytest.mark.parametrize("norm", ("example", "row"))
def test_perturbation_norm_is_eps_over_valid_entries(kind, norm):
    q, k, v, kw, G, Z = make_case("causal_left_padding")
    S = python_ref.attention_scores(q, k)
    _, valid = python_ref.self_attention_masks(q, k, kw["key_mask"], causal=True)
    r = python_ref.self_attention_perturbation(kind, S, valid, grad=G, noise=Z, eps=0.5, norm=norm)
    assert (r[~valid] == 0).all()
    if norm == "example":
        n = r.flatten(1).norm(dim=-1)
        has = valid.flatten(1).any(-1)
    else:
        n = r.norm(dim=-1)
        has = valid.any(-1)
    torch.testing.assert_close(n[has], torch.full_like(n[has], 0.5))
    assert (n[~has] == 0).all()


@pytest.mark.parametrize("case", ["padding_and_empty_row", "causal_left_padding", "bias_with_minus_inf", "B1_odd"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_with_r_fixed(case, kind):
    """torch.autograd.gradcheck of the public op. AT and RP's r does not depend on q, k, bias (only on G or
    the noise and the masks), so the op itself is checked; iAT's r is computed from the scores, so it is held
    fixed: precomputed, passed as an extra bias to a call that computes no perturbation, and the iAT op's
    analytic gradient must equal that function's."""
    q, k, v, kw, G, Z = make_case(case)
    kw = dict(kw)
    bias = kw.pop("bias", None)
    extra = op_kwargs(kind, G, Z, 0.8, "example")
    if bias is not None:
        bias = bias.clone()
        bias[~torch.isfinite(bias)] = -1e30  # gradcheck's finite differences need finite inputs
    inputs = [t.clone().requires_grad_() for t in (q, k, v)] + ([bias.requires_grad_()] if bias is not None else [])

    def split(args):
        return args[:3], (args[3] if bias is not None else None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind != "iat":
            def f(*args):
                (a, b, c), bb = split(args)
                return fused_attn_at.perturbed_attention(a, b, c, **kw, bias=bb, **extra)
            assert torch.autograd.gradcheck(f, inputs, atol=1e-6)
            return
        S = python_ref.attention_scores(q, k, bias, kw.get("scale"))
        _, valid = python_ref.self_attention_masks(q, k, kw.get("key_mask"), causal=kw.get("causal", False),
                                                   bias=bias)
        r = python_ref.self_attention_perturbation("iat", S, valid, grad=G, eps=0.8)

        def fixed(*args):
            (a, b, c), bb = split(args)
            return fused_attn_at.perturbed_attention(a, b, c, **kw, bias=r if bb is None else bb + r)
        assert torch.autograd.gradcheck(fixed, inputs, atol=1e-6)
        dO = torch.randn(q.shape[:3] + (v.shape[-1],), dtype=q.dtype)
        got = torch.autograd.grad((fused_attn_at.perturbed_attention(*inputs[:3], **kw, bias=split(inputs)[1],
                                                                      **extra) * dO).sum(), inputs)
        want = torch.autograd.grad((fixed(*inputs) * dO).sum(), inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, k, v, kw, G, Z = make_case("padding_and_empty_row")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, p = fused_attn_at.perturbed_attention(*leaves, kw["key_mask"], perturbation="at", grad=G,
                                               return_attention=True)
    assert (out[2] == 0).all() and (p[2] == 0).all()
    grads = torch.autograd.grad(out.sum(), leaves)
    for g in grads:
        assert torch.isfinite(g).all() and (g[2] == 0).all()


def test_iat_batch_of_one_warns_and_gives_zero():
    q, k, v, kw, G, Z = make_case("B1_odd")
    S = python_ref.attention_scores(q, k)
    with pytest.warns(UserWarning, match="batch of one"):
        r = python_ref.self_attention_perturbation("iat", S, None, grad=G)
    assert (r == 0).all()


def test_iat_memory_limit(monkeypatch):
    q, k, v, kw, G, Z = make_case("plain")  # B=3, 2x4x4 map: 3*9*32*8 bytes = 6912 bytes
    with pytest.raises(MemoryError, match=IAT_MAX_BYTES_ENV):
        fused_attn_at.perturbed_attention(q, k, v, perturbation="iat", grad=G, iat_max_bytes=1000)
    monkeypatch.setenv(IAT_MAX_BYTES_ENV, "1000")
    with pytest.raises(MemoryError, match="above the limit"):
        python_ref.self_attention_perturbation("iat", q @ k.transpose(-1, -2), None, grad=G)
    monkeypatch.setenv(IAT_MAX_BYTES_ENV, "100000")
    fused_attn_at.perturbed_attention(q, k, v, perturbation="iat", grad=G)


def test_float32_close_to_float64():
    q, k, v, kw, G, Z = make_case("causal_left_padding")
    for kind in KINDS:
        want = python_ref.perturbed_attention(q, k, v, **kw, **op_kwargs(kind, G, Z, 1.0, "example"))
        got = fused_attn_at.perturbed_attention(q.float(), k.float(), v.float(), **kw,
                                                **op_kwargs(kind, G.float(), Z.float(), 1.0, "example"))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_clean_pass_record_equals_materialised_grad():
    """grad=CleanPassRecord (what the training helper passes) equals grad=G: the record holds dL_clean/dS."""
    q, k, v, kw, G, Z = make_case("causal_left_padding")
    for kind in ("at", "iat"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        rec = fused_attn_at.CleanPassRecord(keep_scores=kind == "iat")
        out = fused_attn_at.perturbed_attention(*leaves, **kw, record=rec)
        loss = (out ** 2).sum()
        s = python_ref.attention_scores(*leaves[:2]).detach().requires_grad_()
        # G by autograd through the materialised map
        p = python_ref.masked_softmax(s, python_ref.self_attention_masks(q, k, kw["key_mask"], causal=True)[0])
        (G_true,) = torch.autograd.grad(((p @ v) ** 2).sum(), s)
        loss.backward()
        torch.testing.assert_close(rec.gradient(), G_true)  # cpu backend: G materialised from rec.fused
        adv = fused_attn_at.perturbed_attention(q, k, v, **kw, perturbation=kind, grad=rec)
        ref = python_ref.perturbed_attention(q, k, v, **kw, perturbation=kind, grad=G_true)
        torch.testing.assert_close(adv, ref)


def test_record_errors_and_zero_gradient():
    q, k, v, kw, G, Z = make_case("causal_left_padding")
    args = (q, k, v, kw["key_mask"])
    cases.check_record_errors_and_zero_gradient(args, "reference", lambda a: (a[0][:, :1], a[1][:, :1],
                                                                              a[2][:, :1], a[3]))


# ---------------------------------------------------------------------------------------------------------
# Input checks and backends


def test_bad_inputs_name_the_argument():
    q, k, v, kw, G, Z = make_case("plain")
    op = fused_attn_at.perturbed_attention
    with pytest.raises(ValueError, match=r"q must have shape \[B, nh, Tq, d\]"):
        op(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must have shape \[B, nh, Tk, d\]"):
        op(q, k[..., :2], v)
    with pytest.raises(ValueError, match=r"v must have shape"):
        op(q, k, v[:, :, :2])
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        op(q, k.float(), v)
    with pytest.raises(TypeError, match="key_mask must be a bool tensor"):
        op(q, k, v, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"key_mask must have shape \[B, Tk\] = \[3, 4\]"):
        op(q, k, v, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bias must have shape"):
        op(q, k, v, bias=torch.zeros(3, 2, 4, 5, dtype=q.dtype))
    with pytest.raises(ValueError, match="needs grad"):
        op(q, k, v, perturbation="at")
    with pytest.raises(ValueError, match=r"grad must have shape \[B, nh, Tq, Tk\] = \[3, 2, 4, 4\]"):
        op(q, k, v, perturbation="at", grad=G[:, :1])
    with pytest.raises(ValueError, match="perturbation must be None"):
        op(q, k, v, perturbation="word_at")
    with pytest.raises(ValueError, match="norm must be"):
        op(q, k, v, perturbation="at", grad=G, norm="head")
    with pytest.raises(ValueError, match="eps must be a finite number"):
        op(q, k, v, perturbation="at", grad=G, eps=-1.0)
    with pytest.raises(ValueError, match="grad holds NaN or inf"):
        op(q, k, v, perturbation="at", grad=torch.full_like(G, math.nan))
    with pytest.raises(ValueError, match=r"scores \(scale \* q k\^T \+ bias\) holds NaN or inf"):
        op(q.clone().fill_(math.inf), k, v)


@pytest.mark.parametrize("backend", ["cuda"])  # "cpu", "triton": tests/test_self_attention_{cpu,triton}.py
def test_fused_backends_not_built_yet(backend):
    q, k, v, kw, G, Z = make_case("plain")
    with pytest.raises(NotImplementedError, match="fused self-attention kernels are not built yet"):
        fused_attn_at.perturbed_attention(q, k, v, backend=backend)
    with pytest.raises(ValueError, match="backend must be None, 'cpu', 'triton' or 'reference'"):
        fused_attn_at.perturbed_attention(q, k, v, backend="flash")
    fused_attn_at.perturbed_attention(q, k, v, backend="reference")


def test_record_misuse_raises():
    cases.check_record_misuse_raises("reference")


def test_input_validation():
    cases.check_input_validation("reference")
