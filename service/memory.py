"""Giving freed memory back to the OS (glibc): the service's peak RSS is set by what it holds, not by what it
held once. Inference batches and large decodes free hundreds of MB that glibc would otherwise keep in its
heaps (one per thread) for good. No-ops where the C library is not glibc. And measuring a model's inference memory
(the peak resident set of a predict, Linux), which the byte budget reserves (``service/state.py``)."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")
PEAK_RESET = "5"  # written to clear_refs: the peak resident set (VmHWM) starts again from the current one
PER_IMAGE_FLOOR = 0.25  # an image's part is at least this share of a batch of one's peak: two close peaks are noise


def _status_bytes(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"no {field} in {STATUS}")


def peak_growth(run: Callable[[], object]) -> int | None:
    """Bytes the resident set peaks above its level before ``run()`` (freed pages given back first), while it runs;
    None where the kernel does not keep a peak that can be reset (Linux does)."""
    try:
        release_freed()
        before = _status_bytes("VmRSS")
        CLEAR_REFS.write_text(PEAK_RESET)
    except OSError:
        return None
    run()
    peak = _status_bytes("VmHWM")
    release_freed()
    return max(0, peak - before)


@dataclass(frozen=True)
class InferenceMemory:
    """A model's inference memory in bytes: ``per_image`` for each image of a batch, ``fixed`` once per batch."""

    per_image: int
    fixed: int

    @classmethod
    def from_peaks(cls, one: int, two: int) -> "InferenceMemory":
        """From the peak growth of a batch of one image and of two."""
        per_image = max(two - one, int(one * PER_IMAGE_FLOOR))
        return cls(per_image, max(0, one - per_image))

    def within(self, limit: int, models: int) -> "InferenceMemory":
        """What a byte budget of ``limit`` shared by ``models`` workers reserves: the fixed parts of all at most half
        of it and an image's part at most a quarter, so that requests still fit beside them."""
        return InferenceMemory(min(self.per_image, limit // 4), min(self.fixed, limit // (2 * max(1, models))))
