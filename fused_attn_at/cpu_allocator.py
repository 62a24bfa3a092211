"""Keep freed memory in the process under glibc's malloc, so that CPU training stops paying page faults.

PyTorch's CPU allocator is the C library's malloc. glibc serves a large block (an op's [B, T, H] output or
gradient: 16 MiB at B=64 T=256 H=256 float32) from a fresh mmap or from the heap top, and on free may give it
back to the OS (munmap, or trimming the heap top beyond M_TRIM_THRESHOLD). The next call's block of the same
size then faults in again, page by page (1-2 us per 4 KiB page on the machines measured): 16 MiB is 4096 pages.
How often that happens depends on the machine and the allocation pattern (benchmarks/RESULTS.md,
"Allocator"): on one machine the default training step faulted ~1600 pages per step under glibc's defaults and
ran 1.38x faster tuned; on another it faulted 24 and gained nothing. Blocks above 32 MiB are always mmapped
unless mmap_max=0: the backward at B=64 T=1024 H=256 (64 MiB dh) ran 1.6-1.7x faster with its dh reused.

`tune_glibc_malloc()` does at run time what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do at process start:
blocks below 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heap, and the heap is trimmed only
beyond 1 GiB of free memory at its top. The cost is resident memory: freed blocks stay mapped in the process
(up to the trim threshold) for the next allocation to reuse. It changes the whole process's allocator, so the
library never calls it on import; experiments/train.py calls it on the CPU unless --malloc as-is is given.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's largest accepted M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long))
MAX_MMAP_THRESHOLD = 32 * 2**20
DEFAULT_MMAP_THRESHOLD = MAX_MMAP_THRESHOLD
DEFAULT_TRIM_THRESHOLD = 2**30


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (the one that has mallopt's thresholds), else None."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # glibc only: musl and the BSDs have no such symbol
        version.restype = ctypes.c_char_p
        version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def glibc_version() -> str | None:
    libc = _glibc()
    return None if libc is None else libc.gnu_get_libc_version().decode()


def tune_glibc_malloc(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
                      *, mmap_max: int | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring). Returns True when
    applied, False when the C library is not glibc (nothing is changed: other allocators keep freed memory
    on their own terms). Raises ValueError for a threshold glibc would refuse.

    mmap_max=0 also serves blocks above 32 MiB from the heap (glibc's M_MMAP_MAX: how many blocks may be
    mmapped at once; None leaves glibc's default). Without it such a block (dh at B=64 T=1024 H=256: 64 MiB) is
    mmapped fresh and faulted in on every call: the op's backward there took 13.7 ms with it faulted in and
    7.6 ms with it reused (benchmarks/RESULTS.md, "Allocator"). The price: memory freed below the heap top is
    never returned to the OS, so the process keeps its peak footprint (as a GPU caching allocator does)."""
    if isinstance(mmap_threshold, bool) or not isinstance(mmap_threshold, int) or \
            not 0 <= mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be an int in [0, {MAX_MMAP_THRESHOLD}] bytes (glibc's largest on "
                         f"64-bit), got {mmap_threshold!r}")
    if isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int) or not 0 <= trim_threshold < 2**31:
        raise ValueError(f"trim_threshold must be an int in [0, 2**31) bytes, got {trim_threshold!r}")
    if mmap_max is not None and (isinstance(mmap_max, bool) or not isinstance(mmap_max, int)
                                 or not 0 <= mmap_max < 2**31):
        raise ValueError(f"mmap_max must be None or an int in [0, 2**31), got {mmap_max!r}")
    libc = _glibc()
    if libc is None:
        return False
    settings = [(M_MMAP_THRESHOLD, mmap_threshold, "M_MMAP_THRESHOLD"),
                (M_TRIM_THRESHOLD, trim_threshold, "M_TRIM_THRESHOLD")]
    if mmap_max is not None:
        settings.append((M_MMAP_MAX, mmap_max, "M_MMAP_MAX"))
    for parameter, value, name in settings:
        if libc.mallopt(parameter, value) != 1:
            raise RuntimeError(f"glibc's mallopt({name}, {value}) failed")
    return True
