"""glibc malloc tuning for job workers: large buffers go back to the system when freed.

glibc serves an allocation from its heap arenas unless it is above the mmap threshold, and that
threshold *grows* (up to 32 MiB) each time a large mmapped block is freed. A worker allocates
and frees tensors of 1-32 MiB by the thousand on several threads (download, quantize, check,
upload), so after the first few shards almost all of them land in per-thread arenas, whose freed
memory is kept rather than returned. Measured on the 2.47 GB FP8 benchmark job: the worker's
anonymous memory climbed to 1.33 GB and stayed above 1 GB after the work was done. Fixing the
threshold at 1 MiB (setting it also switches off the growth) holds it at 0.5-0.9 GB.

``mallopt`` is glibc's; elsewhere (musl, macOS) this is a no-op. An operator's own
``MALLOC_MMAP_THRESHOLD_`` / ``GLIBC_TUNABLES`` setting wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def tune_allocator() -> bool:
    """Fix the mmap threshold; True if it was set (False: not glibc, or the operator set one)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
