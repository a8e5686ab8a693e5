"""One interface over both detector families (YOLO, Faster R-CNN) for the service.

Images reach the backends as HxWx3 uint8 **RGB** arrays; both families' ``predict`` / ``stream`` take the same
arguments and return ``detector.detect.Results``, made plain JSON-ready dicts here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from detector.families import family_of, get_family
from detector.options import Schedule, Selection

from .memory import InferenceMemory, peak_growth


@dataclass(frozen=True)
class Params(Selection, Schedule):
    """A request's schedule and selection (``detector.options``); requests with equal params can share one
    batched ``predict`` call."""

    def heavy(self, levels: int) -> bool:
        """Costs more than a default request: more wake steps than L, a fixed sleep over L, or a burst smaller
        than the wake count (which needs several times the sleep steps)."""
        wake = self.wake or levels
        return wake > levels or (isinstance(self.sleep, int) and self.sleep > levels) or \
            (self.burst is not None and self.burst < wake)


def scale_detections(detections: list[dict], sx: float, sy: float) -> list[dict]:
    """Boxes from the (resized) model input back to the original image's pixels."""
    if sx == 1.0 and sy == 1.0:
        return detections
    return [{**d, "box": [round(d["box"][0] * sx, 3), round(d["box"][1] * sy, 3), round(d["box"][2] * sx, 3),
                          round(d["box"][3] * sy, 3)]} for d in detections]


# What the service answers of a result's plain form (``Results.to_dict``, the one serializer): its public contract.
RESULT_KEYS = ("detections", "steps", "wake", "spikes", "energy_uj", "settled", "keyframe")


def result_of(result, wake: int | None) -> dict:
    """A ``detector.detect.Results`` as the service's answer, ``wake`` the request's (``keyframe``: a video frame
    that ran the whole schedule; False: a delta frame, which fed only its change)."""
    plain = result.to_dict()
    return {**{key: plain[key] for key in RESULT_KEYS}, "wake": wake}


class Backend:
    """One loaded detector as the service sees it: name, family, levels, class names, input geometry, the
    checkpoint's sha256, whether the manifest vouches for it (``verified``) and the ``engine`` running its spiking
    networks. Everything family-specific comes from the detector itself and ``detector.families``."""

    def __init__(self, name: str, model, sha256: str | None = None, verified: bool = False, engine: str = "pytorch"):
        self.name, self.model, self.sha256, self.verified, self.engine = name, model, sha256, verified, engine

    @property
    def family(self) -> str:
        return family_of(self.model).name

    @property
    def levels(self) -> int:
        return int(self.model.levels)

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "architecture": self.architecture(),
                "levels": self.levels, "classes": self.class_names(), "imgsz": self.imgsz(),
                "default_wake": self.levels, "default_sleep": "auto", "sha256": self.sha256,
                "verified": self.verified, "analog": list(getattr(self.model, "analog", None) or []),
                "engine": self.engine}

    def imgsz(self) -> int | None:
        """The network's square input size, for a family that has one (YOLO's letterbox)."""
        return int(self.model.imgsz) if get_family(self.family).sized else None

    def fit(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (w, h) box the model resizes an image of ``size`` into: decoding straight to it loses nothing."""
        return self.model.fit_box(size)

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) of an image of ``size`` after the model's own resize (a side of 0 would make it fail)."""
        return self.model.input_size(size)

    def architecture(self) -> str:
        return self.model.architecture

    def class_names(self) -> list[str]:
        names = self.model.names
        return [str(names[i]) for i in sorted(names)]

    def predict(self, images: list[np.ndarray], p: Params, cancel=None) -> list[dict]:
        """One result dict per image. ``cancel``: an event checked between time steps (``RunCancelled``)."""
        wake = p.wake or self.levels
        results = self.model.predict(list(images), wake=wake, sleep=p.sleep, conf=p.conf, iou=p.iou,
                                     max_det=p.max_det, burst=p.burst, max_sleep=p.max_sleep, cancel=cancel,
                                     batch=max(1, len(images)), color="rgb")
        return [result_of(r, wake) for r in results]

    def video(self, p: Params, delta: bool = True, keyframe_every: int | None = None):
        """A per-frame predictor for one video or live connection (``SpikingDetector.video``): its own delta
        sessions, never shared. Fixed sleep counts do not apply to delta frames (they sleep until quiet)."""
        return self.model.video(delta=delta, keyframe_every=keyframe_every, conf=p.conf, iou=p.iou,
                                max_det=p.max_det, wake=p.wake or self.levels, burst=p.burst, max_sleep=p.max_sleep,
                                color="rgb")

    def frame(self, video, image: np.ndarray, p: Params, cancel=None) -> dict:
        """One frame through ``video`` (what ``video()`` made)."""
        return result_of(video(image, cancel=cancel), p.wake or self.levels)

    def stream(self, image: np.ndarray, p: Params, cancel=None) -> Iterator[dict]:
        """One event dict per time step, then the final result."""
        wake = p.wake or self.levels
        for ev in self.model.stream(image, wake=wake, sleep=p.sleep, conf=p.conf, iou=p.iou, max_det=p.max_det,
                                    burst=p.burst, max_sleep=p.max_sleep, cancel=cancel, color="rgb"):
            yield {"type": "step", "stage": ev.stage, "t": ev.t, "phase": ev.phase, "wake": ev.wake,
                   "spikes": ev.spikes, "cumulative_spikes": ev.cumulative_spikes, "settled": ev.settled,
                   "detections": ev.detections.to_dict()["detections"]}
            if ev.final:
                yield {"type": "final", **result_of(ev.detections, wake)}


def load_backend(name_or_path: str, device: str = "cpu", allow_unverified: bool = False, analog=None,
                 engine: str = "pytorch", provider: str = "cpu", threads: int | None = None) -> Backend:
    """A backend for a manifest name or a checkpoint path. A path is served under the name of the manifest entry
    whose sha256 it matches; a path that matches none is refused unless ``allow_unverified`` (then it is served
    under its file name, marked unverified, and may not take a bundled model's name). ``engine``, ``provider``:
    what runs the spiking networks (``detector.weights.load_detector``); ``threads``: ONNX Runtime's."""
    from detector.weights import load_detector, load_manifest, sha256_of

    manifest = load_manifest()
    if name_or_path in manifest:
        name, sha256, verified, source = name_or_path, manifest[name_or_path].sha256, True, name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            known = ", ".join(sorted(manifest)) or "none bundled"
            raise FileNotFoundError(f"{name_or_path!r} is neither a bundled model ({known}) nor a checkpoint file")
        sha256 = sha256_of(path)
        match = next((e.name for e in manifest.values() if e.sha256.lower() == sha256), None)
        name, verified, source = match or path.stem, match is not None, match or str(path)
        if not verified and not allow_unverified:
            raise ValueError(f"{path.name} (sha256 {sha256}) matches no entry of the weights manifest, so its "
                             "integrity cannot be verified; serve a bundled model by name, or pass "
                             "--allow-unverified to serve this file anyway")
        if not verified and name in manifest:
            raise ValueError(f"{path.name} has the name of the bundled model {name!r} but not its contents "
                             f"(sha256 {sha256}, expected {manifest[name].sha256}): refusing to serve it")
    kwargs = {"analog": analog} if analog is not None else {}
    if engine == "onnxruntime":
        kwargs.update(provider=provider, threads=threads)
    model = load_detector(source, device=device, engine=engine, **kwargs)
    return Backend(name, model, sha256=sha256, verified=verified, engine=engine)


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
    backend.predict([np.full((32, 32, 3), 114, np.uint8)], Params(sleep=0, max_sleep=1))
    return time.perf_counter() - start


# The shapes tried for a model's largest input (landscape; a portrait one has the same area): Faster R-CNN's resize
# gives its largest area near min_size x max_size (5/3 for 800 x 1333), YOLO's letterbox imgsz x imgsz to a square.
ASPECTS, SHORT_SIDE = (1.0, 4 / 3, 5 / 3, 2.0), 640


def largest_input(backend: Backend, max_aspect: float) -> tuple[int, int]:
    """(w, h) of the largest input the model runs on: the largest area its own resize gives over a few aspect
    ratios within ``max_aspect``."""
    shapes = [(round(SHORT_SIDE * a), SHORT_SIDE) for a in ASPECTS if a <= max_aspect]
    return max((backend.input_size(s) for s in shapes), key=lambda s: s[0] * s[1])


def inference_memory(backend: Backend, p: Params, max_aspect: float) -> InferenceMemory | None:
    """The model's inference memory with ``p``, from the peak resident set of a predict on seeded noise (many
    boxes) of its largest input, at batch 2 and then 1 (what the first large batch keeps, e.g. caches, counts in
    batch 2: the per-image part errs high); None where the peak cannot be measured (``peak_growth``)."""
    w, h = largest_input(backend, max_aspect)
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
    two = peak_growth(lambda: backend.predict([image, image], p))
    one = peak_growth(lambda: backend.predict([image], p))
    return None if one is None or two is None else InferenceMemory.from_peaks(one, two)
