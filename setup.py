"""Build of fused_attn_at: the C++ CPU kernels always, the CUDA kernels only where torch has CUDA and nvcc.

    pip install torch==2.13.0            # or the CUDA build of torch you want to build against
    pip install --no-build-isolation .   # builds against the torch that is installed

Environment: FUSED_ATTN_AT_NO_CUDA=1 skips the CUDA kernels; FUSED_ATTN_AT_NO_EXT=1 skips the compiled
extension altogether (the package then runs the Triton/reference backends only).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _cuda_reason(torch) -> str | None:
    """None if the CUDA kernels can be built here, else why not."""
    if _flag("FUSED_ATTN_AT_NO_CUDA"):
        return "FUSED_ATTN_AT_NO_CUDA is set"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU build"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit found (set CUDA_HOME to the folder that holds bin/nvcc)"
    return None


def extensions():
    if _flag("FUSED_ATTN_AT_NO_EXT"):
        print("fused_attn_at: FUSED_ATTN_AT_NO_EXT is set; building no compiled extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "fused_attn_at: building the C++ extension needs torch installed BEFORE the build, and pip's build "
            "isolation hides it. Run:\n    pip install torch==2.13.0 setuptools wheel ninja\n"
            "    pip install --no-build-isolation .\n(or set FUSED_ATTN_AT_NO_EXT=1 to install without it)"
        )
    debug = _flag("FUSED_ATTN_AT_DEBUG")
    cxx = ["-std=c++20", "-fopenmp", "-O0" if debug else "-O3", "-g" if debug else "-DNDEBUG"]
    if not debug:
        cxx += ["-ffp-contract=fast", "-fno-math-errno"]
    # -march=native would make a wheel that crashes on older CPUs; AVX2 is the common floor on x86-64 servers
    # and is opted into with FUSED_ATTN_AT_NATIVE=1 for a local build.
    if _flag("FUSED_ATTN_AT_NATIVE"):
        cxx.append("-march=native")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    reason = _cuda_reason(torch)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if reason is None and cuda_sources:
        # no --use_fast_math: IEEE exp/sqrt/division cost nothing in these memory-bound kernels and keep them
        # within the tolerance rule on every input
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20", "-lineinfo"]
        kwargs["define_macros"] = [("FUSED_ATTN_AT_WITH_CUDA", "1")]
        ext = cpp_extension.CUDAExtension("fused_attn_at._C", sources + cuda_sources, **kwargs)
        print("fused_attn_at: building the CPU and CUDA kernels", file=sys.stderr)
    else:
        ext = cpp_extension.CppExtension("fused_attn_at._C", sources, **kwargs)
        print(f"fused_attn_at: building the CPU kernels only ({reason or 'no CUDA sources'})", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fused_attn_at",
    version="0.1.0",
    description="Attention pooling with adversarial perturbations (Attention AT/iAT) in one fused kernel",
    packages=find_packages(include=["fused_attn_at", "fused_attn_at.*", "python_ref", "python_ref.*"]),
    python_requires=">=3.10",
    # torch is not pinned here so that a CUDA torch the user installed first is kept; the README installs
    # the CPU wheel torch==2.13.0 explicitly before this package.
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.7"],
        # experiments/sweep.py --executor ray
        "cluster": ["ray>=2.9"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.7", "ninja", "pybind11"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
