"""The spiking-detector composition both families share: images in, ``Results`` out.

    preprocess (analog) -> spiking stage(s), with the family's glue between them -> decoding (analog)

``SpikingDetector`` owns what does not depend on the family: reading images (``detector.images``), batching,
the CASC / IF-baseline schedule, timing, ``predict`` / ``qann_predict`` / ``stream`` and the checks of
``detections_at_steps``. An adapter (``SpikingYOLO``, ``SpikingFasterRCNN``) states only its own steps:

* ``_split_tensor(x)``: how a tensor input divides into images;
* ``_prepare(items, color) -> Batch``: the images as the first stage takes them;
* ``_infer(batch, schedule, cancel, session)``: the spiking stage(s) (``schedule=None``: the network converted
  from; ``session``: a video's delta sessions, from ``_video_session(schedule, keyframe_every)``);
* ``_postprocess(batch, out, keep) -> list[Results]``: decoding, with the run's figures per image;
* ``_events(batch, schedule, keep, cancel)``: the ``DetectionEvent`` of every time step;
* ``_anytime(batch, timesteps, schedule, keep)``: the detections after each of many step counts, one run.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..neuron_kinds import NeuronKind, neuron_kind
from ..options import MAX_SLEEP, Schedule, Selection
from .results import Boxes, DetectionEvent, Results, RunFigures
from ..video import KEYFRAME_EVERY, frames_of


@dataclass
class Batch:
    """A batch as the first stage takes it (``x``), with each image's original (h, w) (None: boxes stay in
    input pixels), the original BGR image (None for a tensor input) and file path."""

    x: Any
    shapes: list[tuple[int, int]] | None
    images: list[np.ndarray | None]
    paths: list[str | None]

    def result(self, i: int, boxes: Boxes, names: dict[int, str], run: RunFigures | None = None) -> Results:
        """Image ``i``'s ``Results`` holding ``boxes`` and its spiking ``run``'s figures (None: the QANN's)."""
        return Results(boxes, names, orig_img=self.images[i], path=self.paths[i], run=run)


def read_bgr(image, color: str) -> np.ndarray:
    """One image as HxWx3 uint8 BGR. Files and PIL images go through the project's one reader
    (``detector.images``: EXIF orientation, 16-bit, alpha and CMYK handled); numpy arrays are ``color``
    ("bgr" or "rgb"), gray and 4-channel arrays accepted."""
    from PIL import Image

    from ..images import from_pil, read_image

    if isinstance(image, (str, Path)):
        return np.ascontiguousarray(read_image(image)[..., ::-1])
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(from_pil(image)[..., ::-1])
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"numpy images must be HxWx3, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8, got {image.dtype}")
        image = image[..., :3]
        if color == "rgb":
            image = image[..., ::-1]
        elif color != "bgr":
            raise ValueError(f'color must be "bgr" or "rgb", got {color!r}')
        return np.ascontiguousarray(image)
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, a PIL image, an HxWx3 uint8 "
                    "numpy array or a tensor")


def source_path(image) -> str | None:
    return str(image) if isinstance(image, (str, Path)) else None


class SpikingDetector(ABC):
    """A detector whose network runs as CASC spiking stages (``neuron="cif"``), QCFS neurons on the same QANN
    (``"qcfs"``) or the IF baseline (``"if"``).

    Adapters set ``names`` (class id -> name), ``levels`` (the QANN's L; None for the IF baseline) and
    ``neuron``. ``color``: how numpy images are read unless a call says otherwise."""

    color = "bgr"
    names: dict[int, str]
    levels: int | None
    neuron: str

    @property
    def neuron_kind(self) -> NeuronKind:
        """What its neurons are (``detector.neuron_kinds``): rate-coded or settling, QANN or float."""
        return neuron_kind(self.neuron)

    # -- what an adapter states --

    @abstractmethod
    def _split_tensor(self, x: torch.Tensor) -> Sequence:
        """A tensor input as a sequence of per-image items (sliced into batches)."""

    @abstractmethod
    def _prepare(self, items: Sequence, color: str) -> Batch:
        """Images (or a tensor slice) -> the batch the first stage takes."""

    @abstractmethod
    def _infer(self, batch: Batch, schedule: Schedule | None, cancel: threading.Event | None,
               session: Any = None) -> Any:
        """The stage(s) on ``batch``: spiking with ``schedule``, the network converted from when None; a video frame
        through ``session`` (what ``_video_session`` made) when given."""

    @abstractmethod
    def _video_session(self, schedule: Schedule, keyframe_every: int | None) -> Any:
        """What ``_infer`` needs to run a video's frames as delta frames (``SpikingNetwork.session``s)."""

    @abstractmethod
    def _postprocess(self, batch: Batch, out: Any, keep: Selection) -> list[Results]:
        """Decoded detections of every image of ``batch``, with the run's figures when ``out`` is spiking."""

    @abstractmethod
    def _events(self, batch: Batch, schedule: Schedule, keep: Selection,
                cancel: threading.Event | None) -> Iterator[DetectionEvent]:
        """One event per time step of one image."""

    @abstractmethod
    def _anytime(self, batch: Batch, timesteps: list[int], schedule: Schedule,
                 keep: Selection) -> tuple[dict[int, list[Results]], dict]:
        """``detections_at_steps`` on a prepared batch, from one run."""

    # -- shared --

    def _items(self, images) -> Sequence:
        if isinstance(images, torch.Tensor):
            items = self._split_tensor(images)
        else:
            items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not len(items):
            raise ValueError("no images given")
        return items

    def preprocess(self, images, color: str | None = None) -> tuple[Any, list[tuple[int, int]] | None]:
        """(what the first stage takes, the original (h, w) of each image)."""
        batch = self._prepare(self._items(images), color or self.color)
        return batch.x, batch.shapes

    def schedule(self, wake: int | None = None, sleep: int | str = "auto", burst: int | None = None,
                 max_sleep: int = MAX_SLEEP, mode: str = "step") -> Schedule:
        """CASC: ``wake`` defaults to the levels L. The rate-coded networks (the IF baseline, QCFS) need ``wake``
        (their T) and do not sleep (``sleep="auto"`` means 0)."""
        if self.neuron_kind.rate_coded:
            if wake is None:
                raise ValueError(f'neuron="{self.neuron}" is rate-coded: give wake=T, its number of time steps '
                                 "(no sleep)")
            sleep = 0 if sleep == "auto" else sleep
        return Schedule(wake if wake is not None else self.levels, sleep, burst, max_sleep, mode)

    def anytime_schedule(self, timesteps: Iterable[int], wake: int | None = None, sleep: int | str = "auto",
                         burst: int | None = None, max_sleep: int = MAX_SLEEP) -> tuple[list[int], Schedule]:
        """``detections_at_steps``' sorted step counts and the one run serving them: CASC ``wake`` (default L) and
        ``sleep``; the rate-coded IF baseline and QCFS ``wake=max(t)``, no sleep (the readout after step t is the
        wake=t result)."""
        timesteps = list(timesteps) if timesteps is not None else []
        if not timesteps or any(isinstance(t, bool) or int(t) < 1 for t in timesteps):
            raise ValueError(f"timesteps must be a non-empty list of integers >= 1, got {timesteps!r}")
        ts = sorted({int(t) for t in timesteps})
        if self.neuron_kind.rate_coded:
            if wake is not None or sleep not in ("auto", 0):
                raise ValueError(f'detections_at_steps with neuron="{self.neuron}": its schedule at t is wake=t, '
                                 "sleep=0; leave wake and sleep at their defaults")
            return ts, Schedule(ts[-1], 0, burst, max_sleep)
        return ts, Schedule(wake if wake is not None else self.levels, sleep, burst, max_sleep)

    def _timed(self, items: Sequence, schedule: Schedule | None, keep: Selection, color: str,
               cancel: threading.Event | None, session: Any = None) -> list[Results]:
        """``items`` prepared, run and decoded as one batch; each ``Results`` with its ms per phase."""
        t0 = time.perf_counter()
        prepared = self._prepare(items, color)
        t1 = time.perf_counter()
        out = self._infer(prepared, schedule, cancel, session)
        t2 = time.perf_counter()
        found = self._postprocess(prepared, out, keep)
        t3 = time.perf_counter()
        per_image = 1000.0 / len(found)
        speed = {"preprocess": (t1 - t0) * per_image, "inference": (t2 - t1) * per_image,
                 "postprocess": (t3 - t2) * per_image}
        return [replace(r, speed=dict(speed)) for r in found]

    def _run(self, images, schedule: Schedule | None, keep: Selection, batch: int, color: str | None,
             cancel: threading.Event | None) -> list[Results]:
        items = self._items(images)
        results: list[Results] = []
        for start in range(0, len(items), batch):
            results.extend(self._timed(items[start:start + batch], schedule, keep, color or self.color, cancel))
        return results

    @torch.no_grad()
    def predict(self, images, conf: float = Selection.conf, iou: float = Selection.iou,
                max_det: int = Selection.max_det, classes: Sequence[int] | None = None, wake: int | None = None,
                sleep: int | str = "auto", burst: int | None = None, max_sleep: int = MAX_SLEEP, mode: str = "step",
                cancel: threading.Event | None = None, batch: int = 8, color: str | None = None) -> list[Results]:
        """Spiking detection: one ``Results`` per image. ``images``: path(s), PIL images, HxWx3 uint8 arrays
        (``color``: "bgr" or "rgb", default the family's ``color``) or a tensor. ``conf``/``iou``/``max_det``/
        ``classes``: which detections are kept. Schedule: ``wake`` (default L) wake steps, then ``sleep``
        steps ("auto": until the network is quiet, at most ``max_sleep``), ``burst`` spikes per sleep step;
        ``mode="multistep"`` runs each layer over all steps at once. ``cancel``: checked between steps."""
        return self._run(images, self.schedule(wake, sleep, burst, max_sleep, mode),
                         _selection(conf, iou, max_det, classes), batch, color, cancel)

    def video(self, delta: bool = True, keyframe_every: int | None = KEYFRAME_EVERY, conf: float = Selection.conf,
              iou: float = Selection.iou, max_det: int = Selection.max_det, classes: Sequence[int] | None = None,
              wake: int | None = None, burst: int | None = None, max_sleep: int = MAX_SLEEP, mode: str = "step",
              color: str | None = None) -> "VideoPredictor":
        """A predictor for the frames of one video, called once per frame: ``vp(frame) -> Results``.

        ``delta``: keep the network's state from frame to frame and feed only each frame's change (exact: every
        frame's detections are the QANN's; a changed frame takes a couple of steps); every ``keyframe_every``-th
        frame runs the whole schedule, which redraws any float32 boundary flip a static region kept (None: only the
        first). ``delta=False``: each frame is a fresh run, as ``predict``. Each ``Results`` has its own ``steps``,
        ``spikes``, ``energy_uj`` and ``keyframe``. The other options are ``predict``'s (sleep is "auto")."""
        if delta and self.neuron_kind.rate_coded:
            raise ValueError(f"delta frames need a network that settles (CASC); a rate-coded network (neuron="
                             f"{self.neuron!r}) has no fixed point: pass delta=False")
        schedule = self.schedule(wake, "auto", burst, max_sleep, mode)
        session = self._video_session(schedule, keyframe_every) if delta else None
        return VideoPredictor(self, schedule, _selection(conf, iou, max_det, classes), session, color or self.color)

    @torch.no_grad()
    def predict_video(self, source, delta: bool = True, keyframe_every: int | None = KEYFRAME_EVERY,
                      cancel: threading.Event | None = None, color: str | None = None, **options) -> Iterator[Results]:
        """Spiking detection on the frames of a video: one ``Results`` per frame, as they come. ``source``: a video
        file, or a list or iterator of frames (what ``predict`` takes, one image each). ``delta``, ``keyframe_every``
        and ``options`` (conf, iou, max_det, classes, wake, burst, max_sleep, mode): see ``video``."""
        frames, frame_color = frames_of(source)
        predictor = self.video(delta, keyframe_every, color=color or frame_color, **options)
        for frame in frames:
            yield predictor(frame, cancel=cancel)

    @torch.no_grad()
    def qann_predict(self, images, conf: float = Selection.conf, iou: float = Selection.iou,
                     max_det: int = Selection.max_det, classes: Sequence[int] | None = None, batch: int = 8,
                     color: str | None = None) -> list[Results]:
        """The network converted from (the QANN; the float ANN for the IF baseline) through the same pre- and
        post-processing: the reference the spiking network reproduces."""
        return self._run(images, None, _selection(conf, iou, max_det, classes), batch, color, None)

    @torch.no_grad()
    def stream(self, image, conf: float = Selection.conf, iou: float = Selection.iou,
               max_det: int = Selection.max_det, classes: Sequence[int] | None = None, wake: int | None = None,
               sleep: int | str = "auto", burst: int | None = None, max_sleep: int = MAX_SLEEP,
               cancel: threading.Event | None = None, color: str | None = None) -> Iterator[DetectionEvent]:
        """Anytime detection of one image: an event after every time step with the detections decoded from the
        readouts so far; the last one (``final``) equals ``predict``'s result."""
        items = self._items(image)
        if len(items) != 1:
            raise ValueError("stream takes one image")
        batch = self._prepare(items, color or self.color)
        yield from self._events(batch, self.schedule(wake, sleep, burst, max_sleep),
                                _selection(conf, iou, max_det, classes), cancel)

    @torch.no_grad()
    def detections_at_steps(self, images, timesteps: Iterable[int], conf: float = 0.001, iou: float = Selection.iou,
                            max_det: int = Selection.max_det, classes: Sequence[int] | None = None,
                            wake: int | None = None, sleep: int | str = "auto", burst: int | None = None,
                            max_sleep: int = MAX_SLEEP,
                            color: str | None = None) -> tuple[dict[int, list[Results]], dict]:
        """Anytime evaluation from one run: ``({t: [Results per image]}, info)`` for every total step count ``t``
        (per stage for a two-stage detector), each ``Results`` with its steps, spikes, energy and settled flag
        after step ``t``; ``info``: the run's per-image figures (see the adapter)."""
        ts, schedule = self.anytime_schedule(timesteps, wake, sleep, burst, max_sleep)
        batch = self._prepare(self._items(images), color or self.color)
        return self._anytime(batch, ts, schedule, _selection(conf, iou, max_det, classes))


class VideoPredictor:
    """The frames of one video through a detector (``SpikingDetector.video``): ``vp(frame)`` per frame. With delta
    frames it holds the network's state between calls; a cancelled or failed frame makes the next a keyframe."""

    def __init__(self, detector: SpikingDetector, schedule: Schedule, keep: Selection, session: Any, color: str):
        self.detector, self.schedule, self.keep, self.session, self.color = detector, schedule, keep, session, color

    @torch.no_grad()
    def __call__(self, frame, cancel: threading.Event | None = None, color: str | None = None) -> Results:
        """This frame's ``Results`` (``keyframe``: whether it ran the whole schedule)."""
        return self.detector._timed([frame], self.schedule, self.keep, color or self.color, cancel, self.session)[0]


def _selection(conf: float, iou: float, max_det: int, classes: Sequence[int] | None) -> Selection:
    return Selection(float(conf), float(iou), int(max_det), None if classes is None else tuple(int(c) for c in classes))
