"""fused_attn_at.tune_glibc_malloc: freed blocks stay in the process (no page faults on reuse), bad thresholds
are refused by name, and train.py's --malloc switch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fused_attn_at
from fused_attn_at import cpu_allocator

REPO = Path(__file__).resolve().parents[1]

# What glibc does with a 20 MiB block (mallinfo2): under its defaults a block that large is mmapped and given back
# to the OS on free; tuned, it comes from the heap and stays there, free, for the next allocation.
MECHANISM = """
import ctypes, json, sys, torch
import fused_attn_at
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert fused_attn_at.tune_glibc_malloc() is True
if sys.argv[1] == "heap":
    assert fused_attn_at.tune_glibc_malloc(mmap_max=0) is True
block = torch.empty(int(sys.argv[2]) // 4).fill_(1.0)
live = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(json.dumps({"live_mmapped": live.hblkhd, "freed_heap_free": freed.fordblks, "freed_mmapped": freed.hblkhd}))
"""
# The op's pattern (h, its gradient, a temporary: three 16 MiB blocks live at once, then all freed), 20 cycles
# after 5 warm-up ones: minor page faults per cycle, median (a one-off heap growth is not the steady state).
CYCLE = """
import resource, statistics, sys, torch
import fused_attn_at
if sys.argv[1] == "tuned":
    assert fused_attn_at.tune_glibc_malloc() is True
def cycle():
    blocks = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(3)]
    del blocks
for _ in range(5):
    cycle()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""
BLOCK = 20 * 2**20
PAGES_PER_BLOCK = 16 * 2**20 // 4096


def run_script(script: str, mode: str, *args) -> str:
    env_free = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* variables from the caller
    out = subprocess.run([sys.executable, "-c", script, mode, *map(str, args)], capture_output=True, text=True,
                         timeout=120,
                         cwd=REPO, env=env_free)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(cpu_allocator.glibc_version() is None, reason="the C library is not glibc")
def test_tuned_malloc_keeps_freed_blocks_in_the_process():
    default, tuned = (json.loads(run_script(MECHANISM, mode, BLOCK)) for mode in ("default", "tuned"))
    assert default["live_mmapped"] >= BLOCK and default["freed_mmapped"] < BLOCK, default  # mmapped, then unmapped
    assert default["freed_heap_free"] < BLOCK, default
    assert tuned["live_mmapped"] < BLOCK and tuned["freed_heap_free"] >= BLOCK, tuned  # heap, kept after free
    assert float(run_script(CYCLE, "tuned")) < 0.05 * PAGES_PER_BLOCK  # so reusing it faults nothing in
    # above glibc's largest mmap threshold (32 MiB) a block is mmapped however tuned, unless mmap_max=0
    big = 48 * 2**20
    tuned_big, heap_big = (json.loads(run_script(MECHANISM, mode, big)) for mode in ("tuned", "heap"))
    assert tuned_big["live_mmapped"] >= big and tuned_big["freed_heap_free"] < big, tuned_big
    assert heap_big["live_mmapped"] < big and heap_big["freed_heap_free"] >= big, heap_big


@pytest.mark.parametrize("kwargs, message", [
    ({"mmap_threshold": 64 * 2**20}, "mmap_threshold must be an int in [0, 33554432]"),
    ({"mmap_threshold": -1}, "mmap_threshold must be an int"),
    ({"mmap_threshold": 1.5}, "mmap_threshold must be an int"),
    ({"trim_threshold": 2**31}, "trim_threshold must be an int in [0, 2**31)"),
    ({"trim_threshold": True}, "trim_threshold must be an int"),
    ({"mmap_max": -1}, "mmap_max must be None or an int in [0, 2**31)"),
])
def test_bad_thresholds_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        fused_attn_at.tune_glibc_malloc(**kwargs)


def test_train_malloc_switch_is_checked():
    out = subprocess.run([sys.executable, str(REPO / "experiments" / "train.py"), "--malloc", "jemalloc"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "--malloc: invalid choice: 'jemalloc'" in out.stderr, out.stderr
