"""Keep freed memory in the process on CPU, so a training step does not page-fault its activations in.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmap()s and returns
them with munmap(), and trims the heap top back to the OS: every step then faults in its large
activations and gradients page by page again (about 700,000 minor faults in 10 steps of
configs/recflow-2stage.toml at batch 1024). With mmap off for ordinary allocations and trimming off,
freed blocks are reused as a caching allocator would: faults halve and the step's elementwise work
(ReLU backward, zero fills, copies) runs at memory speed. CUDA memory has its own caching allocator,
so this is applied only to CPU training processes. Peak RSS stays what the step needs; it is simply
not returned between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
"""mallopt parameters (glibc malloc.h)."""

TOP_PAD_BYTES = 64 << 20
"""Extra heap requested on each growth, so growing by one activation does not mean one more brk()."""


def keep_freed_memory(log: logging.Logger | None = None) -> bool:
    """Turn off glibc's mmap of large blocks and its heap trimming for this process.

    Allocations that do not fit the heap still fall back to mmap inside glibc, so this cannot make
    an allocation fail. Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = all(mallopt(param, value) == 1
             for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, TOP_PAD_BYTES)))
    if log is not None:
        log.info("CPU allocator: freed memory kept in the process (glibc mallopt)" if ok else
                 "CPU allocator: glibc mallopt refused a setting; allocator left as is")
    return ok
