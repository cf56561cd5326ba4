"""Keep the host memory a training step frees for the next step (glibc's malloc, Linux).

glibc hands large freed blocks back to the operating system: a block above its mmap
threshold (which adapts, up to 32 MiB) with ``munmap``, and the top of its heap once more
than the trim threshold (twice the mmap threshold) lies free there. A training step frees
and allocates the same tensors every step, so the next step faults those pages in again,
each one zeroed by the kernel first. How often that happens depends on the process's
allocation history (one model trained or several side by side, say), and on a CPU it
moved a quantized step's time by up to 21 % in the cases measured (the manual's
Benchmarks page, "Host memory").

``keep_freed_memory`` fixes both thresholds with ``mallopt``: blocks up to 1 GiB come from
the heap, and the heap is never trimmed. The process then keeps its peak, as PyTorch's
CUDA caching allocator keeps it on a GPU. ``ewgs train`` and ``ewgs compare`` call it
before training; a program using the library may call it itself. It leaves the allocator
alone where the user tuned it (glibc's ``MALLOC_*_`` variables or ``GLIBC_TUNABLES``, a
preloaded allocator) or asked it to (``EWGS_KEEP_FREED_MEMORY=0``), and off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: ``mallopt`` parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (the first one glibc accepts: some versions
#: refuse more than 32 MiB)
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
#: Free memory at the heap's top kept, not trimmed (mallopt takes a C int)
TRIM_THRESHOLD = 2**31 - 1
#: Environment variables with which a user tunes glibc's malloc (``mallopt(3)``)
USER_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError):  # the name is unknown off glibc (musl)
        return None
    return ctypes.CDLL(None)


def user_tuned() -> bool:
    """Whether the environment sets malloc's behaviour itself: glibc's own variables and
    tunables, a preloaded allocator (jemalloc, tcmalloc), or ``EWGS_KEEP_FREED_MEMORY=0``."""
    if os.environ.get("EWGS_KEEP_FREED_MEMORY", "1") == "0":
        return True
    if any(name in os.environ for name in USER_SETTINGS):
        return True
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return "malloc" in os.environ.get("LD_PRELOAD", "")


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (see the module's text); True if
    it now does, False where it was left as it was."""
    if user_tuned():
        return False
    libc = _glibc()
    if libc is None:
        return False
    # The mmap threshold first: fixing the trim threshold alone also stops the mmap
    # threshold adapting, at its 128 KiB start, which would mmap every tensor.
    if not any(libc.mallopt(_M_MMAP_THRESHOLD, size) for size in MMAP_THRESHOLDS):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
