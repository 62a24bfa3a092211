"""The CUDA device code (csrc/cuda/attention_pool_kernels.cu) without a GPU.

1. nvcc compiles it, with no torch headers, for sm_80 and sm_90, with the flags torch's CUDAExtension adds
   (skipped, with the reason printed, only where nvcc is absent).
2. The C header compiles as C.
3. g++ builds the same file against a CPU emulation of CUDA (csrc/cuda/cpu_emulation/: the threads of a block
   run as host threads, __syncthreads is a barrier, warp shuffles exchange values), and the launchers, called
   through ctypes exactly as the torch binding calls them, are checked against python_ref under the tolerance
   rule: every perturbation, mask patterns, vector and scalar paths, several column groups and position
   chunks, float64/float16/bfloat16, views. This checks the kernels' arithmetic and indexing; the GPU's memory
   model and speed are checked by tests/test_gpu.py on a GPU.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import pathlib
import shutil
import subprocess
import time
import warnings

import pytest
import torch

import python_ref
from _helpers import (
    KINDS,
    Inputs,
    assert_within_rule,
    cotangents,
    make_inputs,
    pool_with_grads,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
KERNELS = CUDA_DIR / "attention_pool_kernels.cu"
HEADER = CUDA_DIR / "attention_pool_cuda.h"
# The flags torch.utils.cpp_extension gives every .cu file, plus setup.py's own.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
SETUP_NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "-DFUSED_ATTN_AT_WITH_CUDA=1"]


def _nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (pathlib.Path(root) / "bin" / "nvcc").exists():
            return str(pathlib.Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuobjdump() -> str | None:
    """cuobjdump from the toolkit, or the one Triton's wheel carries."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def test_nvcc_compiles_device_code_for_sm80_and_sm90(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc or nvcc on PATH): "
                    "the device code compile check needs the CUDA toolkit")
    obj = tmp_path / "attention_pool_kernels.o"
    cmd = [nvcc, *SETUP_NVCC_FLAGS, *TORCH_NVCC_FLAGS,
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-Xptxas", "-warn-spills", "-c", str(KERNELS), "-o", str(obj)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(f"nvcc sm_80 + sm_90: {time.perf_counter() - start:.1f} s, exit {proc.returncode}")
    print(proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert obj.stat().st_size > 0
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found: the object's architectures are not listed")
        return
    listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout


def test_header_is_plain_c():
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (gcc or cc) on PATH")
    proc = subprocess.run([compiler, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-fsyntax-only",
                           "-x", "c", str(HEADER)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------------------
# The device code run on the CPU emulation


class View(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride", ctypes.c_int64 * 3)]


FA_DTYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _view(x: torch.Tensor | None) -> View:
    if x is None:
        return View(None, (ctypes.c_int64 * 3)(0, 0, 0))
    strides = list(x.stride()) + [0] * (3 - x.dim())
    return View(x.data_ptr(), (ctypes.c_int64 * 3)(*strides))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The kernels built with g++ against the CPU emulation, as a ctypes library."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: the CPU emulation of the CUDA kernels cannot be built")
    library = tmp_path_factory.mktemp("cuda_emulation") / "libfa_cuda_emulated.so"
    cmd = [compiler, "-x", "c++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra",
           "-Wno-unknown-pragmas", "-Werror", "-DFA_CPU_EMULATION", "-I", str(CUDA_DIR / "cpu_emulation"),
           str(KERNELS), "-o", str(library)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(f"g++ CPU emulation build: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    i64, dbl, ptr, i32 = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    lib.fa_cuda_iat_coefficients.argtypes = [i32, i64, i64, View, View, View, ptr, ptr]
    lib.fa_cuda_perturbation.argtypes = [i32, i32, i32, i64, i64, dbl, View, View, View, ptr, View, ptr]
    lib.fa_cuda_attention_pool_fwd.argtypes = [i32, i32, i64, i64, i64, dbl, View, View, View, View, View, View,
                                               i32, ptr]
    lib.fa_cuda_attention_pool_bwd.argtypes = [i32, i64, i64, i64, View, View, View, View, View, View, ptr, i32,
                                               ptr]
    for name in ("fa_cuda_iat_coefficients", "fa_cuda_perturbation", "fa_cuda_attention_pool_fwd",
                 "fa_cuda_attention_pool_bwd"):
        getattr(lib, name).restype = i32
    return lib


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _perturbation(lib, scores, mask, direction, kind, eps, out, out_is_acc):
    """What attention_pool_binding.cpp's launch_perturbation does."""
    B, T = scores.shape
    dtype = FA_DTYPE[scores.dtype]
    coeff = None
    if kind == 2:
        coeff = torch.full((B, B), float("nan"), dtype=_acc(scores.dtype))
        assert lib.fa_cuda_iat_coefficients(dtype, B, T, _view(scores), _view(mask), _view(direction),
                                            coeff.data_ptr(), None) == 0
    assert lib.fa_cuda_perturbation(dtype, kind, int(out_is_acc), B, T, eps, _view(scores), _view(mask),
                                    _view(direction), None if coeff is None else coeff.data_ptr(), _view(out),
                                    None) == 0


def emulated_forward(lib, h, scores, mask, direction, kind, eps, sms):
    """(context, attention) as attention_pool_fwd_cuda computes them; outputs poisoned with NaN first."""
    B, T, H = h.shape
    context = torch.full((B, H), float("nan"), dtype=h.dtype)
    attention = torch.full((B, T), float("nan"), dtype=h.dtype)
    perturb, given = 0, None
    if kind == 1:
        perturb, given = 1, direction
    elif kind == 2:
        perturb, given = 2, torch.full((B, T), float("nan"), dtype=_acc(h.dtype))
        _perturbation(lib, scores, mask, direction, 2, eps, given, out_is_acc=True)
    assert lib.fa_cuda_attention_pool_fwd(FA_DTYPE[h.dtype], perturb, B, T, H, eps, _view(h), _view(scores),
                                          _view(mask), _view(given), _view(context), _view(attention), sms,
                                          None) == 0
    return context, attention


def emulated_backward(lib, grad_context, grad_attention, h, attention, sms):
    B, T, H = h.shape
    grad_h = torch.empty_like(h).fill_(float("nan"))
    grad_scores = torch.full((B, T), float("nan"), dtype=h.dtype)
    da = torch.full((B, T), float("nan"), dtype=_acc(h.dtype))
    assert lib.fa_cuda_attention_pool_bwd(FA_DTYPE[h.dtype], B, T, H, _view(grad_context), _view(grad_attention),
                                          _view(h), _view(attention), _view(grad_h), _view(grad_scores),
                                          da.data_ptr(), sms, None) == 0
    return grad_h, grad_scores


KIND_CODE = {None: 0, "at": 1, "rp": 1, "iat": 2}


def emulated_pool_with_grads(lib, inputs: Inputs, kind, eps=1.0, sms=4, used=("context", "attention")):
    """The emulated kernels' counterpart of _helpers.pool_with_grads (same cotangents)."""
    direction = inputs.grad if kind in ("at", "iat") else inputs.noise if kind == "rp" else None
    context, attention = emulated_forward(lib, inputs.h, inputs.scores, inputs.mask, direction, KIND_CODE[kind],
                                          eps, sms)
    dc, da = cotangents(inputs)
    if "context" not in used:
        dc = torch.zeros_like(dc)
    grad_h, grad_scores = emulated_backward(lib, dc, da if "attention" in used else None, inputs.h, attention, sms)
    return dict(context=context, attention=attention, grad_h=grad_h, grad_scores=grad_scores)


def check_emulated(lib, inputs: Inputs, kind, eps=1.0, sms=4, used=("context", "attention"), what=""):
    actual = emulated_pool_with_grads(lib, inputs, kind, eps, sms, used)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iAT with a batch of one
        reference_low = pool_with_grads(python_ref.attention_pool, inputs, kind, eps, used)
        reference64 = pool_with_grads(python_ref.attention_pool, inputs.to(torch.float64), kind, eps, used)
    assert_within_rule(actual, reference64, reference_low, what=what or f"emulated CUDA kind={kind}")
    return actual


@pytest.mark.parametrize("mask_pattern", ("none", "padding", "empty_row"))
@pytest.mark.parametrize("kind", KINDS)
def test_emulated_kernels_match_reference(emulated, kind, mask_pattern):
    """float32, 16-byte vector path (H = 24), T = 300: two chunks of 256 staged weights in the forward and
    several chunks of positions in the backward."""
    inputs = make_inputs(5, 300, 24, mask_pattern, seed=31)
    check_emulated(emulated, inputs, kind, eps=0.7, what=f"kind={kind} {mask_pattern}")


@pytest.mark.parametrize("sms", (1, 64))
def test_emulated_column_groups_and_position_chunks(emulated, sms):
    """H = 200 over several column groups (wide and narrow groups, picked from the multiprocessor count), and
    the backward's positions split into several chunks."""
    inputs = make_inputs(3, 150, 200, "padding", seed=32)
    for kind in ("at", "iat"):
        check_emulated(emulated, inputs, kind, sms=sms, what=f"sms={sms} kind={kind}")


@pytest.mark.parametrize("layout", ("odd_hidden", "transposed", "sliced"))
def test_emulated_scalar_path(emulated, layout):
    """Layouts that the 16-byte path cannot read: H not a multiple of 4, h transposed, every other channel."""
    if layout == "odd_hidden":
        inputs = make_inputs(4, 37, 7, "padding", seed=33)
    else:
        base = make_inputs(4, 37, 16, "padding", seed=33)
        if layout == "transposed":
            def tr(x):
                return x.transpose(0, 1).contiguous().transpose(0, 1)
            inputs = Inputs(base.h.transpose(1, 2).contiguous().transpose(1, 2), tr(base.scores), tr(base.mask),
                            tr(base.grad), tr(base.noise))
        else:
            inputs = dataclasses.replace(base, h=base.h[:, :, ::2])
    for kind in ("at", "iat"):
        check_emulated(emulated, inputs, kind, what=f"{layout} kind={kind}")


@pytest.mark.parametrize("dtype", (torch.float64, torch.float16, torch.bfloat16))
def test_emulated_dtypes(emulated, dtype):
    for kind in (None, "at", "iat"):
        inputs = make_inputs(4, 45, 32, "padding", seed=34, dtype=dtype)
        check_emulated(emulated, inputs, kind, what=f"{dtype} kind={kind}")


@pytest.mark.parametrize("used", (("context",), ("attention",)))
def test_emulated_gradient_through_one_output(emulated, used):
    inputs = make_inputs(3, 20, 8, "empty_row", seed=35)
    check_emulated(emulated, inputs, "iat", used=used, what=f"loss on {used}")


@pytest.mark.parametrize("kind", ("at", "iat", "rp"))
def test_emulated_perturbation_matches_reference(emulated, kind):
    inputs = make_inputs(6, 70, 4, "empty_row", seed=36)
    direction = inputs.noise if kind == "rp" else inputs.grad
    r = torch.full(inputs.scores.shape, float("nan"))
    _perturbation(emulated, inputs.scores, inputs.mask, direction, KIND_CODE[kind], 0.5, r, out_is_acc=False)
    kwargs = inputs.perturbation_kwargs(kind, 0.5)
    r32 = python_ref.perturbation(kind, inputs.scores, inputs.mask, **kwargs)
    inputs64 = inputs.to(torch.float64)
    r64 = python_ref.perturbation(kind, inputs64.scores, inputs64.mask, **inputs64.perturbation_kwargs(kind, 0.5))
    assert r64.abs().sum() > 0
    assert_within_rule(dict(r=r), dict(r=r64), dict(r=r32), what=f"perturbation {kind}")


def test_emulated_edge_rows(emulated):
    """Fully masked rows give exact zeros; a batch of one gives r = 0 for iAT; padded values are never read."""
    inputs = make_inputs(4, 33, 8, "padding", seed=37)
    mask = inputs.mask.clone()
    mask[0] = False
    pad = ~mask
    poisoned = Inputs(inputs.h, inputs.scores.masked_fill(pad, float("nan")), mask,
                      inputs.grad.masked_fill(pad, float("inf")), inputs.noise)
    out = check_emulated(emulated, poisoned, "iat", what="fully masked row, NaN/inf in padding")
    for name in ("context", "attention", "grad_h", "grad_scores"):
        assert torch.equal(out[name][0], torch.zeros_like(out[name][0])), name
    single = make_inputs(1, 10, 4, "none", seed=38)
    r = torch.full(single.scores.shape, float("nan"))
    _perturbation(emulated, single.scores, None, single.grad, 2, 1.0, r, out_is_acc=False)
    assert torch.equal(r, torch.zeros_like(r))


def test_emulated_backward_is_deterministic(emulated):
    inputs = make_inputs(3, 100, 40, "padding", seed=39)
    first = emulated_pool_with_grads(emulated, inputs, "iat")
    again = emulated_pool_with_grads(emulated, inputs, "iat")
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name
