"""One interface over both detector families (YOLO, Faster R-CNN) for the service.

Images reach the backends as HxWx3 uint8 **RGB** arrays; results are plain JSON-ready dicts.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from detector.models import as_records


@dataclass(frozen=True)
class Params:
    """Inference settings; requests with equal params can share one batched ``predict`` call."""

    wake: int | None = None  # None: the model's levels
    sleep: int | str = "auto"
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300

    def key(self) -> tuple:
        return (self.wake, self.sleep, self.conf, self.iou, self.max_det)


def _detections(record: dict) -> list[dict]:
    return [{"box": [round(float(v), 3) for v in b], "score": float(s), "class_id": int(c), "name": str(n)}
            for b, s, c, n in zip(record["boxes"], record["scores"], record["classes"], record["names"])]


def result_of(record: dict, wake: int | None, settled: bool | None = None) -> dict:
    return {"detections": _detections(record), "steps": record.get("steps"), "wake": wake,
            "spikes": record.get("spikes"), "energy_uj": record.get("energy_uj"), "settled": settled}


class Backend(ABC):
    """Common part: name, family, levels, class names."""

    family = "?"

    def __init__(self, name: str, model, source: str):
        self.name, self.model, self.source = name, model, source

    @property
    def levels(self) -> int:
        return int(self.model.levels)

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "architecture": self.architecture(),
                "levels": self.levels, "classes": self.class_names(), "imgsz": self.imgsz(),
                "default_wake": self.levels, "default_sleep": "auto", "source": self.source}

    def imgsz(self) -> int | None:
        return None

    def architecture(self) -> str:
        return type(self.model).__name__

    def class_names(self) -> list[str]:
        return []

    @abstractmethod
    def predict(self, images: list[np.ndarray], p: Params) -> list[dict]:
        """One result dict per image."""

    @abstractmethod
    def stream(self, image: np.ndarray, p: Params) -> Iterator[dict]:
        """One event dict per time step, then the final result."""


class YOLOBackend(Backend):
    family = "yolo"

    def imgsz(self) -> int:
        return int(self.model.imgsz)

    def architecture(self) -> str:
        yaml = getattr(self.model.qann, "yaml", {}) or {}
        return str(yaml.get("yaml_file") or yaml.get("arch") or "yolo")

    def class_names(self) -> list[str]:
        names = self.model.names or {}
        return [str(names[i]) for i in sorted(names)]

    def predict(self, images, p):
        wake = p.wake or self.levels
        dets = self.model.predict(list(images), wake=wake, sleep=p.sleep, conf=p.conf, iou=p.iou,
                                  max_det=p.max_det, batch=max(1, len(images)), color="rgb")
        return [result_of(as_records(d), wake) for d in dets]

    def stream(self, image, p):
        wake = p.wake or self.levels
        last = None
        for ev in self.model.stream(image, wake=wake, sleep=p.sleep, conf=p.conf, iou=p.iou, max_det=p.max_det,
                                    color="rgb"):
            last = ev
            yield {"type": "step", "stage": 1, "t": ev.t, "phase": ev.phase, "wake": ev.wake, "spikes": ev.spikes,
                   "cumulative_spikes": ev.cumulative_spikes, "settled": ev.settled,
                   "detections": _detections(as_records(ev.detections))}
        if last is None:
            raise RuntimeError("the model produced no time step")
        yield {"type": "final", **result_of(as_records(last.detections), wake)}


class RCNNBackend(Backend):
    family = "rcnn"

    def architecture(self) -> str:
        return str(self.model.meta.get("arch") or "fasterrcnn")

    def class_names(self) -> list[str]:
        if self.model.classes:
            return [str(c) for c in self.model.classes]
        n = self.model.qann.roi_heads.box_predictor.cls_score.out_features - 1
        return [str(i) for i in range(n)]

    def _filter(self, res: dict, p: Params) -> dict:
        """``conf`` is the score threshold; ``iou`` an extra class-wise NMS; ``max_det`` a cap."""
        import torch
        from torchvision.ops import batched_nms

        boxes, scores, labels = res["boxes"], res["scores"], res["labels"]
        keep = scores >= p.conf
        idx = torch.nonzero(keep).flatten()
        if idx.numel():
            idx = idx[batched_nms(boxes[idx].float(), scores[idx].float(), labels[idx], p.iou)]
        idx = idx[: p.max_det]
        out = dict(res)
        out["boxes"], out["scores"], out["labels"] = boxes[idx], scores[idx], labels[idx]
        if res.get("names") is not None:
            out["names"] = [res["names"][int(i)] for i in idx]
        return out

    def _record(self, res: dict, p: Params) -> dict:
        return result_of(as_records(self._filter(res, p), self.class_names()), p.wake or self.levels,
                         res.get("settled"))

    def predict(self, images, p):
        results = self.model.predict(list(images), wake=p.wake or self.levels, sleep=p.sleep, score_thresh=p.conf)
        return [self._record(r, p) for r in results]

    def stream(self, image, p):
        total = 0.0
        for ev in self.model.stream(image, wake=p.wake or self.levels, sleep=p.sleep, score_thresh=p.conf):
            total += float(ev.spikes or 0.0)
            dets = _detections(as_records(self._filter(ev.detections, p), self.class_names())) \
                if ev.detections is not None else []
            yield {"type": "step", "stage": ev.stage, "t": ev.t_total, "phase": ev.phase, "wake": ev.wake,
                   "spikes": ev.spikes, "cumulative_spikes": total, "settled": ev.settled, "detections": dets}
            if ev.final:
                yield {"type": "final", **self._record(ev.detections, p)}


def load_backend(name_or_path: str, device: str = "cpu") -> Backend:
    """A backend for a manifest name or a checkpoint path (sha256-checked by ``load_detector``)."""
    from detector.weights import load_detector, load_manifest

    manifest = load_manifest()
    model = load_detector(name_or_path, device=device)
    name = name_or_path if name_or_path in manifest else Path(name_or_path).stem
    cls = YOLOBackend if hasattr(model, "names") and hasattr(model, "imgsz") else RCNNBackend
    return cls(name, model, source=str(name_or_path))


def default_model_name() -> str:
    """The first QANN entry of the manifest (``casc serve`` without ``--model``)."""
    from detector.weights import load_manifest

    for name, entry in load_manifest().items():
        if entry.kind == "qann":
            return name
    raise ValueError("no --model given and weights/manifest.json lists no QANN model: pass "
                     "--model NAME|PATH (a checkpoint file)")


def warmup(backend: Backend) -> float:
    """One tiny predict so the first request does not pay for lazy initialisation; returns seconds."""
    start = time.perf_counter()
    backend.predict([np.full((32, 32, 3), 114, np.uint8)], Params(sleep=0))
    return time.perf_counter() - start
