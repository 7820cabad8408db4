"""What this machine offers, and process-level tuning that pays off on CPUs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from its heap and keep freed memory for reuse.

    By default glibc maps every allocation above a threshold (at most 32 MB) afresh and unmaps
    it when freed, so a training step that allocates the same activations every time pays a
    page fault per 4 KB page, every step (the README's training table measures what that
    costs). The price is that memory freed by the process is not handed back to the OS before
    it exits.
    Returns whether the setting took (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str = "cpu") -> bool:
    """Whether the device multiplies bfloat16 matrices natively: a CUDA GPU that supports it, or a
    CPU with AVX512-BF16 or AMX. Elsewhere (AVX2 CPUs) PyTorch emulates bfloat16 products, tens
    of times slower than fp32, so bf16 only pays where this is true."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device_type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in probes)
