"""Detectors whose spiking network runs on ONNX Runtime: ``load_detector(..., engine="onnxruntime")``.

The PyTorch detector is still loaded for its pre- and post-processing (YOLO: letterbox, Ultralytics'
decoding and NMS; Faster R-CNN: torchvision's transform, proposals, RoIAlign, box decoding); its
spiking networks are replaced by the exported step graphs, run by ``OrtSpikingNetwork``. Graphs
come from a ``casc export`` folder or are exported on first use into a cache folder
(``$CASC_ONNX_CACHE``, else ``~/.cache/casc/onnx``), keyed by model, checksum, size, batch and dtype.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .bundle import export_detector, read_manifest
from .engine import OrtSpikingNetwork

ENGINES = ("pytorch", "onnxruntime")


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


class OnnxSpikingYOLO:
    """``SpikingYOLO``'s ``raw`` / ``predict`` with the spiking network on ONNX Runtime.

    ``torch_detector`` supplies preprocessing and decoding; ``network`` runs the schedule. Detections
    carry ``steps``, ``wake`` and ``settled`` as with the PyTorch engine; ``spikes`` / ``energy_uj``
    are None (the graphs do not count spikes)."""

    engine = "onnxruntime"

    def __init__(self, torch_detector, network: OrtSpikingNetwork):
        self.torch_detector, self.network = torch_detector, network
        self.levels, self.names, self.imgsz = torch_detector.levels, torch_detector.names, torch_detector.imgsz

    @torch.no_grad()
    def raw(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", burst: int | None = None,
            max_sleep: int = 256, cancel: threading.Event | None = None):
        return self.network.run(x, wake=wake, sleep=sleep, burst=burst, max_sleep=max_sleep, cancel=cancel)

    @torch.no_grad()
    def predict(self, images, wake: int | None = None, sleep: int | str = "auto", conf: float = 0.25,
                iou: float = 0.7, max_det: int = 300, burst: int | None = None, batch: int | None = None,
                color: str = "bgr", classes: list[int] | None = None, max_sleep: int = 256,
                cancel: threading.Event | None = None):
        """As ``SpikingYOLO.predict``; ``batch`` is at most the exported batch (its default)."""
        det = self.torch_detector
        wake = wake if wake is not None else self.levels
        batch = min(batch or self.network.batch, self.network.batch)
        items = images if isinstance(images, torch.Tensor) else list(images) if isinstance(images, (list, tuple)) \
            else [images]
        results = []
        for start in range(0, len(items), batch):
            x, shapes = det._inputs(items[start:start + batch], color)
            run = self.network.run(x, wake=wake, sleep=sleep, burst=burst, max_sleep=max_sleep, cancel=cancel)
            dets = det.decode(run.readout, shapes, conf, iou, max_det, classes)
            for i, d in enumerate(dets):
                d.steps, d.wake, d.settled = int(run.steps[i]), wake, bool(run.settled[i])
                d.spikes = d.energy_uj = None
            results.extend(dets)
        return results


class OnnxSpikingFasterRCNN:
    """``SpikingFasterRCNN.predict`` with both spiking stages on ONNX Runtime; torchvision's transform,
    anchors, proposal selection, RoIAlign and box decoding stay in the PyTorch detector.

    Stage 1 graphs have one padded image size (``casc export --imgsz``): an image batch that pads to
    another size is refused. Stage 2 graphs take up to ``batch x post_nms_top_n`` RoIs (zero rows pad
    the rest). Results carry ``steps``, ``settled`` and ``proposals``; spikes and energy are None."""

    engine = "onnxruntime"

    def __init__(self, torch_detector, stage1: OrtSpikingNetwork, stage2: OrtSpikingNetwork):
        self.torch_detector, self.stage1, self.stage2 = torch_detector, stage1, stage2
        self.levels, self.classes = torch_detector.levels, torch_detector.classes

    @torch.no_grad()
    def predict(self, images, wake: int | None = None, sleep: int | str = "auto", burst: int | None = None,
                score_thresh: float | None = None, max_sleep: int = 256, cancel: threading.Event | None = None):
        det = self.torch_detector
        image_list, original_sizes = det.preprocess(images)
        run1 = self.stage1.run(image_list.tensors, wake=wake, sleep=sleep, burst=burst, max_sleep=max_sleep,
                               cancel=cancel)
        features, objectness, deltas = run1.readout
        features = OrderedDict(features)
        proposals = det.proposals(image_list, features, objectness, deltas)
        rois = det.roi_features(features, proposals, image_list)
        run2 = None
        if rois.shape[0] > 0:
            run2 = self.stage2.run(rois, wake=wake, sleep=sleep, burst=burst, max_sleep=max_sleep, cancel=cancel)
            logits, regression = run2.readout
        else:
            logits, regression = det._empty_stage2(rois)
        results = det.decode(logits, regression, proposals, image_list, original_sizes, score_thresh)
        starts = np.cumsum([0] + [len(p) for p in proposals])
        for i, res in enumerate(results):
            a, b = int(starts[i]), int(starts[i + 1])
            t2 = int(run2.steps[a:b].max()) if run2 is not None and b > a else 0
            res["steps"] = {"stage1": int(run1.steps[i]), "stage2": t2, "total": int(run1.steps[i]) + t2}
            res["settled"] = bool(run1.settled[i]) and (run2 is None or b == a or bool(run2.settled[a:b].all()))
            res["proposals"] = b - a
            res["spikes"] = res["energy_uj"] = None
        return results


def load_detector(name_or_path: str | os.PathLike, engine: str = "onnxruntime", provider: str = "cpu",
                  batch: int = 1, imgsz: int | None = None, dtype: str = "float32", export_dir=None,
                  threads: int | None = None, **kwargs):
    """A detector by bundled name or checkpoint path, with its spiking network on ``engine``.

    ``engine="pytorch"`` is ``detector.weights.load_detector``. ``"onnxruntime"``: ``provider`` cpu,
    cuda or tensorrt; graphs for ``batch`` images of ``imgsz`` from ``export_dir`` (a ``casc export``
    folder) or exported on first use into the cache; ``threads``: ONNX Runtime's intra-op threads."""
    from ..weights import load_detector as load_torch_detector

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "pytorch":
        return load_torch_detector(name_or_path, dtype=getattr(torch, dtype), **kwargs)
    folder = Path(export_dir) if export_dir else _cached_export(str(name_or_path), imgsz, batch, dtype)
    manifest = read_manifest(folder)
    dtype = manifest["dtype"]
    networks = {name: OrtSpikingNetwork(folder, info, dtype=dtype, provider=provider, threads=threads)
                for name, info in manifest["networks"].items()}
    if manifest["family"] == "yolo":
        torch_detector = load_torch_detector(name_or_path, dtype=getattr(torch, dtype), imgsz=manifest["imgsz"],
                                             **kwargs)
        return OnnxSpikingYOLO(torch_detector, networks["snn"])
    torch_detector = load_torch_detector(name_or_path, dtype=getattr(torch, dtype), **kwargs)
    return OnnxSpikingFasterRCNN(torch_detector, networks["stage1"], networks["stage2"])
