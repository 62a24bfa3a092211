"""Input checks shared by the reference and every backend: bad input fails here, with a message that names
the argument and what was expected, before any kernel sees it."""
from __future__ import annotations

import math
import os
import sys
import warnings

import torch

PERTURBATIONS = ("at", "iat", "rp")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


# frames in these folders are this library's or torch's dispatch, not the caller's
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (
    __file__, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fused_attn_at", "x"),
    torch.__file__))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn pointing at the first frame outside python_ref, fused_attn_at and torch (the user's call),
    however deep the dispatch (custom op, autograd, backend) went."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def warn_iat_batch_of_one() -> None:
    """iAT's direction lies in the span of the batch's score differences: with one example it is 0, and so is r."""
    if not _is_compiling():
        warn_at_caller("iAT perturbation with a batch of one: there are no other examples to take score "
                       "differences from, so r = 0")


def _check_tensor(name: str, x, ndim: int, shape_text: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_text}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_text} ({ndim} dims), got shape {tuple(x.shape)}")


def _check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")


def _check_like_scores(name: str, x, scores: torch.Tensor) -> None:
    _check_tensor(name, x, 2, "[B, T] like scores")
    _check_float(name, x)
    if x.shape != scores.shape:
        raise ValueError(f"{name} must have the shape of scores {tuple(scores.shape)} ([B, T]), got {tuple(x.shape)}")
    if x.device != scores.device:
        raise ValueError(f"{name} must be on the device of scores ({scores.device}), got {x.device}")


def check_mask(mask, scores: torch.Tensor) -> None:
    if mask is None:
        return
    _check_tensor("mask", mask, 2, "[B, T] bool (True at real tokens)")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor [B, T] (True at real tokens), got dtype {mask.dtype}")
    if mask.shape != scores.shape:
        raise ValueError(f"mask must have the shape of scores {tuple(scores.shape)} ([B, T]), got {tuple(mask.shape)}")
    if mask.device != scores.device:
        raise ValueError(f"mask must be on the device of scores ({scores.device}), got {mask.device}")


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a real number >= 0, got {type(eps).__name__}")
    # comparisons rather than math.isfinite, which torch.compile(dynamic=True) cannot trace on a symbolic float
    if not 0 <= eps < math.inf:  # also false for NaN
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")


def check_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Values at real positions must be finite (padded positions are never read). Skipped while tracing
    under torch.compile, where a data-dependent check would break the graph, and for meta tensors, which
    hold no values (shape inference)."""
    if _is_compiling() or x.device.type == "meta":
        return
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        raise ValueError(f"{name} holds NaN or inf at real (unmasked) positions; expected finite values")


def check_values(scores, mask, grad, noise) -> None:
    """The finiteness checks of the inputs' values (after their shapes and dtypes were checked)."""
    check_finite("scores", scores, mask)
    if grad is not None:
        check_finite("grad", grad, mask)
    if noise is not None:
        check_finite("noise", noise, mask)


def check_perturbation_inputs(kind, scores, mask, grad, noise, eps, *, required: bool, values: bool = True) -> None:
    """Checks for `perturbation(kind, ...)`; with required=False, kind may also be None (no perturbation).
    values=False leaves out the finiteness of the values (check_values), for a kernel that checks them
    while it reads them."""
    if kind is None and not required:
        pass
    elif not isinstance(kind, str) or kind not in PERTURBATIONS:
        allowed = ("None, " if not required else "") + ", ".join(repr(p) for p in PERTURBATIONS)
        raise ValueError(f"perturbation must be one of {allowed}; got {kind!r}")
    _check_tensor("scores", scores, 2, "[B, T]")
    _check_float("scores", scores)
    check_mask(mask, scores)
    check_eps(eps)
    if kind in ("at", "iat"):
        if grad is None:
            raise ValueError(
                f"grad (dL_clean/dscores, [B, T]) is required for perturbation={kind!r}; compute it with "
                "torch.autograd.grad(loss_clean, scores, retain_graph=True)"
            )
        _check_like_scores("grad", grad, scores)
    elif grad is not None and kind is not None:
        raise ValueError(f"grad is only used by perturbation='at' or 'iat', not {kind!r}; pass grad=None")
    if kind == "rp" and noise is not None:
        _check_like_scores("noise", noise, scores)
    elif noise is not None:
        raise ValueError(f"noise is only used by perturbation='rp', not {kind!r}; pass noise=None")
    if kind is None and grad is not None:
        raise ValueError("grad was given but perturbation is None; pass perturbation='at' or 'iat'")
    if values:
        check_values(scores, mask, grad, noise)


def check_attention_inputs(h, scores, mask, kind, grad, noise, eps, *, values: bool = True) -> None:
    """Checks for `attention_pool(h, scores, mask, perturbation=kind, ...)` (values: see
    check_perturbation_inputs)."""
    _check_tensor("h", h, 3, "[B, T, H]")
    _check_float("h", h)
    _check_tensor("scores", scores, 2, "[B, T]")
    if h.shape[:2] != scores.shape:
        raise ValueError(
            f"h [B, T, H] and scores [B, T] must agree on B and T: h has {tuple(h.shape)}, scores has {tuple(scores.shape)}"
        )
    if h.device != scores.device:
        raise ValueError(f"h and scores must be on one device: h is on {h.device}, scores on {scores.device}")
    if h.dtype != scores.dtype:
        raise TypeError(f"scores must have the dtype of h ({h.dtype}), got {scores.dtype}")
    check_perturbation_inputs(kind, scores, mask, grad, noise, eps, required=False, values=values)
