"""Keep freed heap memory in the process, so XLA:CPU does not page-fault its buffers in every step.

XLA:CPU allocates each executable's temporaries per call, often as blocks of tens of MiB.
glibc serves blocks that large with `mmap` and unmaps them on free, so every training step maps
fresh pages and takes a page fault on each 4 KiB of them. `keep_freed_memory()` raises glibc's
mmap and trim thresholds so such blocks come from the heap and stay there, and keeps every thread
on the one main heap (M_ARENA_MAX = 1): XLA's worker threads otherwise allocate from their own
arenas, whose heaps are capped at 64 MiB and given back to the system, so the thresholds did not
hold for them. Measured on the LSTM language-model benchmark step: ~36,000 page faults (140 MiB)
per step with the thresholds alone, none with one arena; the step went from ~220 to ~185 ms.
The process's resident memory then stays at its peak instead of shrinking between steps.
It changes malloc for the whole process (every library in it), so diffprog never calls it by
itself: call `dp.keep_freed_memory()` once, before the first computation, as the experiments and
benchmarks do. It does nothing where the C library is not glibc.
"""
from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_freed_memory(mmap_threshold: int = 2**30) -> bool:
    """Serve allocations below `mmap_threshold` bytes from the one main heap (all threads) and
    never trim it. Returns True when glibc accepted the settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
                and libc.mallopt(_M_ARENA_MAX, 1))
