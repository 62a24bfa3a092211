"""Test-wide set-up. Without a GPU the Triton kernels run under Triton's CPU interpreter, which must be
switched on before triton is first imported (here, before any test module imports fused_attn_at)."""
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (CI lays it there); tests that need it skip with a printed reason if absent.
SHARED_DATA = pathlib.Path(os.environ.get("FUSED_ATTN_AT_SHARED_DATA", REPO.parent / "shared" / "data"))
