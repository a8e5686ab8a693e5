"""Detectors whose spiking networks run on ONNX Runtime (``load_detector(..., engine="onnxruntime")``).

The PyTorch detector keeps its pre- and post-processing (YOLO: letterbox, Ultralytics' decoding and NMS; Faster
R-CNN: torchvision's transform, proposals, RoIAlign, box decoding) and its QANN (``qann_predict``); each of its
spiking networks (the family's ``stages``) is replaced by an ``OrtSpikingNetwork`` running the exported step
graphs. ``predict`` gives the same detections, steps and settled flags, ``stream`` / ``detections_at_steps``
the same detections step by step (for a batch that fits the exported one); ``spikes`` / ``energy_uj`` are None
(the graphs count no spikes). Graphs come from a ``casc export`` folder or are exported on first use into a
cache folder (``$CASC_ONNX_CACHE``, else ``~/.cache/casc/onnx``), keyed by model checksum, size, batch and dtype.

This module takes a loaded detector and never loads one (``detector.weights.load_detector`` does, above it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .bundle import read_manifest
from .engine import OrtSpikingNetwork


def cache_root() -> Path:
    base = os.environ.get("CASC_ONNX_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "casc" / "onnx"


def cache_folder(name: str, digest: str, imgsz: int | None, batch: int, dtype: str) -> Path:
    """Where the graphs of the model with content ``digest`` are cached for this size, batch and dtype."""
    key = hashlib.sha256(f"{digest}:{imgsz}:{batch}:{dtype}".encode()).hexdigest()[:16]
    return cache_root() / f"{name}-{key}"


def has_graphs(folder: Path) -> bool:
    try:
        read_manifest(folder)
    except (FileNotFoundError, ValueError):
        return False
    return True


def attach_onnx_networks(detector, family, folder: str | Path, provider: str = "cpu", threads: int | None = None):
    """``detector`` (of ``family``) with each spiking network replaced by the exported graphs in ``folder``, run
    by ONNX Runtime with ``provider`` (cpu, cuda, tensorrt) and ``threads`` intra-op threads."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["family"] != family.name or set(manifest["networks"]) != set(family.stages):
        raise ValueError(f"{folder} holds the graphs of a {manifest['family']} model, not of this {family.name} one")
    for name in family.stages:
        network = OrtSpikingNetwork(folder, manifest["networks"][name], dtype=manifest["dtype"], provider=provider,
                                    threads=threads)
        delattr(detector, name)  # an nn.Module takes no other object in a submodule's place
        setattr(detector, name, network)
    return detector
