"""The recorder's fused spike counter: a small C++ kernel (``csrc/spike_counts.cpp``) that counts a neuron output in
one pass instead of the eager path's up to eight tensor operations. At batch 1 recording is mostly the cost of those
small operations, so this is what brings it within 10 % of an unrecorded run on the CPU.

It is built with PyTorch's extension builder on first use (a C++ compiler and ``ninja``; about half a minute, then
cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``); ``make install`` builds it ahead.
Where it cannot be built (no compiler, as in the Docker images) or is turned off with ``CASC_FUSED_COUNTS=0``, the
recorder counts with eager PyTorch: the figures are the same, bit for bit (tests/test_spike_counts.py).

    python -m detector.spike_counts      # build it now and say whether it is used
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger("casc.detector")

SOURCE = Path(__file__).with_name("csrc") / "spike_counts.cpp"
DISABLE_ENV = "CASC_FUSED_COUNTS"


def turned_off() -> bool:
    """Whether ``CASC_FUSED_COUNTS=0`` turns the fused counter off (read at each call: each recorder asks once)."""
    return os.environ.get(DISABLE_ENV, "1") == "0"


def fused_counter():
    """The compiled kernel's module (``count_spikes``, ``count_events``, ``weighted_totals``), or None where it is
    turned off or cannot be built (the reason is logged once)."""
    return None if turned_off() else built_counter()


@functools.lru_cache(maxsize=1)
def built_counter():
    """The kernel, built or loaded from the cache once per process; None where it cannot be built."""
    compiler = os.environ.get("CXX", "c++")  # what PyTorch's extension builder calls
    if shutil.which(compiler) is None:
        log.warning("the fused spike counter is not built: no C++ compiler (%s) on PATH; recording uses eager "
                    "PyTorch counts, the same figures, slower at small batches", compiler)
        return None
    try:
        # its import warns that no CUDA runtime was found, which does not matter for a CPU kernel
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        # Vector instructions only where PyTorch itself uses them on this CPU; the build's name carries the choice,
        # so a cache shared by machines of different CPUs (a home folder on a cluster) holds one build per kind.
        vector = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        flags = ["-O3", "-mavx2", "-mfma"] if vector else ["-O3"]
        name = "casc_spike_counts_avx2" if vector else "casc_spike_counts"
        return load(name, sources=[str(SOURCE)], extra_cflags=flags, verbose=False)
    except Exception as error:  # no ninja, a read-only cache, a compiler error: the eager counts serve
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.warning("the fused spike counter could not be built (%s: %s); recording uses eager PyTorch counts, "
                    "the same figures, slower at small batches", type(error).__name__, reason[:300])
        log.debug("building the fused spike counter failed", exc_info=True)
        return None


def counter_for(counter, x, most: int = 0):
    """``counter`` (a recorder's ``fused_counter``, or None) where it serves ``x``, else None: a contiguous float32
    tensor whose counts per row stay below 2**24 (``most``: the largest possible; 0 for an input of the weighted
    totals, which add in float64), exact in float32 in any order. (A recorder has a counter on the CPU only.)"""
    if counter is not None and x.dtype == torch.float32 and most < 1 << 24 and x.is_contiguous():
        return counter
    return None


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if turned_off():
        print(f"fused spike counter: off ({DISABLE_ENV}=0)")
        return 0
    module = fused_counter()
    print(f"fused spike counter: {'built, used by CPU float32 runs' if module else 'not available, eager counts'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
