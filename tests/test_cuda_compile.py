"""The CUDA device code (csrc/cuda/attention_pool_kernels.cu) without a GPU.

1. nvcc compiles it, with no torch headers, for sm_80 and sm_90, with the flags torch's CUDAExtension adds
   (skipped, with the reason printed, only where nvcc is absent).
2. The C header compiles as C.
3. g++ builds the same file against a CPU emulation of CUDA (csrc/cuda/cpu_emulation/: the threads of a block
   run as host threads, __syncthreads is a barrier, warp shuffles exchange values), and the launchers, called
   through ctypes exactly as the torch binding calls them, are checked against python_ref under the tolerance
   rule: every perturbation, mask patterns, vector and scalar paths, several column groups and position
   chunks, float64/float16/bfloat16, views; the flags they set for NaN/inf at real positions; offsets past
   2^31 elements (rows 2^32 elements apart in sparse mappings that cost no memory); the grid limits. This checks
   the kernels' arithmetic and indexing; the GPU's memory model and speed are checked by tests/test_gpu.py on a GPU.
4. The torch binding (attention_pool_binding.cpp), which only a CUDA build of the package compiles: checked
   against torch's own c10/cuda headers and the toolkit's (g++ -fsyntax-only, where a CUDA toolkit is found), and
   built over the emulated kernels into a library torch loads (tests/cuda_stubs/), so that its input checks,
   views, launches and device-side value checks run for real on CPU tensors.
5. The pair ops of the AT training step (issue 17, last section): the launchers fa_cuda_attention_scores_grad,
   fa_cuda_attention_pool_pair_fwd and fa_cuda_attention_pool_pair_bwd against two single launches and python_ref
   (float64, masks, iAT, vector and scalar paths, column groups and position chunks), and the binding's three ops
   against the cpu backend's pair ops.
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import mmap
import os
import pathlib
import re
import shutil
import subprocess
import time
import warnings

import pytest
import torch
from torch.utils import cpp_extension

import python_ref
from _helpers import (
    KINDS,
    Inputs,
    assert_within_rule,
    assert_within_ulp_rule,
    low_precision_references,
    cotangents,
    make_inputs,
    pool_with_grads,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
KERNELS = CUDA_DIR / "attention_pool_kernels.cu"
HEADER = CUDA_DIR / "attention_pool_cuda.h"
BINDING = CUDA_DIR / "attention_pool_binding.cpp"
STUBS = REPO / "tests" / "cuda_stubs"
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
    # The pair ops' kernels (issue 17) spill no register (fwd_kernel<..., PAIR = true>, bwd_dh_da_kernel<..., MODE
    # BWD_SCORES_ONLY or BWD_PAIR>, bwd_dscores_kernel<..., PAIR = true>).
    spilled = re.findall(r"spilled to local memory in function '([^']+)'", proc.stderr)
    assert not [f for f in spilled if re.search(PAIR_KERNEL_SYMBOL, f)], spilled
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found: the object's architectures are not listed")
        return
    listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout
    symbols = subprocess.run([cuobjdump, "--dump-elf-symbols", str(obj)], capture_output=True, text=True, timeout=120)
    assert symbols.returncode == 0, symbols.stderr
    pair_kernels = set(re.findall(PAIR_KERNEL_SYMBOL, symbols.stdout))
    # both architectures, 4 dtypes x vector/scalar: the pair forward (2 perturbations), backward, dscores-only
    assert {"fwd_kernel", "bwd_dh_da_kernel", "bwd_dscores_kernel"} <= {m.split("I")[0] for m in pair_kernels}, \
        sorted(pair_kernels)
    assert len(pair_kernels) == 4 * 2 * 2 + 4 * 2 * 2 + 4, sorted(pair_kernels)


# Mangled names of the pair ops' kernel instances: fwd_kernel<T, VEC, PERTURB, true>,
# bwd_dh_da_kernel<T, VEC, 1 or 2>, bwd_dscores_kernel<T, true>.
PAIR_KERNEL_SYMBOL = (r"fwd_kernelI\w+?Li\d+ELi\d+ELb1EE|bwd_dh_da_kernelI\w+?Li\d+ELi[12]EE"
                      r"|bwd_dscores_kernelI\w+?Lb1EE")


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


EMULATION_FLAGS = ["-x", "c++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra",
                   "-Wno-unknown-pragmas", "-Werror", "-DFA_CPU_EMULATION", "-I", str(CUDA_DIR / "cpu_emulation"),
                   "-I", str(CUDA_DIR)]


def build_emulated(source: pathlib.Path, library: pathlib.Path, extra_flags=()) -> ctypes.CDLL:
    """`source` (the kernels, or a variant of them) built with g++ against the CPU emulation, as a ctypes library."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: the CPU emulation of the CUDA kernels cannot be built")
    cmd = [compiler, *EMULATION_FLAGS, *extra_flags, str(source), "-o", str(library)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(f"g++ CPU emulation build of {source.name}: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    i64, dbl, ptr, i32 = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    lib.fa_cuda_iat_coefficients.argtypes = [i32, i64, i64, View, View, View, ptr, ptr, ptr]
    lib.fa_cuda_perturbation.argtypes = [i32, i32, i32, i64, i64, dbl, View, View, View, ptr, View, ptr, ptr]
    lib.fa_cuda_attention_pool_fwd.argtypes = [i32, i32, i64, i64, i64, dbl, View, View, View, View, View, View,
                                               i32, ptr, ptr]
    lib.fa_cuda_attention_pool_bwd.argtypes = [i32, i64, i64, i64, View, View, View, View, View, View, ptr, i32,
                                               ptr]
    lib.fa_cuda_attention_scores_grad.argtypes = [i32, i64, i64, i64, View, View, View, View, View, ptr, i32, ptr]
    lib.fa_cuda_attention_pool_pair_fwd.argtypes = [i32, i32, i64, i64, i64, dbl, View, View, View, View, View, View,
                                                    View, View, i32, ptr, ptr]
    lib.fa_cuda_attention_pool_pair_bwd.argtypes = [i32, i64, i64, i64, View, View, View, View, View, View, View,
                                                    View, View, ptr, i32, ptr]
    for name in ("fa_cuda_iat_coefficients", "fa_cuda_perturbation", "fa_cuda_attention_pool_fwd",
                 "fa_cuda_attention_pool_bwd", "fa_cuda_attention_scores_grad", "fa_cuda_attention_pool_pair_fwd",
                 "fa_cuda_attention_pool_pair_bwd"):
        getattr(lib, name).restype = i32
    lib.path = library
    return lib


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The kernels built with g++ against the CPU emulation, as a ctypes library."""
    return build_emulated(KERNELS, tmp_path_factory.mktemp("cuda_emulation") / "libfa_cuda_emulated.so")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The nonfinite flags of attention_pool_cuda.h (one int32 the kernels OR them into).
NONFINITE_SCORES, NONFINITE_DIRECTION = 1, 2


class Flags:
    """The flag word the binding zeroes before the launches and asserts on after them."""

    def __init__(self):
        self.word = torch.zeros((), dtype=torch.int32)

    def ptr(self) -> int:
        return self.word.data_ptr()

    @property
    def value(self) -> int:
        return int(self.word)


def dense(shape, dtype, fill=float("nan")) -> torch.Tensor:
    """An output buffer poisoned with `fill` (what the binding allocates, but never left uninitialised here)."""
    return torch.full(shape, fill, dtype=dtype)


def _perturbation(lib, scores, mask, direction, kind, eps, out, out_is_acc, flags=None):
    """What attention_pool_binding.cpp's launch_perturbation does. With flags=None: a fresh flag word that must
    stay zero (every caller but the value-check tests passes finite values at the real positions)."""
    B, T = scores.shape
    dtype = FA_DTYPE[scores.dtype]
    check = flags is None
    flags = Flags() if flags is None else flags
    coeff = None
    if kind == 2:
        coeff = torch.full((B, B), float("nan"), dtype=_acc(scores.dtype))
        assert lib.fa_cuda_iat_coefficients(dtype, B, T, _view(scores), _view(mask), _view(direction),
                                            coeff.data_ptr(), flags.ptr(), None) == 0
    assert lib.fa_cuda_perturbation(dtype, kind, int(out_is_acc), B, T, eps, _view(scores), _view(mask),
                                    _view(direction), None if coeff is None else coeff.data_ptr(), _view(out),
                                    flags.ptr(), None) == 0
    if check:
        assert flags.value == 0, f"nonfinite flags {flags.value} for finite inputs"


def emulated_forward(lib, h, scores, mask, direction, kind, eps, sms, flags=None, alloc=dense):
    """(context, attention) as attention_pool_fwd_cuda computes them; outputs (from `alloc`) poisoned with NaN
    first. flags: as in _perturbation."""
    B, T, H = h.shape
    check = flags is None
    flags = Flags() if flags is None else flags
    context = alloc((B, H), h.dtype)
    attention = alloc((B, T), h.dtype)
    perturb, given = 0, None
    if kind == 1:
        perturb, given = 1, direction
    elif kind == 2:
        perturb, given = 2, alloc((B, T), _acc(h.dtype))
        _perturbation(lib, scores, mask, direction, 2, eps, given, out_is_acc=True, flags=flags)
    assert lib.fa_cuda_attention_pool_fwd(FA_DTYPE[h.dtype], perturb, B, T, H, eps, _view(h), _view(scores),
                                          _view(mask), _view(given), _view(context), _view(attention), sms,
                                          flags.ptr(), None) == 0
    if check:
        assert flags.value == 0, f"nonfinite flags {flags.value} for finite inputs"
    return context, attention


def emulated_backward(lib, grad_context, grad_attention, h, attention, sms, alloc=dense):
    B, T, H = h.shape
    grad_h = alloc(h.shape, h.dtype)
    grad_scores = alloc((B, T), h.dtype)
    da = torch.full((B, T), float("nan"), dtype=_acc(h.dtype))  # the workspace is contiguous by contract
    assert lib.fa_cuda_attention_pool_bwd(FA_DTYPE[h.dtype], B, T, H, _view(grad_context), _view(grad_attention),
                                          _view(h), _view(attention), _view(grad_h), _view(grad_scores),
                                          da.data_ptr(), sms, None) == 0
    return grad_h, grad_scores


KIND_CODE = {None: 0, "at": 1, "rp": 1, "iat": 2}


def emulated_pool_with_grads(lib, inputs: Inputs, kind, eps=1.0, sms=4, used=("context", "attention"),
                             alloc=dense, place=lambda x: x):
    """The emulated kernels' counterpart of _helpers.pool_with_grads (same cotangents). alloc makes the output
    buffers, place copies the cotangents where the test wants them (the 64-bit offset test: sparse rows)."""
    direction = inputs.grad if kind in ("at", "iat") else inputs.noise if kind == "rp" else None
    context, attention = emulated_forward(lib, inputs.h, inputs.scores, inputs.mask, direction, KIND_CODE[kind],
                                          eps, sms, alloc=alloc)
    dc, da = cotangents(inputs)
    if "context" not in used:
        dc = torch.zeros_like(dc)
    grad_h, grad_scores = emulated_backward(lib, place(dc), place(da) if "attention" in used else None, inputs.h,
                                            attention, sms, alloc=alloc)
    return dict(context=context, attention=attention, grad_h=grad_h, grad_scores=grad_scores)


def references(inputs: Inputs, kind, eps=1.0, used=("context", "attention")):
    """python_ref in the inputs' dtype and in float64, on the same values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iAT with a batch of one
        reference_low = pool_with_grads(python_ref.attention_pool, inputs, kind, eps, used)
        reference64 = pool_with_grads(python_ref.attention_pool, inputs.to(torch.float64), kind, eps, used)
    return reference64, reference_low


LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_emulated(lib, inputs: Inputs, kind, eps=1.0, sms=4, used=("context", "attention"), what=""):
    """The tolerance rule for float32/float64; for float16/bfloat16 the ulp rule of the CPU tests (_helpers:
    the float32 reference rounded to the dtype, plus 2 ulp at the row's scale)."""
    actual = emulated_pool_with_grads(lib, inputs, kind, eps, sms, used)
    what = what or f"emulated CUDA kind={kind}"
    if inputs.h.dtype in LOW_PRECISION:
        reference64, reference32 = low_precision_references(inputs, kind, eps, used)
        assert_within_ulp_rule(actual, reference64, reference32, inputs.h.dtype, what=what)
    else:
        reference64, reference_low = references(inputs, kind, eps, used)
        assert_within_rule(actual, reference64, reference_low, what=what)
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
    """float16/bfloat16 under the ulp rule (not twice the error of a reference computed in the dtype itself)."""
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


# ---------------------------------------------------------------------------------------------------------
# Values at real positions: NaN/inf set the kernels' flags (the binding asserts on them), padding never does


def _poison(x: torch.Tensor, row: int, position: int, value: float) -> torch.Tensor:
    x = x.clone()
    x[row, position] = value
    return x


@pytest.mark.parametrize("mask_pattern", ("padding", "none"))
@pytest.mark.parametrize("kind", KINDS)
def test_emulated_kernels_flag_nonfinite_values_at_real_positions(emulated, kind, mask_pattern):
    """For every kind, a NaN or +-inf in scores or in the direction at one real position sets exactly the flag of
    that tensor, in the forward and in the perturbation op; the same values at every padded position set none.
    iAT reads row i's scores in every other row's coefficients: the poisoned row is one of several."""
    inputs = make_inputs(4, 21, 8, mask_pattern, seed=40)
    mask = inputs.mask if inputs.mask is not None else torch.ones(inputs.scores.shape, dtype=torch.bool)
    row = 1
    position = int(mask[row].nonzero()[-1])  # the last real position of row 1
    direction = inputs.noise if kind == "rp" else inputs.grad
    code = KIND_CODE[kind]
    targets = ("scores",) if kind is None else ("scores", "direction")
    for target in targets:
        expected = NONFINITE_SCORES if target == "scores" else NONFINITE_DIRECTION
        for value in (float("nan"), float("inf"), float("-inf")):
            scores = _poison(inputs.scores, row, position, value) if target == "scores" else inputs.scores
            direct = _poison(direction, row, position, value) if target == "direction" else direction
            what = f"kind={kind} {target}[{row}, {position}] = {value}"
            flags = Flags()
            emulated_forward(emulated, inputs.h, scores, inputs.mask, direct, code, 0.5, 4, flags=flags)
            assert flags.value == expected, f"forward, {what}: flags {flags.value}, expected {expected}"
            if kind is not None:
                flags = Flags()
                _perturbation(emulated, scores, inputs.mask, direct, code, 0.5, dense(scores.shape, scores.dtype),
                              out_is_acc=False, flags=flags)
                assert flags.value == expected, f"perturbation, {what}: flags {flags.value}, expected {expected}"
    if inputs.mask is not None:  # padding: never read, never flagged (the helpers assert the flags stay 0)
        pad = ~inputs.mask
        scores = inputs.scores.masked_fill(pad, float("nan"))
        direct = direction.masked_fill(pad, float("inf"))
        emulated_forward(emulated, inputs.h, scores, inputs.mask, direct, code, 0.5, 4)
        if kind is not None:
            _perturbation(emulated, scores, inputs.mask, direct, code, 0.5, dense(scores.shape, scores.dtype),
                          out_is_acc=False)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float16, torch.bfloat16))
def test_emulated_kernels_flag_nonfinite_values_in_every_dtype(emulated, dtype):
    inputs = make_inputs(3, 12, 8, "padding", seed=41, dtype=dtype)
    for kind, target in (("at", "direction"), ("iat", "scores"), ("iat", "direction")):
        scores = _poison(inputs.scores, 2, 0, float("inf")) if target == "scores" else inputs.scores
        grad = _poison(inputs.grad, 2, 0, float("nan")) if target == "direction" else inputs.grad
        flags = Flags()
        emulated_forward(emulated, inputs.h, scores, inputs.mask, grad, KIND_CODE[kind], 1.0, 4, flags=flags)
        expected = NONFINITE_SCORES if target == "scores" else NONFINITE_DIRECTION
        assert flags.value == expected, f"{dtype} kind={kind} {target}: flags {flags.value}, expected {expected}"


# ---------------------------------------------------------------------------------------------------------
# Launch sizes: the grid limits of CUDA are checked, not cast away


def test_emulated_launchers_reject_grids_beyond_cuda_limits(emulated):
    """B is the grid x dimension of every kernel: above 2^31 - 1 (or 0) the launchers return
    cudaErrorInvalidConfiguration before launching anything. (The unchecked cast to unsigned made B = 2^32 + 1 a
    grid of one block: one row computed, the others left as they were, and success returned.) The views have
    batch stride 0, so that a launch that went ahead would read one real row."""
    T, H = 3, 4
    h, scores, grad = torch.randn(1, T, H), torch.randn(1, T), torch.randn(1, T)

    def rows(x):
        return x.expand(2**33, *x.shape[1:])  # stride 0 along B: _view passes the strides of any B

    invalid_configuration = 9
    for B in (2**32 + 1, 2**31, 0):
        context, attention = dense((1, H), h.dtype), dense((1, T), h.dtype)
        coeff = dense((1, 1), torch.float32)
        out = dense((1, T), h.dtype)
        codes = {
            "forward": emulated.fa_cuda_attention_pool_fwd(
                0, 1, B, T, H, 1.0, _view(rows(h)), _view(rows(scores)), _view(None), _view(rows(grad)),
                _view(rows(context)), _view(rows(attention)), 4, None, None),
            "backward": emulated.fa_cuda_attention_pool_bwd(
                0, B, T, H, _view(rows(context)), _view(None), _view(rows(h)), _view(rows(attention)),
                _view(rows(h.clone())), _view(rows(out)), coeff.data_ptr(), 4, None),
            "perturbation": emulated.fa_cuda_perturbation(
                0, 1, 0, B, T, 1.0, _view(rows(scores)), _view(None), _view(rows(grad)), None, _view(rows(out)),
                None, None),
            "iat coefficients": emulated.fa_cuda_iat_coefficients(
                0, B, T, _view(rows(scores)), _view(None), _view(rows(grad)), coeff.data_ptr(), None, None),
        }
        for name, code in codes.items():
            assert code == invalid_configuration, f"{name} with B = {B}: returned {code}"
        for buffer in (context, attention, out, coeff):
            assert torch.isnan(buffer).all(), f"B = {B}: a kernel ran"


# ---------------------------------------------------------------------------------------------------------
# 64-bit offsets: rows 2^32 + 128 elements apart, in sparse mappings that cost no memory

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # the Linux value; Python's mmap module lacks it before 3.13
# >= 2^31 elements; a 32-bit offset would wrap it to 128, which still lies in the mapping: wrong rows, no crash.
BIG_STRIDE = 2**32 + 128


def sparse_rows(values: torch.Tensor, batch_stride: int = BIG_STRIDE) -> torch.Tensor:
    """A copy of `values` ([B, ...]) whose row b starts b * batch_stride elements into an anonymous private
    mapping of (B - 1) * batch_stride + (row size) elements: tens of GiB of address space, MAP_NORESERVE, of
    which only the pages of the rows are ever touched (the untouched ones read as zeros)."""
    if values is None:
        return None
    B, row_shape = values.shape[0], values.shape[1:]
    item = values.element_size()
    nbytes = ((B - 1) * batch_stride + values[0].numel()) * item
    nbytes = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    flat = torch.frombuffer(region, dtype=values.dtype)  # keeps the mapping alive as long as the tensor
    row_strides = torch.empty(row_shape, dtype=values.dtype).stride()
    out = flat.as_strided(values.shape, (batch_stride, *row_strides))
    out.copy_(values)
    return out


def sparse_alloc(shape, dtype) -> torch.Tensor:
    return sparse_rows(dense(shape, dtype))


def check_offsets_past_2_31(lib, kind: str) -> None:
    """Forward, backward and the perturbation op of the emulated kernels with every [B, ...] operand (inputs,
    outputs, cotangents; not the contiguous workspaces) at batch stride 2^32 + 128 elements, B = 2: row 1 lies
    past 2^32 elements (16 GiB of float32) into its mapping. Values against python_ref on dense copies."""
    inputs = make_inputs(2, 9, 8, "padding", seed=42)
    sparse = Inputs(*(sparse_rows(x) for x in (inputs.h, inputs.scores, inputs.mask, inputs.grad, inputs.noise)))
    assert sparse.h.stride(0) == BIG_STRIDE and sparse.mask.stride(0) == BIG_STRIDE
    actual = emulated_pool_with_grads(lib, sparse, kind, 0.8, alloc=sparse_alloc, place=sparse_rows)
    for name, tensor in actual.items():
        assert tensor.stride(0) == BIG_STRIDE, name
    reference64, reference_low = references(inputs, kind, 0.8)
    assert_within_rule(actual, reference64, reference_low, what=f"rows 2^32 + 128 elements apart, kind={kind}")
    direction = sparse.noise if kind == "rp" else sparse.grad
    r = sparse_alloc(inputs.scores.shape, inputs.scores.dtype)
    _perturbation(lib, sparse.scores, sparse.mask, direction, KIND_CODE[kind], 0.8, r, out_is_acc=False)
    r32 = python_ref.perturbation(kind, inputs.scores, inputs.mask, **inputs.perturbation_kwargs(kind, 0.8))
    inputs64 = inputs.to(torch.float64)
    r64 = python_ref.perturbation(kind, inputs64.scores, inputs64.mask, **inputs64.perturbation_kwargs(kind, 0.8))
    assert_within_rule(dict(r=r), dict(r=r64), dict(r=r32), what=f"perturbation, rows 2^32 + 128 apart, {kind}")


@pytest.mark.parametrize("kind", ("at", "iat"))
def test_emulated_offsets_past_2_31_elements(emulated, kind):
    """AT: the forward's own normalisation; iAT: the coefficient and perturbation kernels, the given r."""
    check_offsets_past_2_31(emulated, kind)


def test_offset_check_fails_with_32_bit_offsets(tmp_path):
    """The check above must catch offsets computed in 32 bits: the kernels rebuilt with 32-bit sizes and strides
    in their parameter blocks (PerturbParams, FwdParams, BwdParams) fail it, as row 1 then aliases the untouched
    (zero) memory 128 elements into each mapping."""
    mutant, count = re.subn(r"struct (PerturbParams|FwdParams|BwdParams) \{.*?\n\};",
                            lambda m: m.group(0).replace("int64_t", "int32_t"), KERNELS.read_text(), flags=re.S)
    assert count == 3, "the parameter blocks of the kernels were not found"
    source = tmp_path / "attention_pool_kernels_int32_offsets.cu"
    source.write_text(mutant)
    lib = build_emulated(source, tmp_path / "libfa_cuda_int32_offsets.so", ["-Wno-narrowing"])
    with pytest.raises(AssertionError) as failure:
        check_offsets_past_2_31(lib, "at")
    print(f"32-bit offsets caught: {str(failure.value)[:300]}")


# ---------------------------------------------------------------------------------------------------------
# The torch binding (attention_pool_binding.cpp): compiled here, though only a CUDA build of the package uses it

# What setup.py's CUDAExtension gives the binding (a .cpp file: the host compiler), and warnings as errors.
BINDING_FLAGS = ["-std=c++20", "-DFUSED_ATTN_AT_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H",
                 "-DTORCH_EXTENSION_NAME=_C", "-Wall", "-Wextra", "-Werror"]


def _cuda_toolkit_include() -> pathlib.Path | None:
    """The CUDA toolkit's include folder (cuda_runtime_api.h), where torch's CUDAExtension would find it."""
    nvcc = _nvcc()
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda",
             str(pathlib.Path(nvcc).resolve().parents[1]) if nvcc else None]
    for root in roots:
        if root and (pathlib.Path(root) / "include" / "cuda_runtime_api.h").exists():
            return pathlib.Path(root) / "include"
    return None


def _torch_includes() -> list[str]:
    flags = []
    for path in cpp_extension.include_paths():
        flags += ["-isystem", path]
    return flags


def compile_binding(source: pathlib.Path, config: str, args: list[str], link=()) -> subprocess.CompletedProcess:
    """g++ on `source` (the binding, or a file that includes it; `link`: what follows it) with torch's headers and
    config "torch_cuda": torch's real c10/cuda headers over the CUDA toolkit's (plus the one generated header a CPU
    wheel of torch lacks, tests/cuda_stubs/torch_cuda_headers); "emulation": the stubs of
    tests/cuda_stubs/emulation in their place (searched first, -I before -isystem)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: the CUDA binding cannot be compiled")
    if config == "torch_cuda":
        toolkit = _cuda_toolkit_include()
        assert toolkit is not None
        extra = ["-isystem", str(STUBS / "torch_cuda_headers"), "-isystem", str(toolkit)]
    else:
        extra = ["-I", str(STUBS / "emulation")]
    cmd = [compiler, *BINDING_FLAGS, *extra, *_torch_includes(), "-I", str(CUDA_DIR), *args, str(source), *link]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(f"g++ {source.name} ({config}): {time.perf_counter() - start:.1f} s, exit {proc.returncode}")
    return proc


def test_binding_compiles_against_torch_cuda_headers():
    """The binding exactly as a CUDA build compiles it: torch's c10/cuda headers, the CUDA toolkit's runtime
    headers, setup.py's flags; -fsyntax-only, so no CUDA library is needed."""
    if _cuda_toolkit_include() is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h under CUDA_HOME, CUDA_PATH, /usr/local/cuda or "
                    "beside nvcc): the binding is still compiled and run over the emulation (emulated_binding)")
    proc = compile_binding(BINDING, "torch_cuda", ["-fsyntax-only"])
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_binding_compile_check_catches_errors(tmp_path):
    """The compile check fails on a broken binding: a copy with a misspelt launcher and a tensor passed where the
    C API takes a view does not compile, and g++ names both lines."""
    text = BINDING.read_text()
    mutations = [("check_launch(fa_cuda_perturbation(", "check_launch(fa_cuda_perturbaton("),
                 ("view_of(branch.a), view_of(grad_h),", "view_of(branch.a), grad_h,")]
    lines = []
    for old, new in mutations:
        assert text.count(old) == 1, old
        lines.append(text[:text.index(old)].count("\n") + 1)
        text = text.replace(old, new)
    broken = tmp_path / "attention_pool_binding.cpp"
    broken.write_text(text)
    config = "torch_cuda" if _cuda_toolkit_include() is not None else "emulation"
    proc = compile_binding(broken, config, ["-fsyntax-only"])
    assert proc.returncode != 0, "the binding with injected errors compiled"
    for line in lines:
        assert f"attention_pool_binding.cpp:{line}:" in proc.stderr, (line, proc.stderr[-4000:])


@pytest.fixture(scope="module")
def emulated_binding(emulated, tmp_path_factory):
    """attention_pool_binding.cpp built with tests/cuda_stubs/binding_on_emulation.cpp into a library torch loads,
    over the emulated kernels (`emulated`, linked) and the shared input checks of the package's extension
    (fused_attn_at._C, linked): torch.ops.fused_attn_at_cuda_emulated.{attention_pool_fwd, attention_pool_bwd,
    perturbation} run the binding's own code on CPU tensors."""
    spec = importlib.util.find_spec("fused_attn_at._C")
    if spec is None or spec.origin is None:
        pytest.skip("fused_attn_at._C is not built (FUSED_ATTN_AT_NO_EXT?): the binding's input checks live there")
    folder = tmp_path_factory.mktemp("cuda_binding")
    # the schemas of csrc/ops.cpp, for this library's namespace (m.impl checks the binding against them)
    ops = (REPO / "csrc" / "ops.cpp").read_text()
    block = re.search(r"^TORCH_LIBRARY\(fused_attn_at, m\) \{\n(.*?)^\}", ops, re.S | re.M)
    assert block is not None, "TORCH_LIBRARY(fused_attn_at, m) not found in csrc/ops.cpp"
    (folder / "ops_schemas.inc").write_text(block.group(1))
    library = folder / "libfa_cuda_binding_emulated.so"
    torch_lib = pathlib.Path(torch.__file__).parent / "lib"
    proc = compile_binding(STUBS / "binding_on_emulation.cpp", "emulation",
                           ["-O1", "-fPIC", "-shared", "-I", str(folder), "-o", str(library)],
                           [str(emulated.path), spec.origin, f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
                            f"-Wl,-rpath,{torch_lib}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    torch.ops.load_library(str(library))
    return torch.ops.fused_attn_at_cuda_emulated


def _binding_direction(inputs: Inputs, kind):
    return inputs.noise if kind == "rp" else inputs.grad if kind in ("at", "iat") else None


@pytest.mark.parametrize("layout", ("contiguous", "views"))
@pytest.mark.parametrize("kind", KINDS)
def test_binding_on_emulation_matches_reference(emulated_binding, kind, layout):
    """The three ops through the binding: its views of strided inputs, the iAT r buffer, the conversion of a
    direction in another dtype, the backward's workspace. Values under the tolerance rule."""
    inputs = make_inputs(4, 40, 12, "empty_row", seed=43)
    call = inputs
    if layout == "views":  # scores/mask/grad/noise transposed in memory, every other channel of h
        def tr(x):
            return x.t().contiguous().t()
        wide = torch.randn(4, 40, 24)
        wide[:, :, ::2] = inputs.h
        call = Inputs(wide[:, :, ::2], tr(inputs.scores), tr(inputs.mask), tr(inputs.grad).double(),
                      tr(inputs.noise).double())
    direction = _binding_direction(call, kind)
    context, attention = emulated_binding.attention_pool_fwd(call.h, call.scores, call.mask, direction,
                                                             KIND_CODE[kind], 0.6)
    dc, da = cotangents(inputs)
    grad_h, grad_scores = emulated_binding.attention_pool_bwd(dc, da, call.h, attention)
    actual = dict(context=context, attention=attention, grad_h=grad_h, grad_scores=grad_scores)
    reference64, reference_low = references(inputs, kind, 0.6)
    assert_within_rule(actual, reference64, reference_low, what=f"binding kind={kind} {layout}")
    if kind is not None:
        r = emulated_binding.perturbation(call.scores, call.mask, direction, KIND_CODE[kind], 0.6)
        r32 = python_ref.perturbation(kind, inputs.scores, inputs.mask, **inputs.perturbation_kwargs(kind, 0.6))
        inputs64 = inputs.to(torch.float64)
        r64 = python_ref.perturbation(kind, inputs64.scores, inputs64.mask,
                                      **inputs64.perturbation_kwargs(kind, 0.6))
        assert_within_rule(dict(r=r), dict(r=r64), dict(r=r32), what=f"binding perturbation {kind} {layout}")


@pytest.mark.parametrize("kind", KINDS)
def test_binding_on_emulation_asserts_finite_values(emulated_binding, kind):
    """NaN/inf at a real position of scores or of the direction: the binding's device-side assertion raises with
    the CPU kernels' message (here at once: _assert_async of a CPU tensor); at padded positions, nothing."""
    inputs = make_inputs(3, 10, 4, "padding", seed=44)
    direction = _binding_direction(inputs, kind)
    code = KIND_CODE[kind]
    row = 1
    position = int(inputs.mask[row].nonzero()[-1])
    for target in ("scores",) if kind is None else ("scores", "direction"):
        for value in (float("nan"), float("inf")):
            scores = _poison(inputs.scores, row, position, value) if target == "scores" else inputs.scores
            direct = _poison(direction, row, position, value) if target == "direction" else direction
            message = f"^{target} holds NaN or inf at real \\(unmasked\\) positions; expected finite values"
            with pytest.raises(RuntimeError, match=message):
                emulated_binding.attention_pool_fwd(inputs.h, scores, inputs.mask, direct, code, 1.0)
            if kind is not None:
                with pytest.raises(RuntimeError, match=message):
                    emulated_binding.perturbation(scores, inputs.mask, direct, code, 1.0)
    pad = ~inputs.mask
    scores = inputs.scores.masked_fill(pad, float("nan"))
    direct = None if direction is None else direction.masked_fill(pad, float("-inf"))
    clean = emulated_binding.attention_pool_fwd(inputs.h, inputs.scores, inputs.mask, direction, code, 1.0)
    padded = emulated_binding.attention_pool_fwd(inputs.h, scores, inputs.mask, direct, code, 1.0)
    for got, expected in zip(padded, clean):
        assert torch.equal(got, expected)
    if kind is not None:
        assert torch.equal(emulated_binding.perturbation(scores, inputs.mask, direct, code, 1.0),
                           emulated_binding.perturbation(inputs.scores, inputs.mask, direction, code, 1.0))


def test_binding_on_emulation_rejects_batch_beyond_grid_limit(emulated_binding):
    """B = 2^31 rows (views of one row, stride 0): a ValueError naming B and the limit, before any allocation."""
    B, T, H = 2**31, 3, 2
    h = torch.zeros(1, T, H).expand(B, T, H)
    scores = torch.zeros(1, T).expand(B, T)
    limit = r"above the CUDA grid x limit 2\^31 - 1 = 2147483647"
    with pytest.raises(ValueError, match=r"batch size B \(dim 0 of scores\) is 2147483648, " + limit):
        emulated_binding.perturbation(scores, None, scores, 1, 1.0)
    with pytest.raises(ValueError, match=r"batch size B \(dim 0 of h\) is 2147483648, " + limit):
        emulated_binding.attention_pool_fwd(h, scores, None, None, 0, 1.0)
    with pytest.raises(ValueError, match=r"batch size B \(dim 0 of h\) is 2147483648, " + limit):
        emulated_binding.attention_pool_bwd(torch.zeros(1, H).expand(B, H), None, h, scores)


def test_binding_on_emulation_offsets_past_2_31_elements(emulated_binding):
    """Inputs whose rows lie 2^32 + 128 elements apart (sparse mappings) through the binding: its views carry the
    64-bit strides to the kernels (the outputs it allocates are contiguous)."""
    inputs = make_inputs(2, 9, 8, "padding", seed=45)
    sparse = Inputs(*(sparse_rows(x) for x in (inputs.h, inputs.scores, inputs.mask, inputs.grad, inputs.noise)))
    for kind in ("at", "iat"):
        context, attention = emulated_binding.attention_pool_fwd(sparse.h, sparse.scores, sparse.mask, sparse.grad,
                                                                 KIND_CODE[kind], 0.8)
        dc, da = cotangents(inputs)
        grad_h, grad_scores = emulated_binding.attention_pool_bwd(sparse_rows(dc), sparse_rows(da), sparse.h,
                                                                  sparse_rows(attention))
        actual = dict(context=context, attention=attention, grad_h=grad_h, grad_scores=grad_scores)
        reference64, reference_low = references(inputs, kind, 0.8)
        assert_within_rule(actual, reference64, reference_low, what=f"binding, sparse rows, kind={kind}")


def test_ulp_rule_catches_accumulation_in_the_storage_dtype(tmp_path):
    """The float16/bfloat16 rule must reject a kernel that rounds its context accumulator to the storage dtype
    after every term (the old bound, twice the error of a reference computed in the dtype, accepted it)."""
    old = "for (int e = 0; e < VEC; ++e) acc[e] += wk[u] * Cvt<T>::to(pack[u].v[e]);"
    new = "for (int e = 0; e < VEC; ++e) acc[e] = Cvt<T>::to(Cvt<T>::from(acc[e] + wk[u] * Cvt<T>::to(pack[u].v[e])));"
    text = KERNELS.read_text()
    assert text.count(old) == 1
    source = tmp_path / "attention_pool_kernels_low_precision_acc.cu"
    source.write_text(text.replace(old, new))
    lib = build_emulated(source, tmp_path / "libfa_cuda_low_precision_acc.so")
    inputs = make_inputs(3, 300, 16, "none", seed=34, dtype=torch.bfloat16, score_scale=0.3)
    with pytest.raises(AssertionError, match="context: .* out of the 2-ulp rule"):
        check_emulated(lib, inputs, "at")


# ---------------------------------------------------------------------------------------------------------
# The pair ops of the AT training step (issue 17): attention_scores_grad, attention_pool_pair_fwd/bwd


def emulated_scores_grad(lib, grad_context, grad_attention, h, attention, sms):
    """grad_scores as attention_scores_grad_cuda computes it (no grad_h buffer exists)."""
    B, T, H = h.shape
    grad_scores = dense((B, T), h.dtype)
    da = torch.full((B, T), float("nan"), dtype=_acc(h.dtype))
    assert lib.fa_cuda_attention_scores_grad(FA_DTYPE[h.dtype], B, T, H, _view(grad_context), _view(grad_attention),
                                             _view(h), _view(attention), _view(grad_scores), da.data_ptr(), sms,
                                             None) == 0
    return grad_scores


def emulated_pair_forward(lib, h, scores, mask, direction, kind, eps, sms, flags=None):
    """(context_clean, attention_clean, context_adv, attention_adv) as attention_pool_pair_fwd_cuda computes them
    (kind 1 or 2); flags as in _perturbation."""
    B, T, H = h.shape
    check = flags is None
    flags = Flags() if flags is None else flags
    outs = [dense((B, H), h.dtype), dense((B, T), h.dtype), dense((B, H), h.dtype), dense((B, T), h.dtype)]
    if kind == 1:
        perturb, given = 1, direction
    else:
        perturb, given = 2, dense((B, T), _acc(h.dtype))
        _perturbation(lib, scores, mask, direction, 2, eps, given, out_is_acc=True, flags=flags)
    assert lib.fa_cuda_attention_pool_pair_fwd(FA_DTYPE[h.dtype], perturb, B, T, H, eps, _view(h), _view(scores),
                                               _view(mask), _view(given), *(_view(x) for x in outs), sms,
                                               flags.ptr(), None) == 0
    if check:
        assert flags.value == 0, f"nonfinite flags {flags.value} for finite inputs"
    return tuple(outs)


def emulated_pair_backward(lib, dc_clean, da_clean, dc_adv, da_adv, h, attention_clean, attention_adv, sms):
    B, T, H = h.shape
    grad_h = dense(h.shape, h.dtype)
    grad_scores = dense((B, T), h.dtype)
    da = torch.full((2, B, T), float("nan"), dtype=_acc(h.dtype))  # both branches' workspace, contiguous
    assert lib.fa_cuda_attention_pool_pair_bwd(FA_DTYPE[h.dtype], B, T, H, _view(dc_clean), _view(da_clean),
                                               _view(dc_adv), _view(da_adv), _view(h), _view(attention_clean),
                                               _view(attention_adv), _view(grad_h), _view(grad_scores),
                                               da.data_ptr(), sms, None) == 0
    return grad_h, grad_scores


PAIR_NAMES = ("context_clean", "attention_clean", "context_adv", "attention_adv", "grad_h", "grad_scores")


def _pair_cotangents(inputs: Inputs):
    """dL/d(context_clean, attention_clean, context_adv, attention_adv), in the inputs' dtype."""
    dc_clean, da_clean = cotangents(inputs, seed=1)
    dc_adv, da_adv = cotangents(inputs, seed=2)
    return dc_clean, da_clean, dc_adv, da_adv


def emulated_pair_vs_singles(lib, inputs: Inputs, kind: str, eps: float, sms: int):
    """(the pair launchers' results, two single launches' results, summed as autograd sums them), as dicts."""
    direction = inputs.noise if kind == "rp" else inputs.grad
    code = KIND_CODE[kind]
    cot = _pair_cotangents(inputs)
    pair_fwd = emulated_pair_forward(lib, inputs.h, inputs.scores, inputs.mask, direction, code, eps, sms)
    pair_bwd = emulated_pair_backward(lib, cot[0], cot[1], cot[2], cot[3], inputs.h, pair_fwd[1], pair_fwd[3], sms)
    clean = emulated_forward(lib, inputs.h, inputs.scores, inputs.mask, None, 0, eps, sms)
    adv = emulated_forward(lib, inputs.h, inputs.scores, inputs.mask, direction, code, eps, sms)
    gh_clean, gs_clean = emulated_backward(lib, cot[0], cot[1], inputs.h, clean[1], sms)
    gh_adv, gs_adv = emulated_backward(lib, cot[2], cot[3], inputs.h, adv[1], sms)
    pair = dict(zip(PAIR_NAMES, (*pair_fwd, *pair_bwd)))
    singles = dict(zip(PAIR_NAMES, (*clean, *adv, gh_clean + gh_adv, gs_clean + gs_adv)))
    return pair, singles


def reference_pair(inputs: Inputs, kind: str, eps: float):
    """The pair's outputs and gradients (same cotangents) from python_ref, in float64."""
    x = inputs.to(torch.float64)
    h = x.h.clone().requires_grad_()
    scores = x.scores.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iAT with a batch of one
        clean = python_ref.attention_pool(h, scores, x.mask)
        adv = python_ref.attention_pool(h, scores, x.mask, **x.kwargs(kind, eps))
    outs = (clean.context, clean.attention, adv.context, adv.attention)
    cot = [c.to(torch.float64) for c in _pair_cotangents(inputs)]
    loss = sum((o * c).sum() for o, c in zip(outs, cot))
    grad_h, grad_scores = torch.autograd.grad(loss, (h, scores))
    return dict(zip(PAIR_NAMES, (*(o.detach() for o in outs), grad_h, grad_scores)))


def _assert_pair_close(got: dict, expected: dict, rtol: float, atol: float, what: str) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(got[name].to(value.dtype), value, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("mask_pattern", ("none", "padding", "empty_row"))
@pytest.mark.parametrize("kind", ("at", "iat", "rp"))
def test_emulated_pair_launchers_equal_two_single_launches(emulated, kind, mask_pattern):
    """float64, the 16-byte path (H = 24), T = 300 (two chunks of 256 staged weights, several position chunks):
    the pair forward's four outputs equal the two single forwards' bitwise (the same arithmetic), its backward
    the two single backwards summed (to rounding: dh is rounded once, not twice), and python_ref."""
    inputs = make_inputs(5, 300, 24, mask_pattern, seed=51, dtype=torch.float64)
    pair, singles = emulated_pair_vs_singles(emulated, inputs, kind, 0.7, sms=4)
    for name in PAIR_NAMES[:4]:
        assert torch.equal(pair[name], singles[name]), f"{kind} {mask_pattern} {name}: not the single launches'"
    _assert_pair_close(pair, singles, 1e-12, 1e-13, f"{kind} {mask_pattern} vs singles")
    _assert_pair_close(pair, reference_pair(inputs, kind, 0.7), 1e-10, 1e-12, f"{kind} {mask_pattern} vs python_ref")


@pytest.mark.parametrize("layout", ("column_groups", "odd_hidden", "transposed", "batch_of_one"))
def test_emulated_pair_launchers_paths(emulated, layout):
    """Column groups and position chunks (H = 200, 1 and 64 multiprocessors), the scalar path (H = 7, h and the
    [B, T] tensors transposed in memory), a batch of one (iAT: r = 0); padding holds NaN in the scores."""
    sms_list = (4,)
    if layout == "column_groups":
        inputs, sms_list = make_inputs(3, 150, 200, "padding", seed=52, dtype=torch.float64), (1, 64)
    elif layout == "odd_hidden":
        inputs = make_inputs(4, 37, 7, "empty_row", seed=53, dtype=torch.float64)
    elif layout == "transposed":
        base = make_inputs(4, 37, 16, "padding", seed=54, dtype=torch.float64)

        def tr(x):
            return x.transpose(0, 1).contiguous().transpose(0, 1)
        inputs = Inputs(base.h.transpose(1, 2).contiguous().transpose(1, 2), tr(base.scores), tr(base.mask),
                        tr(base.grad), tr(base.noise))
    else:
        inputs = make_inputs(1, 40, 8, "padding", seed=55, dtype=torch.float64)
    inputs = dataclasses.replace(inputs, scores=inputs.scores.masked_fill(~inputs.mask, float("nan")))
    for sms in sms_list:
        for kind in ("at", "iat"):
            pair, singles = emulated_pair_vs_singles(emulated, inputs, kind, 0.7, sms=sms)
            _assert_pair_close(pair, singles, 1e-12, 1e-13, f"{layout} sms={sms} {kind} vs singles")
            _assert_pair_close(pair, reference_pair(inputs, kind, 0.7), 1e-10, 1e-12,
                               f"{layout} sms={sms} {kind} vs python_ref")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_emulated_pair_low_precision_is_as_good_as_two_single_launches(emulated, dtype):
    """float32/bfloat16 accumulate in float32: the pair is no further from float64 than the two single launches
    are (plus 2 ulp: its grad_h is rounded once, theirs twice and summed)."""
    inputs = make_inputs(4, 70, 32, "padding", seed=56, dtype=dtype)
    pair, singles = emulated_pair_vs_singles(emulated, inputs, "at", 0.7, sms=4)
    exact = reference_pair(inputs, "at", 0.7)
    for name, value in exact.items():
        err_pair = float((pair[name].double() - value).abs().max() / value.abs().max())
        err_singles = float((singles[name].double() - value).abs().max() / value.abs().max())
        assert err_pair <= err_singles + 2 * torch.finfo(dtype).eps, f"{name}: {err_pair:.3g} vs {err_singles:.3g}"


@pytest.mark.parametrize("with_grad_attention", (False, True))
@pytest.mark.parametrize("layout", ("vector", "scalar"))
def test_emulated_scores_grad_equals_the_backward(emulated, with_grad_attention, layout):
    """fa_cuda_attention_scores_grad gives fa_cuda_attention_pool_bwd's grad_scores bitwise (the same da and
    dscores arithmetic, without the dh stores), and python_ref's gradient of the scores."""
    hidden = 24 if layout == "vector" else 7
    inputs = make_inputs(4, 300, hidden, "empty_row", seed=57, dtype=torch.float64)
    _, attention = emulated_forward(emulated, inputs.h, inputs.scores, inputs.mask, None, 0, 1.0, 4)
    dc, da = cotangents(inputs)
    da = da if with_grad_attention else None
    got = emulated_scores_grad(emulated, dc, da, inputs.h, attention, 4)
    _, expected = emulated_backward(emulated, dc, da, inputs.h, attention, 4)
    assert torch.equal(got, expected)
    scores = inputs.scores.clone().requires_grad_()
    out = python_ref.attention_pool(inputs.h, scores, inputs.mask)
    loss = (out.context * dc).sum() + ((out.attention * da).sum() if da is not None else 0)
    (reference,) = torch.autograd.grad(loss, scores)
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ("at", "iat", "rp"))
def test_emulated_pair_forward_flags_nonfinite_values(emulated, kind):
    """NaN/inf at a real position of the scores or the direction sets the flag of the one that holds it (as the
    single forward does); at padded positions, none."""
    inputs = make_inputs(3, 10, 4, "padding", seed=58, dtype=torch.float32)
    direction = inputs.noise if kind == "rp" else inputs.grad
    row = 1
    position = int(inputs.mask[row].nonzero()[-1])
    for target, bit in (("scores", NONFINITE_SCORES), ("direction", NONFINITE_DIRECTION)):
        for value in (float("nan"), float("inf")):
            scores = _poison(inputs.scores, row, position, value) if target == "scores" else inputs.scores
            direct = _poison(direction, row, position, value) if target == "direction" else direction
            flags = Flags()
            emulated_pair_forward(emulated, inputs.h, scores, inputs.mask, direct, KIND_CODE[kind], 1.0, 4, flags)
            assert flags.value & bit, f"{kind}: {target}={value} not flagged ({flags.value})"
    pad = ~inputs.mask
    flags = Flags()
    emulated_pair_forward(emulated, inputs.h, inputs.scores.masked_fill(pad, float("nan")), inputs.mask,
                          direction.masked_fill(pad, float("inf")), KIND_CODE[kind], 1.0, 4, flags)
    assert flags.value == 0


def test_emulated_pair_forward_rejects_an_unperturbed_branch(emulated):
    inputs = make_inputs(2, 5, 4, "none", seed=59)
    outs = [dense((2, 4), torch.float32), dense((2, 5), torch.float32)] * 2
    assert emulated.fa_cuda_attention_pool_pair_fwd(FA_DTYPE[torch.float32], 0, 2, 5, 4, 1.0, _view(inputs.h),
                                                    _view(inputs.scores), _view(None), _view(None),
                                                    *(_view(x) for x in outs), 4, None, None) != 0


def _cpu_pair_ops():
    import fused_attn_at  # noqa: F401  (loads fused_attn_at._C: the cpu backend's pair ops)
    from fused_attn_at.ops import cpp

    if "cpu" not in cpp.PAIR_DEVICES:
        pytest.fail(f"fused_attn_at._C has no CPU pair ops: {cpp.UNAVAILABLE_REASON}", pytrace=False)
    return torch.ops.fused_attn_at


@pytest.mark.parametrize("layout", ("contiguous", "views"))
@pytest.mark.parametrize("mask_pattern", ("padding", "empty_row"))
@pytest.mark.parametrize("kind", ("at", "iat", "rp"))
def test_binding_on_emulation_pair_ops_match_cpu(emulated_binding, kind, mask_pattern, layout):
    """The binding's three pair ops against the cpu backend's (float64): its views of strided inputs, the iAT r
    buffer, a direction in another dtype, the [2, B, T] workspace, grad_h in h's layout."""
    cpu = _cpu_pair_ops()
    inputs = make_inputs(4, 40, 12, mask_pattern, seed=61, dtype=torch.float64)
    call = inputs
    if layout == "views":  # [B, T] tensors transposed in memory, every other channel of h, a float32 direction
        def tr(x):
            return x.t().contiguous().t()
        wide = torch.randn(4, 40, 24, dtype=torch.float64)
        wide[:, :, ::2] = inputs.h
        call = Inputs(wide[:, :, ::2], tr(inputs.scores), tr(inputs.mask), tr(inputs.grad).float(),
                      tr(inputs.noise).float())
    direction = _binding_direction(call, kind)
    code = KIND_CODE[kind]
    got = emulated_binding.attention_pool_pair_fwd(call.h, call.scores, call.mask, direction, code, 0.6)
    expected = cpu.attention_pool_pair_fwd(call.h, call.scores, call.mask, direction, code, 0.6)
    cot = _pair_cotangents(inputs)
    if layout == "views":
        cot = tuple(c.t().contiguous().t() for c in cot)
    got_bwd = emulated_binding.attention_pool_pair_bwd(cot[0], cot[1], cot[2], cot[3], call.h, got[1], got[3])
    expected_bwd = cpu.attention_pool_pair_bwd(cot[0], cot[1], cot[2], cot[3], call.h, expected[1], expected[3])
    assert got_bwd[0].stride() == torch.empty_like(call.h).stride(), "grad_h keeps h's layout"
    for what, g in (("grad_attention", cot[1]), ("none", None)):
        got_g = emulated_binding.attention_scores_grad(cot[0], g, call.h, got[1])
        expected_g = cpu.attention_scores_grad(cot[0], g, call.h, expected[1])
        torch.testing.assert_close(got_g, expected_g, rtol=1e-12, atol=1e-13, msg=lambda m: f"scores grad {what}: {m}")
    for name, a, b in zip(PAIR_NAMES, (*got, *got_bwd), (*expected, *expected_bwd)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=lambda m: f"{kind} {layout} {name}: {m}")
    _assert_pair_close(dict(zip(PAIR_NAMES, (*got, *got_bwd))), reference_pair(inputs, kind, 0.6), 1e-10, 1e-12,
                       f"binding {kind} {layout} vs python_ref")


def test_binding_on_emulation_pair_ops_check_inputs_and_values(emulated_binding):
    """The shared checks of csrc/ops.cpp (kind 0 refused, shapes named), the device-side assertion of NaN/inf at a
    real position, float32 outputs for float32 inputs, and zero sizes."""
    inputs = make_inputs(3, 10, 4, "padding", seed=62)
    ops = emulated_binding
    with pytest.raises(ValueError, match=r"kind must be 1 \(AT/RP: normalise direction\) or 2 \(iAT\) for the pair"):
        ops.attention_pool_pair_fwd(inputs.h, inputs.scores, inputs.mask, inputs.grad, 0, 1.0)
    dc = torch.randn(3, 4)
    attention = torch.softmax(inputs.scores, -1)
    with pytest.raises(ValueError, match=r"grad_context_adv must have shape \[B, H\] = \[3, 4\]"):
        ops.attention_pool_pair_bwd(dc, None, dc[:, :2], None, inputs.h, attention, attention)
    with pytest.raises(ValueError, match=r"grad_context must have shape \[B, H\] = \[3, 4\]"):
        ops.attention_scores_grad(dc[:, :2], None, inputs.h, attention)
    row = 1
    position = int(inputs.mask[row].nonzero()[-1])
    for target in ("scores", "direction"):
        scores = _poison(inputs.scores, row, position, float("nan")) if target == "scores" else inputs.scores
        grad = _poison(inputs.grad, row, position, float("inf")) if target == "direction" else inputs.grad
        for code in (1, 2):
            with pytest.raises(RuntimeError, match=f"^{target} holds NaN or inf at real"):
                ops.attention_pool_pair_fwd(inputs.h, scores, inputs.mask, grad, code, 1.0)
    outs = ops.attention_pool_pair_fwd(inputs.h, inputs.scores, inputs.mask, inputs.grad, 1, 1.0)
    assert all(x.dtype == torch.float32 for x in outs)
    gh, gs = ops.attention_pool_pair_bwd(dc, None, dc, None, inputs.h, outs[1], outs[3])
    assert gh.shape == inputs.h.shape and gs.shape == inputs.scores.shape
    for B, T, H in ((0, 5, 3), (2, 0, 3), (2, 5, 0)):
        x = make_inputs(B or 1, T, H, "none", seed=1, dtype=torch.float64)
        h, scores, grad = x.h[:B], x.scores[:B], x.grad[:B]
        outs = ops.attention_pool_pair_fwd(h, scores, None, grad, 1, 1.0)
        expected = _cpu_pair_ops().attention_pool_pair_fwd(h, scores, None, grad, 1, 1.0)
        for a, b in zip(outs, expected):
            torch.testing.assert_close(a, b)
        dcx = torch.randn(B, H, dtype=torch.float64)
        for a, b in zip(ops.attention_pool_pair_bwd(dcx, None, dcx, None, h, outs[1], outs[3]),
                        _cpu_pair_ops().attention_pool_pair_bwd(dcx, None, dcx, None, h, outs[1], outs[3])):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(ops.attention_scores_grad(dcx, None, h, outs[1]),
                                   _cpu_pair_ops().attention_scores_grad(dcx, None, h, outs[1]))
