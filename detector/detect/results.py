"""One results type for both detector families, shaped like Ultralytics' ``Results``.

    r = detector.predict(["bus.jpg"])[0]
    r.boxes.xyxy, r.boxes.conf, r.boxes.cls       # original pixels, scores, 0-based classes
    r.steps, r.stage_steps, r.settled              # total T (both stages for Faster R-CNN), per stage, fixed point
    r.spikes, r.energy_uj, r.speed                 # spike events, energy estimate, ms per phase
    r.run                                          # those figures of the spiking run (RunFigures; None: the QANN)
    r.plot(); r.save("out.jpg"); r.save_txt("out.txt"); r.to_json()

A ``Results`` is built once with its figures (frozen): the adapters hand the ``RunFigures`` of each image to the
constructor. ``to_dict`` is the one plain form, used by ``casc predict``, ``casc eval`` and the service.

Images follow Ultralytics' convention: ``orig_img`` and ``plot()`` are BGR (what ``cv2.imwrite`` takes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

# Ultralytics' 20-colour palette (hex RGB), one colour per class id
PALETTE = ("FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
           "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7")


def class_color(cls: int) -> tuple[int, int, int]:
    """The BGR colour of class ``cls``."""
    h = PALETTE[int(cls) % len(PALETTE)]
    return int(h[4:6], 16), int(h[2:4], 16), int(h[0:2], 16)


@dataclass(eq=False)
class Boxes:
    """Detected boxes of one image: ``xyxy`` [n, 4] original pixels, ``conf`` [n] (both in the network's
    dtype), ``cls`` [n] int64 (0-based class ids in both families)."""

    xyxy: torch.Tensor
    conf: torch.Tensor
    cls: torch.Tensor
    orig_shape: tuple[int, int]  # (height, width)

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    @property
    def xywh(self) -> torch.Tensor:
        """Centre x, centre y, width, height (pixels)."""
        x1, y1, x2, y2 = self.xyxy.unbind(-1)
        return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), -1)

    @property
    def xywhn(self) -> torch.Tensor:
        """``xywh`` divided by the image's width and height (YOLO label format)."""
        h, w = self.orig_shape
        return self.xywh / self.xywh.new_tensor([w, h, w, h])

    @classmethod
    def empty(cls, orig_shape: tuple[int, int]) -> "Boxes":
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), orig_shape)

    def select(self, keep: torch.Tensor) -> "Boxes":
        """The boxes at ``keep`` (indices or a mask)."""
        return Boxes(self.xyxy[keep], self.conf[keep], self.cls[keep], self.orig_shape)


@dataclass(frozen=True)
class RunFigures:
    """How one image's spiking run went. ``spikes`` and ``energy_uj`` are None from an engine that counts no
    spikes (ONNX Runtime); ``stage_steps`` and ``proposals`` only for two-stage detectors; ``keyframe`` only for a
    video's frames."""

    steps: int  # total time steps T (wake + sleep, all stages)
    stage_steps: dict[str, int] | None = None  # steps per stage ({"stage1", "stage2"})
    wake: int | None = None  # wake steps of the schedule (per stage)
    settled: bool | None = None  # every stage reached its fixed point
    spikes: float | None = None  # spike events, all stages
    energy_uj: float | None = None  # estimate (SOPs at 0.9 pJ, MACs at 4.6 pJ), microjoules
    proposals: int | None = None  # RoIs that reached stage 2
    keyframe: bool | None = None  # True: a whole schedule ran; False: a video's delta frame fed only its change


FIGURES = tuple(f.name for f in fields(RunFigures))


@dataclass(eq=False, frozen=True)
class Results:
    """Detections of one image and how the spiking run went: ``run`` (None for the QANN), whose figures read as
    attributes too (``r.steps`` is ``r.run.steps``, None for the QANN)."""

    boxes: Boxes
    names: dict[int, str]
    orig_img: np.ndarray | None = None  # HxWx3 uint8 BGR, None for a preprocessed tensor input
    path: str | None = None  # the image file, when the input was one
    run: RunFigures | None = None
    speed: dict[str, float] = field(default_factory=dict)  # ms per image: preprocess, inference, postprocess

    def __getattr__(self, name: str):
        # only reached for names that are not fields: the run's figures, None when there was no spiking run
        if name in FIGURES:
            return None if self.run is None else getattr(self.run, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def orig_shape(self) -> tuple[int, int]:
        return self.boxes.orig_shape

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def labels(self) -> list[str]:
        """The class name of each box."""
        return [self.names.get(int(c), str(int(c))) for c in self.boxes.cls]

    def plot(self, img: np.ndarray | None = None, conf: bool = True, labels: bool = True,
             line_width: int | None = None) -> np.ndarray:
        """The image (``img``, BGR, else ``orig_img``) with every box drawn and labelled "name score"."""
        import cv2

        base = self.orig_img if img is None else img
        if base is None:
            raise ValueError("no image to draw on: the input was a preprocessed tensor; pass img=")
        canvas = np.ascontiguousarray(base.copy())
        lw = line_width or max(round(sum(canvas.shape[:2]) / 2 * 0.003), 2)
        for (x1, y1, x2, y2), score, cls, name in zip(self.boxes.xyxy.tolist(), self.boxes.conf.tolist(),
                                                      self.boxes.cls.tolist(), self.labels):
            color = class_color(cls)
            p1, p2 = (int(x1), int(y1)), (int(x2), int(y2))
            cv2.rectangle(canvas, p1, p2, color, lw, cv2.LINE_AA)
            if labels:
                _label(canvas, p1, f"{name} {score:.2f}" if conf else name, color, lw)
        return canvas

    def save(self, filename: str | Path, **plot_kwargs) -> str:
        """Write ``plot()`` to ``filename`` (format from its suffix); returns the path."""
        import cv2

        path = Path(filename)
        if not cv2.haveImageWriter(str(path)):
            raise ValueError(f"cannot write an image to {path}: OpenCV has no writer for {path.suffix!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), self.plot(**plot_kwargs)):
            raise ValueError(f"cannot write an image to {path}")
        return str(path)

    def save_txt(self, txt_file: str | Path, save_conf: bool = False) -> str:
        """YOLO label lines ``cls xc yc w h [conf]`` (normalised to the image) into ``txt_file``."""
        lines = []
        for cls, box, score in zip(self.boxes.cls.tolist(), self.boxes.xywhn.tolist(), self.boxes.conf.tolist()):
            values = [cls, *box, score] if save_conf else [cls, *box]
            lines.append(" ".join(str(v) if isinstance(v, int) else f"{v:.6g}" for v in values))
        path = Path(txt_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))
        return str(path)

    def to_dict(self, decimals: int | None = 3) -> dict:
        """JSON-ready, the one plain form of a result: the detections (``box`` xyxy in original pixels, rounded to
        ``decimals``, None: as computed; ``score``; ``class_id``, 0-based; ``name``: the keys of the service's
        responses), the run's figures (None for the QANN) and ``speed``."""
        boxes = self.boxes.xyxy.tolist()
        if decimals is not None:
            boxes = [[round(v, decimals) for v in b] for b in boxes]
        detections = [{"box": b, "score": s, "class_id": c, "name": n}
                      for b, s, c, n in zip(boxes, self.boxes.conf.tolist(), self.boxes.cls.tolist(), self.labels)]
        figures = dict.fromkeys(FIGURES) if self.run is None else asdict(self.run)
        return {"path": self.path, "orig_shape": list(self.orig_shape), "detections": detections, **figures,
                "speed": dict(self.speed)}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _label(canvas: np.ndarray, corner: tuple[int, int], text: str, color, lw: int) -> None:
    """``text`` on a filled box of ``color`` above ``corner`` (inside the image when the box touches the top)."""
    import cv2

    scale, thickness = lw / 3, max(lw - 1, 1)
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    above = corner[1] - h - 3 >= 0
    x, y = corner
    top = (x, y - h - 3) if above else (x, y)
    bottom = (x + w, y) if above else (x + w, y + h + 3)
    cv2.rectangle(canvas, top, bottom, color, -1, cv2.LINE_AA)
    text_color = (0, 0, 0) if sum(color) > 3 * 140 else (255, 255, 255)  # readable on light and dark fills
    cv2.putText(canvas, text, (x, y - 2 if above else y + h + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, text_color,
                thickness, cv2.LINE_AA)


@dataclass(eq=False)
class DetectionEvent:
    """One time step of ``stream``: ``detections`` are those decoded from the readouts so far (empty during
    stage 1 of a two-stage detector), carrying the run's figures up to this step."""

    stage: int  # 1, or 2 for the box head of Faster R-CNN
    t: int  # total steps so far (all stages)
    stage_t: int  # steps of this stage so far
    phase: str  # "wake" or "sleep"
    wake: int  # wake steps of this stage so far
    spikes: float  # spike events in this step
    cumulative_spikes: float  # spike events so far, all stages
    settled: bool  # this stage has reached its fixed point
    detections: Results
    final: bool = False  # the run's last step: its detections equal predict's
