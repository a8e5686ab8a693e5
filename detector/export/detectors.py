"""Detectors whose spiking networks run on ONNX Runtime: ``load_detector(..., engine="onnxruntime")``.

The PyTorch detector is loaded as usual and keeps its pre- and post-processing (YOLO: letterbox, Ultralytics'
decoding and NMS; Faster R-CNN: torchvision's transform, proposals, RoIAlign, box decoding) and its QANN
(``qann_predict``); its spiking networks (YOLO ``snn``, Faster R-CNN ``stage1`` / ``stage2``) are replaced by
``OrtSpikingNetwork``s running the exported step graphs. ``predict`` gives the same detections, steps and
settled flags, ``stream`` / ``detections_at_steps`` the same detections step by step (for a batch that fits the
exported one); ``spikes`` / ``energy_uj`` are None (the graphs count no spikes). Graphs come from a ``casc export``
folder or are exported on first use into a cache folder (``$CASC_ONNX_CACHE``, else ``~/.cache/casc/onnx``),
keyed by model, checksum, size, batch and dtype.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .bundle import export_detector, read_manifest
from .engine import OrtSpikingNetwork


def cache_root() -> Path:
    base = os.environ.get("CASC_ONNX_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "casc" / "onnx"


def _cached_export(model: str, imgsz: int | None, batch: int, dtype: str) -> Path:
    from ..weights import resolve, sha256_of

    entry = resolve(model)
    digest = entry.sha256 or sha256_of(entry.path)
    key = hashlib.sha256(f"{digest}:{imgsz}:{batch}:{dtype}".encode()).hexdigest()[:16]
    folder = cache_root() / f"{entry.name}-{key}"
    try:
        read_manifest(folder)
    except (FileNotFoundError, ValueError):
        export_detector(model, folder, imgsz=imgsz, batch=batch, dtype=dtype)
    return folder


def load_onnx_detector(name_or_path: str | os.PathLike, provider: str = "cpu", batch: int = 1,
                       imgsz: int | None = None, dtype: torch.dtype = torch.float32, export_dir=None,
                       threads: int | None = None, **kwargs):
    """The PyTorch detector of a bundled name or checkpoint path with its spiking networks on ONNX Runtime.

    ``provider``: cpu, cuda or tensorrt. Graphs for ``batch`` images of ``imgsz`` (larger batches run in
    slices of it) from ``export_dir`` (a ``casc export`` folder; its own size, batch and dtype) or exported
    on first use into the cache; ``threads``: ONNX Runtime's intra-op threads. ``kwargs`` go to the PyTorch
    detector's loader. The host parts run on the CPU, where ONNX Runtime hands the readouts over."""
    from ..weights import load_detector, resolve

    folder = Path(export_dir) if export_dir else _cached_export(str(name_or_path), imgsz, batch,
                                                                 str(dtype).removeprefix("torch."))
    manifest = read_manifest(folder)
    if manifest["name"] != resolve(name_or_path).name:
        raise ValueError(f"{folder} holds the graphs of {manifest['name']}, not of {name_or_path}")
    sizes = {"imgsz": manifest["imgsz"]} if manifest["family"] == "yolo" else {}
    detector = load_detector(name_or_path, dtype=getattr(torch, manifest["dtype"]), **sizes, **kwargs)
    for name, info in manifest["networks"].items():
        network = OrtSpikingNetwork(folder, info, dtype=manifest["dtype"], provider=provider, threads=threads)
        delattr(detector, name)  # an nn.Module takes no other object in a submodule's place
        setattr(detector, name, network)
    return detector
