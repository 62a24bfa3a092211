"""Build of fused_attn_at: the C++ CPU kernels (and the CUDA kernels where torch has CUDA and nvcc) ahead of time
when torch is importable here, else at the first import, for the torch installed then.

    pip install torch==2.13.0 && pip install --no-build-isolation .   # builds the kernels now (fast path)
    pip install .                                                     # pip's isolated build cannot see torch:
                                                                      # the kernels compile at first import

How and why: fused_attn_at/_build.py (shared with the first-import build). Environment: FUSED_ATTN_AT_NO_CUDA=1
skips the CUDA kernels; FUSED_ATTN_AT_NO_EXT=1 skips the compiled extension altogether (the package then runs the
Triton/reference backends only).
"""
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")

# fused_attn_at/_build.py by path: importing the package would import torch, which may be absent here.
_spec = importlib.util.spec_from_file_location("_fused_attn_at_build", os.path.join(ROOT, "fused_attn_at", "_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (fused_attn_at/_csrc), so that an installed package can compile its kernels
    for whatever torch it later runs with (plain `pip install .`, or torch upgraded after the install)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fused_attn_at", build.PACKAGED_SOURCES)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "__pycache__"))


def extensions():
    cmdclass = {"build_py": BuildPyWithSources}
    if build.flag("FUSED_ATTN_AT_NO_EXT"):
        print("fused_attn_at: FUSED_ATTN_AT_NO_EXT is set; building no compiled extension", file=sys.stderr)
        return [], cmdclass
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fused_attn_at: torch is not importable in this build environment (pip's build isolation hides the "
              "installed one), so the C++ kernels will be compiled at the first import, for the torch installed "
              "then (about a minute, once). To build them now: pip install --no-build-isolation .", file=sys.stderr)
        return [], cmdclass

    class BuildExtensionWithRecord(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Writes beside _C which torch, Python and sources it was built from: the package loads a _C only
        when they match (fused_attn_at/_build.py), and compiles one for the running torch otherwise."""

        def run(self):
            super().run()
            for ext in self.extensions:
                with_cuda = any(src.endswith(".cu") for src in ext.sources)
                record = build.build_record(torch, CSRC, with_cuda)
                build.write_record(self.get_ext_fullpath(ext.name), record)  # in place, or into the wheel

    sources = build.cpu_sources("csrc")
    kwargs = dict(extra_compile_args={"cxx": build.cxx_flags()}, extra_link_args=build.LINK_FLAGS)
    reason = build.cuda_reason(torch)
    cuda_sources = build.cuda_sources("csrc")
    if reason is None and cuda_sources:
        kwargs["extra_compile_args"]["nvcc"] = build.NVCC_FLAGS
        kwargs["define_macros"] = [build.CUDA_DEFINE]
        ext = cpp_extension.CUDAExtension("fused_attn_at._C", sources + cuda_sources, **kwargs)
        print("fused_attn_at: building the CPU and CUDA kernels", file=sys.stderr)
    else:
        ext = cpp_extension.CppExtension("fused_attn_at._C", sources, **kwargs)
        print(f"fused_attn_at: building the CPU kernels only ({reason or 'no CUDA sources'})", file=sys.stderr)
    cmdclass["build_ext"] = BuildExtensionWithRecord
    return [ext], cmdclass


ext_modules, cmdclass = extensions()

setup(
    name="fused_attn_at",
    version="0.1.0",
    description="Attention pooling with adversarial perturbations (Attention AT/iAT) in one fused kernel",
    packages=find_packages(include=["fused_attn_at", "fused_attn_at.*", "python_ref", "python_ref.*"]),
    python_requires=">=3.10",
    # torch is not pinned here so that a CUDA torch the user installed first is kept; the README installs
    # the CPU wheel torch==2.13.0 explicitly before this package.
    # ninja: the first-import build (torch.utils.cpp_extension.load) needs it at run time, not only here.
    install_requires=["torch>=2.4", "ninja", "numpy", "scipy", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.7"],
        # experiments/sweep.py --executor ray
        "cluster": ["ray>=2.9"],
        # fused_attn_at.hf: attn_implementation="fused_attn_at" (AttentionInterface + AttentionMaskInterface)
        "transformers": ["transformers>=5.0"],  # fused_attn_at.hf: BERT-class models call AttentionInterface from 5.0
        # pytest-xdist: the suite runs on 2 workers (--dist loadfile: one file per worker, so module fixtures build once)
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "triton>=3.7", "ninja", "pybind11"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
