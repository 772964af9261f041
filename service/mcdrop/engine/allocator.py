"""Keep freed CPU memory for reuse, so chunked sampling does not page-fault every chunk.

glibc hands large blocks back to the kernel (mmap, heap trimming) as soon as they are freed;
the engine frees and reallocates the same few activation buffers every chunk, and each fresh
mapping is zeroed page by page by the kernel. On a 4,573-row x 10,000-sample evaluation that
kernel time was up to half the wall time. Raising both thresholds keeps the buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20  # blocks up to this size come from the reusable heap
TRIM_THRESHOLD_BYTES = 512 << 20  # free heap kept before any is returned to the kernel


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; False where the C library has no mallopt."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
