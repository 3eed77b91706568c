"""Keep the memory a training step frees for the next step, instead of handing it back to the
kernel and faulting it in again.

A training step allocates and frees the same large activations every step. glibc's malloc serves
blocks above its mmap threshold with fresh mmap()s and gives the top of its heap back once more
than its trim threshold is free, so each step starts by page-faulting its activations in again,
in kernel time (docs/benchmarks.md, "Against nanoGPT", has what it cost there). This
is what tcmalloc or jemalloc, which PyTorch's CPU performance guide recommends preloading, do by
design; glibc does it with two settings, made here through mallopt(3) for the process.

Only where the C library is glibc, and not where the user set MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_ themselves (or preloaded another allocator: then glibc's malloc is not
the one in use and its settings change nothing). The cost: freed memory stays with the process,
so its resident size stays at its peak; a training run is there most of its life anyway.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process (once); whether they were set."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    _done = _done and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
