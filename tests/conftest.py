"""Test-wide set-up. Without a GPU the Triton kernels run under Triton's CPU interpreter, which must be
switched on before triton is first imported (here, before any test module imports fused_attn_at)."""
import hashlib
import os
import pathlib
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _source_digest() -> str:
    digest = hashlib.sha256()
    for folder in ("fused_attn_at", "python_ref", "csrc"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".cpp", ".h", ".cu") and path.is_file():
                digest.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


# Inductor's on-disk cache is keyed on the graph that calls an op, not on the op's code: after the ops change, a
# warm cache can hand back code compiled for the old ones (seen with the Triton ops). One cache per version of
# the package's sources keeps the warm cache across runs and never mixes versions.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "fused_attn_at_inductor", _source_digest()))
# ../shared/data beside the checkout (CI lays it there); tests that need it skip with a printed reason if absent.
SHARED_DATA = pathlib.Path(os.environ.get("FUSED_ATTN_AT_SHARED_DATA", REPO.parent / "shared" / "data"))


# pytest-xdist --dist loadfile hands the test files to the workers in collection order: the files with a
# multi-minute test go first, so that none of them runs alone at the end while the other worker idles.
_SLOW_FILES_FIRST = ("test_install.py", "test_hardening.py", "test_sweep_ray.py", "test_cuda_compile.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every file keeps its own order
