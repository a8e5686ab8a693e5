"""Giving freed memory back to the OS (glibc): the service's peak RSS is set by what it holds, not by what it
held once. Inference batches and large decodes free hundreds of MB that glibc would otherwise keep in its
heaps (one per thread) for good. No-ops where the C library is not glibc."""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # mallopt parameter numbers (malloc.h)
ARENAS = 2  # heaps shared by all threads: fewer heaps, less memory stranded in them


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _glibc()


def limit_arenas(count: int = ARENAS) -> None:
    """Call before the worker threads start (threads made later share these heaps)."""
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, int(count))


def release_freed() -> None:
    """Return the free pages at the top and inside glibc's heaps to the OS (a few ms)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
