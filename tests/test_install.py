"""Issue 13: what a new user meets first. Plain `pip install .` (pip's isolated build, which cannot see torch) into a
fresh venv gives a working `cpu` backend (the kernels compile at the first import, for the torch installed then,
once, even with two processes importing at once); the source tree works from the repository root; a prebuilt _C
made for another torch is never loaded; available_backends never crashes for a missing optional dependency."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fused_attn_at import _build

REPO = pathlib.Path(__file__).resolve().parents[1]

# One fused forward+backward on the cpu backend against the reference, and where the kernels came from.
_SMOKE = """
import json, sys, torch, fused_attn_at, python_ref
from fused_attn_at.ops import cpp
g = torch.Generator().manual_seed(0)
h = torch.randn(3, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
s = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
grad = torch.randn(3, 7, generator=g, dtype=torch.float64)
out = fused_attn_at.attention_pool(h, s, None, perturbation="at", grad=grad, backend="cpu")
ref = python_ref.attention_pool(h, s, None, perturbation="at", grad=grad)
gh, gs = torch.autograd.grad(out.context.sum() + out.attention[:, 0].sum(), (h, s))
rh, rs = torch.autograd.grad(ref.context.sum() + ref.attention[:, 0].sum(), (h, s))
for a, b in ((out.context, ref.context), (gh, rh), (gs, rs)):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
print(json.dumps({"backends": fused_attn_at.available_backends("cpu"), "package": fused_attn_at.__file__,
                  "kernels": cpp._C.__file__}))
"""


def _run(cmd, **kwargs):
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, **kwargs)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc, time.perf_counter() - start


def _torch_requirement() -> str:
    # the torch this test runs under (CI: torch==2.13.0, the CPU wheel); TORCH_SPEC overrides, as in the README
    return os.environ.get("TORCH_SPEC") or f"torch=={torch.__version__.split('+')[0]}"


@pytest.mark.slow
def test_plain_pip_install_into_a_fresh_venv_gives_the_cpu_backend(tmp_path):
    """~3 min: a fresh venv, torch from pip, then plain `pip install .` (isolated build, no torch visible), then
    two processes importing at once from outside the repository: both run the fused op; the kernels were compiled
    once, into the cache. Then the same venv imports the source tree from the repository root."""
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    _, t_venv = _run([sys.executable, "-m", "venv", str(venv)])
    _, t_torch = _run([python, "-m", "pip", "install", "-q", _torch_requirement()])
    proc, t_install = _run([python, "-m", "pip", "install", "-q", str(REPO)])
    cache = tmp_path / "cache"
    # PATH without the venv's bin: a user who calls venv/bin/python without activating it still gets the build
    env = {**os.environ, "FUSED_ATTN_AT_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    env.pop("PYTHONPATH", None)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    start = time.perf_counter()
    procs = [subprocess.Popen([python, "-c", _SMOKE], cwd=outside, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=1500) for p in procs]
    t_first_import = time.perf_counter() - start
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
        info = json.loads(out.strip().splitlines()[-1])
        assert info["backends"] == ["cpu", "reference"]
        assert str(venv) in info["package"], info  # the installed package, not the source tree
        assert info["kernels"].startswith(str(cache)), info
    builds = list(cache.glob("*/_C.so"))
    assert len(builds) == 1, builds
    messages = [err for _, err in results if "compiling the C++ kernels" in err]
    assert 1 <= len(messages) <= 2  # one line from a process that found no build yet (the other may wait on it)
    proc, t_second = _run([python, "-c", _SMOKE], cwd=outside, env=env)
    assert "compiling" not in proc.stderr
    # The source tree, from the repository root: the checkout's csrc/ has the same sources, so its build is
    # the cached one (or an in-place build made for this torch).
    proc, _ = _run([python, "-c", _SMOKE], cwd=REPO, env=env)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["package"] == str(REPO / "fused_attn_at" / "__init__.py")
    assert info["backends"] == ["cpu", "reference"]
    print(f"fresh venv {t_venv:.0f} s, pip install torch {t_torch:.0f} s, plain pip install . {t_install:.0f} s, "
          f"first import (two processes, compiling) {t_first_import:.0f} s, second import {t_second:.1f} s")


def _copy_package(tmp_path: pathlib.Path) -> pathlib.Path:
    """The package and the reference, without csrc/ beside them, with this checkout's compiled _C if any."""
    root = tmp_path / "pkg"
    root.mkdir()
    for name in ("fused_attn_at", "python_ref"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "_csrc"))
    return root


def test_a_prebuilt_extension_for_another_torch_is_never_loaded(tmp_path):
    """An _C whose record names another torch is an ABI crash waiting to happen: the package does not load it,
    and (with compiling at import forbidden) says why instead."""
    root = _copy_package(tmp_path)
    if not list((root / "fused_attn_at").glob("_C.*")):
        (root / "fused_attn_at" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not a library")
    (root / "fused_attn_at" / _build.BUILD_RECORD).write_text(json.dumps(
        {"torch": "1.0.0", "python": "cpython-311-x86_64-linux-gnu", "sources": None, "cuda": False}))
    script = ("import fused_attn_at, sys; from fused_attn_at.ops import cpp; "
              "print(fused_attn_at.available_backends('cpu')); print(cpp.UNAVAILABLE_REASON); "
              "print('_C' in str(sys.modules.get('fused_attn_at._C')))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no triton on CPU: cpu or nothing
    proc, _ = _run([sys.executable, "-c", script], cwd=root, env={**env, "FUSED_ATTN_AT_NO_JIT": "1", "PYTHONPATH": str(root)})
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "['reference']"
    assert f"built for torch '1.0.0', not '{torch.__version__}'" in lines[1]
    assert "FUSED_ATTN_AT_NO_JIT=1" in lines[1]
    assert lines[2] == "False"  # never imported


def test_prebuilt_record_must_match_torch_python_and_sources(tmp_path, monkeypatch):
    package = tmp_path / "fused_attn_at"
    package.mkdir()
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(_build, "PACKAGE_DIR", str(package))
    root = str(REPO / "csrc")
    assert "has no _C_build.json" in _build._prebuilt_mismatch(torch, root)
    record = _build.build_record(torch, root, with_cuda=False)
    _build.write_record(str(package / "_C.so"), record)
    assert _build._prebuilt_mismatch(torch, root) is None
    for key, value, words in (("torch", "9.9.9", "for torch '9.9.9'"), ("python", "cpython-39", "for Python"),
                              ("sources", "0" * 64, "for kernel sources")):
        _build.write_record(str(package / "_C.so"), {**record, key: value})
        assert words in _build._prebuilt_mismatch(torch, root)


def test_editing_a_cuda_file_does_not_outdate_a_cpu_only_build(tmp_path):
    root = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", root)
    cpu_only, with_cuda = _build.source_hash(str(root), False), _build.source_hash(str(root), True)
    (root / "cuda" / "attention_pool_binding.cpp").write_text("// edited\n", encoding="utf-8")
    assert _build.source_hash(str(root), False) == cpu_only
    assert _build.source_hash(str(root), True) != with_cuda
    (root / "cpu" / "kernels.h").write_text("// edited\n", encoding="utf-8")
    assert _build.source_hash(str(root), False) != cpu_only


def test_available_backends_survives_a_missing_optional_dependency(tmp_path):
    """Without numpy (which the Triton module imports), available_backends reports triton unavailable with the
    reason instead of raising ModuleNotFoundError."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    # ModuleNotFoundError, as for a numpy that is not installed (torch itself copes with that one)
    (blocker / "numpy.py").write_text("raise ModuleNotFoundError('numpy is blocked for this test')\n")
    script = ("import fused_attn_at; from fused_attn_at._backend import why_unavailable; import torch; "
              "print(fused_attn_at.available_backends('cpu')); print(why_unavailable('triton', torch.device('cpu')))")
    proc, _ = _run([sys.executable, "-c", script], cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(blocker), "TRITON_INTERPRET": "1"})
    lines = proc.stdout.strip().splitlines()
    assert "triton" not in lines[0] and "reference" in lines[0]
    assert "numpy is blocked for this test" in lines[1]
