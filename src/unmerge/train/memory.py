"""Keep freed tensor memory inside the process (glibc only).

PyTorch's CPU tensors come straight from `malloc`. glibc serves large blocks (megabytes: activations of a batch)
with fresh `mmap`s and hands them back to the kernel on free, so every step pays page faults and zeroing for each
of its large temporaries again: that doubled the time of a residual-MLP forward here. Raising glibc's mmap and trim
thresholds makes freed blocks stay in the heap for reuse. Memory the process has touched is not returned to the
system until it exits, which suits a training process whose peak recurs every step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes an int; blocks larger than 2 GiB still get their own mmap

_applied = False


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed blocks instead of unmapping them; True where it took effect (idempotent)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST))
    return _applied
