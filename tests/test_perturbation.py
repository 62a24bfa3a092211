"""fused_attn_at.perturbation (AT, iAT, RP) on the fused backends: values against python_ref under the
tolerance rule, the SPEC's properties (norm eps per row, zero rows, padding, no gradient, seeded noise),
consistency with attention_pool, and the reference's word-level perturbations."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_attn_at
import python_ref
from _helpers import (  # noqa: F401  (backend is a fixture)
    FUSED_BACKENDS,
    MASK_PATTERNS,
    backend,
    check_perturbation_against_reference,
    fill_padding,
    make_inputs,
    require_backend,
    row_norms,
)

PERTURBATIONS = ("at", "iat", "rp")


def _perturb(backend: str, inputs, kind: str, eps: float = 1.0) -> torch.Tensor:
    return fused_attn_at.perturbation(kind, inputs.scores, inputs.mask, backend=backend,
                                      **inputs.perturbation_kwargs(kind, eps))


# ---------------------------------------------------------------------------------------------------------
# Values against the reference

def _shape_cases():
    # B = 64 exercises iAT's O(B^2 T) pairs; T = 1031 several blocks of positions.
    cpu = ((2, 1), (3, 7), (64, 50), (5, 1031), (33, 127))
    triton = ((2, 1), (3, 7), (9, 40))
    return ([pytest.param("cpu", b, t, id=f"cpu-B{b}-T{t}") for b, t in cpu]
            + [pytest.param("triton", b, t, id=f"triton-B{b}-T{t}") for b, t in triton])


@pytest.mark.parametrize("mask_pattern", MASK_PATTERNS)
@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("backend_name, batch, length", _shape_cases())
def test_matches_reference(backend_name, batch, length, kind, mask_pattern):
    require_backend(backend_name)
    inputs = make_inputs(batch, length, 1, mask_pattern, seed=batch * 7 + length)
    r = check_perturbation_against_reference(backend_name, inputs, kind, eps=2.5)
    assert r.shape == inputs.scores.shape and r.dtype == inputs.scores.dtype


def test_float64(backend):
    inputs = make_inputs(4, 9, 1, "empty_row", seed=1, dtype=torch.float64)
    for kind in PERTURBATIONS:
        r = _perturb(backend, inputs, kind, eps=2.0)
        expected = python_ref.perturbation(kind, inputs.scores, inputs.mask, **inputs.perturbation_kwargs(kind, 2.0))
        assert r.dtype == torch.float64
        torch.testing.assert_close(r, expected, rtol=1e-12, atol=1e-14, msg=lambda m: f"{kind}: {m}")


# ---------------------------------------------------------------------------------------------------------
# Properties from the SPEC


@st.composite
def perturbation_cases(draw):
    batch = draw(st.integers(1, 6))
    length = draw(st.integers(1, 50))
    bits = draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
    mask = None if draw(st.booleans()) else torch.tensor(bits, dtype=torch.bool).reshape(batch, length)
    kind = draw(st.sampled_from(PERTURBATIONS))
    eps = draw(st.one_of(st.sampled_from((0.0, 1.0)), st.floats(1e-3, 50.0)))
    seed = draw(st.integers(0, 2**16))
    zero_row = draw(st.integers(0, batch - 1))
    # a direction far below delta = 1e-12 is divided by delta, not by its norm: r is then shorter than eps
    direction_scale = draw(st.sampled_from((1.0, 1.0, 1e-14, 1e5)))
    inputs = make_inputs(batch, length, 1, "none", seed=seed)
    # one row whose direction (grad / noise) is zero: its r must be zero
    inputs = dataclasses.replace(
        inputs, mask=mask,
        grad=inputs.grad.index_fill(0, torch.tensor([zero_row]), 0.0) * direction_scale,
        noise=inputs.noise.index_fill(0, torch.tensor([zero_row]), 0.0) * direction_scale)
    return inputs, kind, eps, zero_row


EXAMPLES = {"cpu": 80, "triton": 12}


@pytest.mark.parametrize("backend_name", FUSED_BACKENDS)
def test_properties(backend_name):
    """Against the reference (tolerance rule); per row ||r|| = eps over the valid positions, or 0 for a row
    with no valid position or a zero direction; r = 0 at padded positions."""
    require_backend(backend_name)

    @settings(max_examples=EXAMPLES[backend_name], deadline=None, derandomize=True, database=None)
    @given(case=perturbation_cases())
    def check(case):
        inputs, kind, eps, zero_row = case
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # iAT with B = 1
            r = check_perturbation_against_reference(backend_name, inputs, kind, eps)
        mask = inputs.mask if inputs.mask is not None else torch.ones_like(r, dtype=torch.bool)
        assert torch.equal(r[~mask], torch.zeros(int((~mask).sum()))), "r is not 0 at padded positions"
        norms = row_norms(r, mask)
        zero = ~mask.any(dim=-1)
        zero[zero_row] = True  # zero grad gives k_ij = 0 in iAT too
        if kind == "iat" and r.shape[0] == 1:
            zero[:] = True
        assert torch.equal(norms[zero], torch.zeros(int(zero.sum()), dtype=torch.float64)), norms
        if kind != "iat":  # iAT rows may also vanish when no other row shares a valid position
            # ||r|| = eps * ||v|| / max(||v||, delta) for the direction v
            direction_norms = row_norms(inputs.grad if kind == "at" else inputs.noise, mask)
            expected = eps * direction_norms / direction_norms.clamp_min(python_ref.DELTA)
            torch.testing.assert_close(norms[~zero], expected[~zero], rtol=1e-5, atol=1e-6)
        else:  # a nonzero iAT row has norm eps unless its gradient is so small that ||u|| < delta
            big_grad = row_norms(inputs.grad, mask) > 1e-3
            assert (norms <= eps * (1 + 1e-5) + 1e-6).all(), norms
            full = ~zero & big_grad & (norms > 0)
            torch.testing.assert_close(norms[full], torch.full_like(norms[full], eps), rtol=1e-5, atol=1e-6)

    check()


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_eps_zero_gives_zero(backend, kind):
    inputs = make_inputs(3, 8, 1, "padding", seed=2)
    r = _perturb(backend, inputs, kind, eps=0.0)
    assert torch.equal(r, torch.zeros_like(r))


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_padded_values_are_never_read(backend, kind):
    inputs = make_inputs(5, 17, 1, "empty_row", seed=3)
    results = [_perturb(backend, fill_padding(inputs, value), kind)
               for value in (0.0, float("nan"), float("inf"), -float("inf"), -1e30)]
    for r in results[1:]:
        assert torch.equal(r, results[0])
    assert torch.equal(results[0][~inputs.mask], torch.zeros(int((~inputs.mask).sum())))


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_is_a_constant_for_autograd(backend, kind):
    inputs = make_inputs(3, 6, 1, "padding", seed=4)
    scores = inputs.scores.clone().requires_grad_()
    grad = inputs.grad.clone().requires_grad_() if kind != "rp" else None
    noise = inputs.noise.clone().requires_grad_() if kind == "rp" else None
    r = fused_attn_at.perturbation(kind, scores, inputs.mask, grad=grad, noise=noise, backend=backend)
    assert not r.requires_grad and r.grad_fn is None
    assert r.abs().sum() > 0


def test_iat_metamorphic(backend):
    """iAT depends on the scores only through the normalised differences s_i - s_j: adding one vector to
    every row, or scaling all scores by c > 0, leaves r unchanged; scaling g by c > 0 too."""
    inputs = make_inputs(6, 20, 1, "none", seed=5, dtype=torch.float64)
    r = _perturb(backend, inputs, "iat")
    shifted = dataclasses.replace(inputs, scores=inputs.scores + torch.linspace(-3, 3, 20))
    scaled = dataclasses.replace(inputs, scores=inputs.scores * 7.0, grad=inputs.grad * 0.01)
    for other in (shifted, scaled):
        torch.testing.assert_close(_perturb(backend, other, "iat"), r, rtol=1e-9, atol=1e-12)
    # identical scores: every difference is zero, so r = 0
    same = dataclasses.replace(inputs, scores=inputs.scores[:1].expand(6, 20))
    assert torch.equal(_perturb(backend, same, "iat"), torch.zeros_like(r))


def test_iat_rows_without_shared_positions(backend):
    """D_ij uses the positions valid in both rows: rows with disjoint masks give each other no direction."""
    inputs = make_inputs(3, 6, 1, "none", seed=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    inputs = dataclasses.replace(inputs, mask=mask)
    r = check_perturbation_against_reference(backend, inputs, "iat")
    assert torch.equal(r[0], torch.zeros(6))  # row 0 shares no position with the others
    torch.testing.assert_close(row_norms(r, mask)[1:], torch.ones(2, dtype=torch.float64))


def test_at_is_the_normalised_gradient(backend):
    """AT with a gradient that is already of norm eps returns it unchanged (up to rounding)."""
    inputs = make_inputs(4, 30, 1, "padding", seed=7, dtype=torch.float64)
    g = python_ref.normalize_rows(inputs.grad, inputs.mask) * 2.5
    r = fused_attn_at.perturbation("at", inputs.scores, inputs.mask, grad=g, eps=2.5, backend=backend)
    torch.testing.assert_close(r, g, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# Consistency with attention_pool, random noise


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_attention_pool_uses_the_same_perturbation(backend, kind):
    inputs = make_inputs(4, 11, 3, "empty_row", seed=8, dtype=torch.float64)
    r = _perturb(backend, inputs, kind, eps=1.5)
    out = fused_attn_at.attention_pool(inputs.h, inputs.scores, inputs.mask, backend=backend,
                                       **inputs.kwargs(kind, eps=1.5))
    torch.testing.assert_close(out.attention, python_ref.masked_softmax(inputs.scores + r, inputs.mask),
                               rtol=1e-12, atol=1e-14)


def test_rp_noise_from_a_seeded_generator(backend):
    """Without noise=, RP draws a standard normal [B, T] from the generator: the same seed gives the same r,
    equal to the reference's with the same seed and to noise drawn by hand; another seed gives another r."""
    inputs = make_inputs(4, 12, 3, "padding", seed=9)

    def rp(seed: int, **kwargs):
        return fused_attn_at.perturbation("rp", inputs.scores, inputs.mask, eps=2.0, backend=backend,
                                          generator=torch.Generator().manual_seed(seed), **kwargs)

    r = rp(123)
    assert torch.equal(rp(123), r)
    assert not torch.allclose(rp(124), r)
    reference = python_ref.perturbation("rp", inputs.scores, inputs.mask, eps=2.0,
                                        generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(r, reference)
    noise = torch.randn(inputs.scores.shape, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(r, python_ref.rp_perturbation(noise, inputs.mask, 2.0))
    # attention_pool draws the same noise from the same seed
    out = fused_attn_at.attention_pool(inputs.h, inputs.scores, inputs.mask, perturbation="rp", eps=2.0,
                                       backend=backend, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(out.attention, python_ref.masked_softmax(inputs.scores + r, inputs.mask))
    # with neither noise nor generator, the global RNG is used
    torch.manual_seed(5)
    first = fused_attn_at.perturbation("rp", inputs.scores, inputs.mask, backend=backend)
    torch.manual_seed(5)
    assert torch.equal(fused_attn_at.perturbation("rp", inputs.scores, inputs.mask, backend=backend), first)


# ---------------------------------------------------------------------------------------------------------
# Word-level perturbations (reference only: there is no fused kernel for them)


def test_word_at_norm_over_the_example():
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(3, 7, 5, generator=generator, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 0])[:, None]
    r = python_ref.word_at_perturbation(grad, mask, eps=0.7)
    norms = r.flatten(1).norm(dim=-1)
    torch.testing.assert_close(norms, torch.tensor([0.7, 0.7, 0.0], dtype=torch.float64))
    assert torch.equal(r[~mask], torch.zeros_like(r[~mask]))
    # the direction is the gradient's
    cos = torch.nn.functional.cosine_similarity(r[0].flatten(), grad[0].flatten(), dim=0)
    torch.testing.assert_close(cos, torch.tensor(1.0, dtype=torch.float64))


def test_nearest_neighbours_exclude_the_word_itself():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    got = python_ref.nearest_neighbours(weight, k=3, chunk=16)  # several chunks
    distances = torch.cdist(weight, weight)
    distances.fill_diagonal_(float("inf"))
    expected = distances.topk(3, largest=False).indices
    assert torch.equal(got, expected)
    assert not (got == torch.arange(50)[:, None]).any()


def test_word_iat_with_one_neighbour_points_at_it():
    """With K = 1 the direction of token t is +-(w_k - w_t), signed by the gradient; norm eps per example."""
    generator = torch.Generator().manual_seed(2)
    embedded = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    neighbours = torch.randn(2, 4, 1, 3, generator=generator, dtype=torch.float64)
    grad = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    r = python_ref.word_iat_perturbation(embedded, grad, neighbours, eps=1.3)
    torch.testing.assert_close(r.flatten(1).norm(dim=-1), torch.full((2,), 1.3, dtype=torch.float64))
    towards = neighbours[:, :, 0] - embedded  # [B, T, E]
    cos = torch.nn.functional.cosine_similarity(r, towards, dim=-1)  # [B, T]
    sign = torch.sign((grad * towards).sum(-1))
    torch.testing.assert_close(cos, sign)


def test_word_iat_matches_its_definition_term_by_term():
    """K = 3 with padding, against d_tk = normalize(w_k - w_t), u_t = sum_k <g_t, d_tk> d_tk written as loops."""
    generator = torch.Generator().manual_seed(3)
    B, T, K, E = 3, 5, 3, 4
    embedded = torch.randn(B, T, E, generator=generator, dtype=torch.float64)
    neighbours = torch.randn(B, T, K, E, generator=generator, dtype=torch.float64)
    neighbours[1, 2, 0] = embedded[1, 2]  # a neighbour equal to the word: zero direction, not nan
    grad = torch.randn(B, T, E, generator=generator, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    u = torch.zeros(B, T, E, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for k in range(K):
                diff = neighbours[b, t, k] - embedded[b, t]
                if diff.norm() > 0:
                    d = diff / diff.norm()
                    u[b, t] += torch.dot(grad[b, t], d) * d
    u[~mask] = 0.0
    expected = 0.7 * u / u.flatten(1).norm(dim=-1)[:, None, None]
    got = python_ref.word_iat_perturbation(embedded, grad, neighbours, mask, eps=0.7)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert torch.isfinite(python_ref.word_iat_perturbation(embedded.float(), grad.float(), neighbours.float(),
                                                          mask, eps=0.7)).all()
