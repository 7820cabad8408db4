"""Process-level tuning that pays off on CPUs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from its heap and keep freed memory for reuse.

    By default glibc maps every allocation above a threshold (at most 32 MB) afresh and unmaps
    it when freed, so a training step that allocates the same activations every time pays a
    page fault per 4 KB page, every step: about a tenth of the step time on this machine. The
    cost is that memory freed by the process is not handed back to the OS before it exits.
    Returns whether the setting took (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False
