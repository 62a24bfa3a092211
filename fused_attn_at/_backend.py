"""Which implementation runs: the user's choice (argument, then FUSED_ATTN_AT_BACKEND), else the best one
that works for the tensors' device."""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")
ENV_VAR = "FUSED_ATTN_AT_BACKEND"

_warned_fallback: set[str] = set()


def _cpp_status() -> tuple[bool, bool, str]:
    """(cpu kernel built, cuda kernel built, why not) for the compiled extension."""
    from .ops import cpp

    return cpp.CPU_AVAILABLE, cpp.CUDA_AVAILABLE, cpp.UNAVAILABLE_REASON


def _triton_status() -> tuple[bool, str]:
    # An optional backend whose module cannot even be imported (numpy or triton missing or broken) is
    # unavailable, with the reason: asking what is available must never crash.
    try:
        from .ops import triton_attention_pool as tri
    except Exception as exc:
        return False, f"fused_attn_at.ops.triton_attention_pool does not import: {type(exc).__name__}: {exc}"
    return tri.AVAILABLE, tri.UNAVAILABLE_REASON


def _triton_runs_on(device: torch.device) -> bool:
    # Triton runs CUDA tensors, or CPU tensors under its interpreter (TRITON_INTERPRET=1, used by the tests);
    # never meta tensors, which hold no data for the interpreter to run on.
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run tensors on `device`, else the reason and how to get it."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        cpu_ok, cuda_ok, reason = _cpp_status()
        if backend == "cpu":
            if device.type != "cpu":
                return f"backend 'cpu' runs CPU tensors only; the inputs are on {device}"
            return None if cpu_ok else (
                f"the C++ extension fused_attn_at._C is not importable ({reason}); build it with "
                "`pip install --no-build-isolation .` from the repository (torch must be installed first), or "
                "let the first import compile it (needs a C++ compiler and ninja; see README, Troubleshooting)"
            )
        if device.type != "cuda":
            return f"backend 'cuda' runs CUDA tensors only; the inputs are on {device}"
        return None if cuda_ok else (
            "the CUDA kernels of fused_attn_at._C were not built; rebuild with a CUDA build of torch and nvcc "
            "on the PATH (CUDA_HOME set to the toolkit root), without FUSED_ATTN_AT_NO_CUDA=1"
            + (f" ({reason})" if reason else "")
        )
    if backend == "triton":
        ok, reason = _triton_status()
        if not ok:
            return f"Triton is not usable ({reason}); `pip install 'triton>=3.7'`"
        if not _triton_runs_on(device):
            return (f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                    f"triton, for CPU tensors); the inputs are on {device}")
        return None
    raise ValueError(f"backend must be one of None, {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend to run on `device`: `requested` (or $FUSED_ATTN_AT_BACKEND) if given, else the best."""
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}={requested!r}"
    else:
        source = f"backend={requested!r}"
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source}: expected one of {', '.join(repr(b) for b in BACKENDS)}")
        reason = why_unavailable(requested, device)
        if reason is not None:
            raise RuntimeError(f"{source} is not available: {reason}")
        return requested
    candidates = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    for backend in candidates:
        if why_unavailable(backend, device) is None:
            return backend
    key = device.type
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        reasons = "; ".join(f"{b}: {why_unavailable(b, device)}" for b in candidates)
        warnings.warn(f"fused_attn_at: no fused kernel for {device.type} tensors ({reasons}); "
                      "falling back to the slow pure-PyTorch reference", RuntimeWarning, stacklevel=3)
    return "reference"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run tensors on `device` here, best first."""
    device = torch.device(device)
    return [b for b in BACKENDS if why_unavailable(b, device) is None]
