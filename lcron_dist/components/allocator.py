"""Keep freed memory in the process on CPU, so work that repeats (a training step, a day's conversion)
does not page-fault its buffers in again every time.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmap()s and returns
them with munmap(), and trims the heap top back to the OS: every step then faults in its large
activations and gradients page by page again (about 700,000 minor faults in 10 steps of
configs/recflow-2stage.toml at batch 1024), and every converted day its unpickled bytes and joined rows
(47,000 faults per 20,000-request day, 18,000 with memory kept). With mmap off for ordinary allocations
and trimming off, freed blocks are reused as a caching allocator would: faults halve and the step's
elementwise work (ReLU backward, zero fills, copies) runs at memory speed. CUDA memory has its own
caching allocator, so training applies this only to CPU processes. Peak RSS stays what the work needs;
it is simply not returned in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable, Iterator

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
"""mallopt parameters (glibc malloc.h)."""

TOP_PAD_BYTES = 64 << 20
"""Extra heap requested on each growth, so growing by one activation does not mean one more brk()."""

KEPT = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, TOP_PAD_BYTES))
DEFAULTS = ((M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024), (M_TOP_PAD, 128 * 1024))
"""glibc's documented defaults (mallopt(3)), restored by freed_memory_kept."""


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both or neither: glibc)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def _set(mallopt: Callable[[int, int], int], settings: tuple[tuple[int, int], ...]) -> bool:
    """Apply every setting (all of them, even after one is refused: restoring defaults must not stop
    half-way); True if glibc accepted each."""
    return all([mallopt(param, value) == 1 for param, value in settings])


def keep_freed_memory(log: logging.Logger | None = None) -> bool:
    """Turn off glibc's mmap of large blocks and its heap trimming for the rest of this process.

    Allocations that do not fit the heap still fall back to mmap inside glibc, so this cannot make
    an allocation fail. Returns False (and changes nothing) where the C library is not glibc.
    """
    libc = _glibc()
    ok = libc is not None and _set(libc.mallopt, KEPT)
    if log is not None:
        log.info("CPU allocator: freed memory kept in the process (glibc mallopt)" if ok else
                 "CPU allocator: not glibc, or glibc mallopt refused a setting; allocator left as is")
    return ok


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[None]:
    """keep_freed_memory for the duration of a block; on exit glibc's defaults come back and the kept
    memory is returned to the OS (malloc_trim). Where the C library is not glibc, changes nothing."""
    libc = _glibc()
    if libc is None:
        yield
        return
    _set(libc.mallopt, KEPT)
    try:
        yield
    finally:
        _set(libc.mallopt, DEFAULTS)
        libc.malloc_trim(0)
