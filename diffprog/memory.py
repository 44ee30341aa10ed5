"""Keep freed heap memory in the process, so XLA:CPU does not page-fault its buffers in every step.

XLA:CPU allocates each executable's temporaries per call, often as one block of tens of MiB.
glibc serves blocks that large with `mmap` and unmaps them on free, so every training step maps
fresh pages and takes a page fault on each 4 KiB of them (measured: the SimpleRNN LM benchmark
step 88 → 73 ms). `keep_freed_memory()` raises glibc's mmap and trim thresholds so such blocks
come from the heap and stay there; the process's resident memory then stays at its peak instead
of shrinking between steps. diffprog calls it on import; set DIFFPROG_KEEP_MEMORY=0 before
importing to leave malloc as it is. It does nothing where the C library is not glibc.
"""
from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 2**30) -> bool:
    """Serve allocations below `mmap_threshold` bytes from the heap and never trim it.
    Returns True when glibc accepted both settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
