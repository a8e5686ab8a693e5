"""``--device`` values as torch devices, with a one-line error for a device this machine does not have."""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "default_threads"]  # the public API (apps import only these)


def resolve_device(spec: str) -> torch.device:
    """``spec``: "auto" (the GPU when one is visible, else the CPU), or a torch device name (cpu, cuda, cuda:1,
    mps). A name this machine cannot run raises ``ValueError`` saying why."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device name (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {spec}: CUDA is not available here ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {spec}: MPS is not available here; use --device cpu")
    return device


def default_threads() -> int:
    """Half the cores, at least one. Measured on 2 shared cores: with 2 torch threads a YOLOv8n forward took
    4 s instead of 20 ms once other work ran beside it (each parallel region waits for a descheduled thread);
    with 1 thread the whole default run still finished in about 2 minutes under a load of 7."""
    return max(1, (os.cpu_count() or 2) // 2)
