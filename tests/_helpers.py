"""Shared test utilities: which fused backends must be tested, input generators, and the tolerance rule.

Tolerance rule (flash-attention style): a backend's float32 result may be off from the float64 reference by at
most twice what the reference itself loses in float32, plus a small absolute slack:

    err(backend in float32) <= 2 * err(reference in float32) + ATOL

where err(x) is the relative error of x against the reference computed in float64 from the very same
(float32-representable) inputs, measured per tensor as max|x - x64| / max|x64|.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from typing import Callable

import pytest
import torch

import fused_attn_at
import python_ref
from fused_attn_at._backend import why_unavailable

# The fused backends a CPU machine runs: the C++ extension and Triton (under its interpreter, see conftest.py).
# "reference" is not among them: it IS python_ref, and comparing it with python_ref would test nothing.
FUSED_BACKENDS = ("cpu", "triton")
KINDS = (None, "at", "iat", "rp")
MASK_PATTERNS = ("none", "padding", "empty_row")
# Relative slack of the tolerance rule; ~80 float32 ulps, far below any real bug.
ATOL = 1e-5


def require_backend(backend: str, device: torch.device | str = "cpu") -> None:
    """Fail (not skip) when an expected backend is unavailable. The only allowed skips, with their reason
    printed: "cpu" when the extension was deliberately not built (FUSED_ATTN_AT_NO_EXT=1), "triton" when
    triton is not installed."""
    reason = why_unavailable(backend, torch.device(device))
    if reason is None:
        return
    if backend == "cpu" and os.environ.get("FUSED_ATTN_AT_NO_EXT") == "1":
        pytest.skip(f"backend 'cpu' skipped because FUSED_ATTN_AT_NO_EXT=1: {reason}")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip(f"backend 'triton' skipped because triton is not installed: {reason}")
    if backend == "triton" and torch.device(device).type == "cpu" and torch.cuda.is_available():
        # conftest.py turns the interpreter on only without a GPU; here Triton runs CUDA tensors instead,
        # which the CUDA tests cover.
        pytest.skip(f"backend 'triton' on CPU tensors skipped on a CUDA machine (no interpreter): {reason}")
    pytest.fail(f"backend {backend!r} is expected on this machine but is unavailable: {reason}", pytrace=False)


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request) -> str:
    """Each fused backend in turn (import this fixture into a test module to use it)."""
    require_backend(request.param)
    return request.param


# ---------------------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True)
class Inputs:
    h: torch.Tensor  # [B, T, H]
    scores: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, T] bool
    grad: torch.Tensor  # [B, T], the "dL_clean/dscores" given to AT/iAT
    noise: torch.Tensor  # [B, T], the standard normal draw given to RP

    def to(self, dtype: torch.dtype) -> "Inputs":
        """The same values in another float dtype (mask unchanged). Going up from float32 is exact."""
        return Inputs(self.h.to(dtype), self.scores.to(dtype), self.mask, self.grad.to(dtype), self.noise.to(dtype))

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh leaf copies of (h, scores) that require grad."""
        return self.h.detach().clone().requires_grad_(), self.scores.detach().clone().requires_grad_()

    def kwargs(self, kind: str | None, eps: float = 1.0) -> dict:
        """The perturbation keyword arguments of attention_pool / perturbation for `kind`."""
        return dict(
            perturbation=kind,
            grad=self.grad if kind in ("at", "iat") else None,
            noise=self.noise if kind == "rp" else None,
            eps=eps,
        )

    def perturbation_kwargs(self, kind: str, eps: float = 1.0) -> dict:
        kwargs = self.kwargs(kind, eps)
        del kwargs["perturbation"]
        return kwargs


def make_mask(batch: int, length: int, pattern: str, generator: torch.Generator) -> torch.Tensor | None:
    """ "none": None (all real); "padding": right padding with random lengths in [1, T], the last row full;
    "empty_row": the same with row 0 fully masked; "scattered": random holes anywhere.  -> [B, T] bool"""
    if pattern == "none":
        return None
    if pattern == "scattered":
        mask = torch.rand(batch, length, generator=generator) < 0.7
        mask[:, 0] = True
        return mask
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[-1] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    if pattern == "empty_row":
        mask[0] = False
    elif pattern != "padding":
        raise ValueError(f"unknown mask pattern {pattern!r}")
    return mask


def make_inputs(
    batch: int,
    length: int,
    hidden: int,
    mask: str = "padding",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    score_scale: float = 2.0,
) -> Inputs:
    """Random inputs drawn in float32 (so that .to(torch.float64) holds the very same values)."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=generator)
    scores = torch.randn(batch, length, generator=generator) * score_scale
    grad = torch.randn(batch, length, generator=generator)
    noise = torch.randn(batch, length, generator=generator)
    return Inputs(h, scores, make_mask(batch, length, mask, generator), grad, noise).to(dtype)


def fill_padding(inputs: Inputs, value: float) -> Inputs:
    """`inputs` with `value` (e.g. nan or inf) in scores, grad and noise at the padded positions, which no
    implementation may read."""
    if inputs.mask is None:
        return inputs
    pad = ~inputs.mask
    return dataclasses.replace(
        inputs,
        scores=inputs.scores.masked_fill(pad, value),
        grad=inputs.grad.masked_fill(pad, value),
        noise=inputs.noise.masked_fill(pad, value),
    )

@contextlib.contextmanager
def cpu_kernel_paths(monkeypatch, isa: str):
    """Runs the CPU kernels on 2 threads (so long rows split into feature chunks), with isa "best" (what the
    machine has) or "default" (the portable build, FUSED_ATTN_AT_CPU_ISA)."""
    from fused_attn_at.ops import cpp

    if isa == "default":
        monkeypatch.setenv("FUSED_ATTN_AT_CPU_ISA", "default")
        assert cpp.cpu_isa() == "default"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def padded_float64_inputs(B: int, T: int, H: int, seed: int) -> "Inputs":
    """float64 inputs whose row 0 is fully masked when B > 1 (make_inputs' "empty_row"), and whose single row is
    padded to 2T/3 when B == 1 (make_inputs keeps the last row full)."""
    inputs = make_inputs(B, T, H, "empty_row", seed=seed, dtype=torch.float64)
    if B == 1:
        inputs = dataclasses.replace(inputs, mask=torch.arange(T)[None, :] < (2 * T) // 3)
    return inputs



def cotangents(inputs: Inputs, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random upstream gradients for (context [B, H], attention [B, T]), in the inputs' dtype."""
    batch, length, hidden = inputs.h.shape
    generator = torch.Generator().manual_seed(seed)
    grad_context = torch.randn(batch, hidden, generator=generator)
    grad_attention = torch.randn(batch, length, generator=generator)
    return grad_context.to(inputs.h.dtype), grad_attention.to(inputs.h.dtype)


# ---------------------------------------------------------------------------------------------------------
# Running an implementation and comparing with the reference


def fused_pool(backend: str) -> Callable:
    """fused_attn_at.attention_pool forced onto `backend`."""
    def pool(h, scores, mask=None, **kwargs):
        return fused_attn_at.attention_pool(h, scores, mask, backend=backend, **kwargs)
    return pool


def pool_with_grads(pool: Callable, inputs: Inputs, kind: str | None, eps: float = 1.0,
                    used: tuple[str, ...] = ("context", "attention")) -> dict[str, torch.Tensor]:
    """Forward and backward of `pool` (python_ref.attention_pool or fused_pool(b)): context, attention, and
    the gradients wrt h and scores of the loss <dc, context> + <da, attention>, restricted to the outputs
    named in `used` (the others get no gradient at all)."""
    h, scores = inputs.leaves()
    out = pool(h, scores, inputs.mask, **inputs.kwargs(kind, eps))
    dc, da = cotangents(inputs)
    loss = sum((getattr(out, name) * {"context": dc, "attention": da}[name]).sum() for name in used)
    grad_h, grad_scores = torch.autograd.grad(loss, (h, scores), allow_unused=True)
    # an output left unused may leave an input without gradient: that gradient is zero
    grad_h = torch.zeros_like(h) if grad_h is None else grad_h
    grad_scores = torch.zeros_like(scores) if grad_scores is None else grad_scores
    return dict(context=out.context.detach(), attention=out.attention.detach(), grad_h=grad_h, grad_scores=grad_scores)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (in float64); 0 for empty tensors; nan if actual holds nan."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    scale = float(e.abs().max())
    return float((a - e).abs().max()) / max(scale, torch.finfo(torch.float64).tiny)


def assert_within_rule(actual: dict[str, torch.Tensor], reference64: dict[str, torch.Tensor],
                       reference_low: dict[str, torch.Tensor], atol: float = ATOL, what: str = "") -> None:
    """The tolerance rule, tensor by tensor; `actual` must also have the dtype of `reference_low`."""
    failures = []
    for name, expected in reference64.items():
        got = actual[name]
        if got.dtype != reference_low[name].dtype:
            failures.append(f"{name}: dtype {got.dtype}, expected {reference_low[name].dtype}")
            continue
        if got.shape != expected.shape:
            failures.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
            continue
        err = relative_error(got, expected)
        bound = 2.0 * relative_error(reference_low[name], expected) + atol
        if not err <= bound:  # also catches nan
            failures.append(f"{name}: relative error {err:.3g} > bound {bound:.3g}")
    assert not failures, f"{what}: " + "; ".join(failures)


def check_against_reference(backend: str, inputs: Inputs, kind: str | None, eps: float = 1.0,
                            used: tuple[str, ...] = ("context", "attention"), what: str = "") -> None:
    """Forward and backward of `backend` on `inputs` (float32, or lower) against python_ref, under the
    tolerance rule: the reference in the inputs' dtype and in float64 set the bound."""
    actual = pool_with_grads(fused_pool(backend), inputs, kind, eps, used)
    reference_low = pool_with_grads(python_ref.attention_pool, inputs, kind, eps, used)
    reference64 = pool_with_grads(python_ref.attention_pool, inputs.to(torch.float64), kind, eps, used)
    assert_within_rule(actual, reference64, reference_low, what=what or f"{backend} kind={kind} eps={eps}")


def check_perturbation_against_reference(backend: str, inputs: Inputs, kind: str, eps: float = 1.0,
                                         what: str = "") -> torch.Tensor:
    """fused_attn_at.perturbation on `backend` against python_ref.perturbation under the tolerance rule;
    returns the backend's r."""
    r = fused_attn_at.perturbation(kind, inputs.scores, inputs.mask, backend=backend,
                                   **inputs.perturbation_kwargs(kind, eps))
    r32 = python_ref.perturbation(kind, inputs.scores, inputs.mask, **inputs.perturbation_kwargs(kind, eps))
    inputs64 = inputs.to(torch.float64)
    r64 = python_ref.perturbation(kind, inputs64.scores, inputs64.mask, **inputs64.perturbation_kwargs(kind, eps))
    assert not r.requires_grad, "the perturbation must be a constant for autograd"
    assert_within_rule(dict(r=r), dict(r=r64), dict(r=r32), what=what or f"{backend} perturbation {kind} eps={eps}")
    return r


def row_norms(r: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """||r_b||_2 over the valid positions of each row, in float64.  # [B, T] -> [B]"""
    r = r.double()
    if mask is not None:
        r = r.masked_fill(~mask, 0.0)
    return r.norm(dim=-1)


# ---------------------------------------------------------------------------------------------------------
# float16 / bfloat16: the ulp rule

# Slack of the ulp rule, in ulps of the dtype at each element's magnitude.
LOW_PRECISION_ULPS = 2


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x as rows along its last dimension (context [B, H] -> B rows of H, grad_h [B, T, H] -> B*T rows of H),
    in float64.  # -> [rows, last]"""
    x = x.detach().double()
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (float64 in and out; the smallest normal's spacing near zero)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(info.smallest_normal)))) * info.eps


def ulp_rule_violations(actual: torch.Tensor, reference64: torch.Tensor, reference32: torch.Tensor,
                        dtype: torch.dtype, ulps: float = LOW_PRECISION_ULPS) -> tuple[int, float]:
    """(rows holding an element out of the rule, the worst ratio error / bound) of a float16/bfloat16 result.

    The rule, element by element: a kernel that reads and writes `dtype` but accumulates in float32 lands
    within the float32 result rounded to `dtype` plus `ulps` ulps of `dtype` at the element's own magnitude:

        |x - x64| <= |round_dtype(x32) - x64| + ulps * ulp_dtype(x64)

    x64 is the reference in float64 and x32 the reference in float32, both from the very same (low precision)
    inputs. Element by element, not against the max of the whole tensor (nor of a row): a small value is held
    to its own scale, so an error that a large neighbour would hide is still caught."""
    a, r64 = rows_of(actual), rows_of(reference64)
    r32 = rows_of(reference32.detach().to(dtype))
    if a.numel() == 0:
        return 0, 0.0
    err = (a - r64).abs()
    bound = (r32 - r64).abs() + ulps * ulp(r64, dtype)
    bad = ~(err <= bound)  # also catches nan
    ratio = (err / bound).nan_to_num(float("inf"))
    return int(bad.any(dim=1).sum()), float(ratio.max())


def assert_within_ulp_rule(actual: dict[str, torch.Tensor], reference64: dict[str, torch.Tensor],
                           reference32: dict[str, torch.Tensor], dtype: torch.dtype,
                           ulps: float = LOW_PRECISION_ULPS, what: str = "") -> None:
    """ulp_rule_violations for every tensor of a pool_with_grads result; `actual` must have dtype `dtype`."""
    failures = []
    for name, expected in reference64.items():
        got = actual[name]
        if got.dtype != dtype or got.shape != expected.shape:
            failures.append(f"{name}: {got.dtype} {tuple(got.shape)}, expected {dtype} {tuple(expected.shape)}")
            continue
        rows, worst = ulp_rule_violations(got, expected, reference32[name], dtype, ulps)
        if rows:
            failures.append(f"{name}: {rows} rows out of the {ulps}-ulp rule (worst error {worst:.3g}x the bound)")
    assert not failures, f"{what}: " + "; ".join(failures)


def low_precision_references(inputs: Inputs, kind: str | None, eps: float = 1.0,
                             used: tuple[str, ...] = ("context", "attention")) -> tuple[dict, dict]:
    """(reference in float64, reference in float32) of pool_with_grads from the low precision inputs' values.

    The op returns the attention in the inputs' dtype and its backward reads that saved attention (SPEC), so
    the float32 reference's gradients are computed, in float32, from the float32 reference attention rounded
    to the dtype: grad_h = a dc, grad_scores = a (da - <a, da>), da = h dc + dattention. (From the unrounded
    attention instead, a float32-accumulating kernel is off by the rounding of a_t times |da_t - <a, da>|,
    which a small grad_scores row does not cover.)"""
    import warnings

    dtype = inputs.h.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iAT with a batch of one
        reference64 = pool_with_grads(python_ref.attention_pool, inputs.to(torch.float64), kind, eps, used)
        reference32 = pool_with_grads(python_ref.attention_pool, inputs.to(torch.float32), kind, eps, used)
    a = reference32["attention"].to(dtype).float()
    dc, da_up = (c.float() for c in cotangents(inputs))
    h = inputs.h.float()
    dc = dc if "context" in used else torch.zeros_like(dc)
    da = torch.bmm(h, dc[:, :, None]).squeeze(-1) + (da_up if "attention" in used else 0.0)
    reference32["grad_h"] = a[:, :, None] * dc[:, None, :]
    reference32["grad_scores"] = a * (da - (a * da).sum(-1, keepdim=True))
    return reference64, reference32


def check_low_precision_against_reference(backend: str, inputs: Inputs, kind: str | None, eps: float = 1.0,
                                          used: tuple[str, ...] = ("context", "attention"), what: str = "",
                                          pool: Callable | None = None) -> None:
    """Forward and backward of `backend` (or of `pool`) on float16/bfloat16 `inputs` under the ulp rule."""
    actual = pool_with_grads(pool or fused_pool(backend), inputs, kind, eps, used)
    reference64, reference32 = low_precision_references(inputs, kind, eps, used)
    assert_within_ulp_rule(actual, reference64, reference32, inputs.h.dtype,
                           what=what or f"{backend} {inputs.h.dtype} kind={kind} eps={eps}")


# ---------------------------------------------------------------------------------------------------------
# Hypothesis: random (inputs, kind, eps) cases of attention_pool


def pool_cases(max_batch: int = 5, max_length: int = 40, max_hidden: int = 17):
    """A hypothesis strategy of (Inputs with a drawn mask: none, right padding with possibly empty rows, or any
    pattern; kind; eps)."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        batch = draw(st.integers(1, max_batch))
        length = draw(st.integers(1, max_length))
        hidden = draw(st.integers(1, max_hidden))
        mask_kind = draw(st.sampled_from(("none", "lengths", "any")))
        if mask_kind == "none":
            mask = None
        elif mask_kind == "lengths":  # right padding, a length may be 0 (fully masked row)
            lengths = draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
            mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
        else:
            bits = draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
            mask = torch.tensor(bits, dtype=torch.bool).reshape(batch, length)
        kind = draw(st.sampled_from(KINDS))
        eps = draw(st.one_of(st.sampled_from((0.0, 1.0)), st.floats(0.0, 20.0)))
        scale = draw(st.sampled_from((0.1, 2.0, 10.0)))
        seed = draw(st.integers(0, 2**16))
        inputs = make_inputs(batch, length, hidden, "none", seed=seed, score_scale=scale)
        return dataclasses.replace(inputs, mask=mask), kind, eps

    return cases()
