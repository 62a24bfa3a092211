"""How the compiled kernels (fused_attn_at._C, from csrc/) are built and found, shared by setup.py (the ahead-of-time
build, `pip install --no-build-isolation .`) and by the first import (the build for the running torch, when no
prebuilt _C matches it).

Why two paths: a torch C++ extension must be compiled against the very torch that loads it (another torch is an
ABI crash or an undefined symbol), and pip's isolated build (plain `pip install .`) cannot see the torch of the
environment. So setup.py builds _C ahead when it can import torch, and records which torch and which sources it
was built from (_C_build.json beside it). At import, a _C whose record matches the running torch and the
package's sources is loaded; otherwise the same sources are compiled once for the running torch with
torch.utils.cpp_extension.load into a cache folder keyed by torch version and source hash (torch's own file
lock makes two processes importing at once build it once).

This module imports no torch at module level: setup.py loads it by path before anything is installed.

Environment:
    FUSED_ATTN_AT_NO_EXT=1    no compiled extension (build and first import): Triton/reference backends only
    FUSED_ATTN_AT_NO_JIT=1    never compile at import: use a matching prebuilt _C or none
    FUSED_ATTN_AT_NO_CUDA=1   build the CPU kernels only
    FUSED_ATTN_AT_CACHE=DIR   where first-import builds are kept (default $XDG_CACHE_HOME/fused_attn_at or
                              ~/.cache/fused_attn_at)
    FUSED_ATTN_AT_DEBUG=1, FUSED_ATTN_AT_NATIVE=1: -O0 -g, or -march=native
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
BUILD_RECORD = "_C_build.json"
# The sources shipped inside the package (setup.py copies csrc/ there) for a build at first import.
PACKAGED_SOURCES = "_csrc"


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def source_root() -> str | None:
    """The folder holding ops.cpp, cpu/ and cuda/: the repository's csrc/ for a source checkout, else the copy
    shipped in the package; None if neither exists."""
    checkout = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")
    for root in (checkout, os.path.join(PACKAGE_DIR, PACKAGED_SOURCES)):
        if os.path.isfile(os.path.join(root, "ops.cpp")):
            return root
    return None


def cpu_sources(root: str) -> list[str]:
    """Every .cpp under root except the CUDA folder (each op family keeps its kernels in a folder of its own)."""
    return sorted(path for path in glob.glob(os.path.join(root, "**", "*.cpp"), recursive=True)
                  if not os.path.relpath(path, root).replace(os.sep, "/").startswith("cuda/"))


def cuda_sources(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "cuda", "*.cu")) + glob.glob(os.path.join(root, "cuda", "*.cpp")))


def source_hash(root: str, with_cuda: bool) -> str:
    """sha256 over every source and header the build reads (names relative to root, and contents); cuda/ only
    when the CUDA kernels are built, so that editing them does not outdate a CPU-only build."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        relative = os.path.relpath(path, root).replace(os.sep, "/")
        if not with_cuda and relative.startswith("cuda/"):
            continue
        if os.path.isfile(path) and path.endswith((".cpp", ".cu", ".h", ".cuh")):
            digest.update(relative.encode())
            digest.update(b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def cxx_flags() -> list[str]:
    debug = flag("FUSED_ATTN_AT_DEBUG")
    flags = ["-std=c++20", "-fopenmp", "-O0" if debug else "-O3", "-g" if debug else "-DNDEBUG"]
    if not debug:
        flags += ["-ffp-contract=fast", "-fno-math-errno"]
    # -march=native would make a wheel that crashes on older CPUs; the kernels pick AVX2 at run time (isa.cpp).
    if flag("FUSED_ATTN_AT_NATIVE"):
        flags.append("-march=native")
    return flags


LINK_FLAGS = ["-fopenmp"]  # on both compile and link, or at::parallel_for silently runs on one thread
# no --use_fast_math: IEEE exp/sqrt/division cost nothing in these memory-bound kernels and keep them within
# the tolerance rule on every input
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo"]
CUDA_DEFINE = ("FUSED_ATTN_AT_WITH_CUDA", "1")


def cuda_reason(torch) -> str | None:
    """None if the CUDA kernels can be built here, else why not."""
    if flag("FUSED_ATTN_AT_NO_CUDA"):
        return "FUSED_ATTN_AT_NO_CUDA is set"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU build"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit found (set CUDA_HOME to the folder that holds bin/nvcc)"
    return None


def build_record(torch, root: str | None, with_cuda: bool) -> dict:
    """What a built _C must match to be loaded by this process."""
    return {
        "torch": torch.__version__,
        "python": sysconfig.get_config_var("SOABI") or sys.version.split()[0],
        "sources": source_hash(root, with_cuda) if root else None,
        "cuda": with_cuda,
    }


def write_record(extension_path: str, record: dict) -> None:
    with open(os.path.join(os.path.dirname(extension_path), BUILD_RECORD), "w") as f:
        json.dump(record, f, indent=1)


def _prebuilt_mismatch(torch, root: str | None) -> str | None:
    """None when the _C in the package was built for this torch, Python and these sources, else why not."""
    path = os.path.join(PACKAGE_DIR, BUILD_RECORD)
    if not glob.glob(os.path.join(PACKAGE_DIR, "_C.*")):
        return "no prebuilt fused_attn_at._C"
    if not os.path.isfile(path):
        return f"the prebuilt fused_attn_at._C has no {BUILD_RECORD} saying which torch it was built for"
    with open(path) as f:
        built = json.load(f)
    now = build_record(torch, root, built.get("cuda", False))
    for key, what in (("torch", "torch"), ("python", "Python"), ("sources", "kernel sources")):
        if built.get(key) != now[key] and not (key == "sources" and now[key] is None):
            return f"the prebuilt fused_attn_at._C was built for {what} {built.get(key)!r}, not {now[key]!r}"
    return None


def cache_dir() -> str:
    base = os.environ.get("FUSED_ATTN_AT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fused_attn_at")
    return base


def _ninja_on_path() -> None:
    """torch's JIT build runs `ninja` from PATH; a venv's python run without activating the venv has the ninja
    wheel's binary beside it but not on PATH."""
    if shutil.which("ninja"):
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "ninja")):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return


def _build_now(torch, root: str):
    """Compile _C for the running torch into the cache (or reuse it) and load it."""
    from torch.utils import cpp_extension

    with_cuda = cuda_reason(torch) is None and bool(cuda_sources(root))
    record = build_record(torch, root, with_cuda)
    key = f"torch{record['torch']}-{record['python']}-{'cuda' if with_cuda else 'cpu'}-{record['sources'][:16]}"
    folder = os.path.join(cache_dir(), key.replace("+", "_"))
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(folder, "_C.so")):
        print(f"fused_attn_at: compiling the C++ kernels for torch {torch.__version__} (once; about a minute) "
              f"into {folder}", file=sys.stderr, flush=True)
    _ninja_on_path()
    define = [f"-D{CUDA_DEFINE[0]}={CUDA_DEFINE[1]}"] if with_cuda else []
    module = cpp_extension.load(
        name="_C",
        sources=cpu_sources(root) + (cuda_sources(root) if with_cuda else []),
        extra_cflags=cxx_flags() + define,
        extra_ldflags=LINK_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS + define if with_cuda else None,
        extra_include_paths=[root],
        build_directory=folder,
        with_cuda=with_cuda,
        verbose=False,
    )
    write_record(os.path.join(folder, "_C.so"), record)
    return module


def load_extension():
    """(module, None) with the compiled ops registered, or (None, why not). Never raises: without kernels the
    package still runs its other backends, and says why."""
    import torch

    if flag("FUSED_ATTN_AT_NO_EXT"):
        return None, "FUSED_ATTN_AT_NO_EXT=1 is set"
    root = source_root()
    mismatch = _prebuilt_mismatch(torch, root)
    if mismatch is None:
        try:
            from . import _C

            return _C, None
        except ImportError as exc:
            mismatch = f"import fused_attn_at._C failed: {exc}"
    if flag("FUSED_ATTN_AT_NO_JIT"):
        return None, f"{mismatch}, and FUSED_ATTN_AT_NO_JIT=1 forbids compiling it at import"
    if root is None:
        return None, f"{mismatch}, and the package holds no kernel sources to compile"
    try:
        module = _build_now(torch, root)
    except Exception as exc:  # no compiler, no ninja, a compile error: report, and run the other backends
        text = str(exc).strip().splitlines()
        return None, (f"{mismatch}; compiling it for torch {torch.__version__} failed: "
                      f"{type(exc).__name__}: {text[-1] if text else ''} (needs a C++ compiler and ninja)")
    sys.modules[f"{__package__}._C"] = module
    return module, None
