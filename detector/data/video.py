"""The bundled benchmark's video split: seeded sequences of bundled-style scenes in which objects move.

Two kinds of sequence, each frame annotated in COCO format like the still images:

- ``static``: a fixed camera over a fixed textured background; 1-4 objects of the eight classes glide along
  straight lines (bouncing off the borders), so frame to frame only the pixels around them change;
- ``jitter``: the same, seen by a shaky, noisy camera: the whole frame shifts by up to 2 px and carries fresh
  sensor noise every frame, so every pixel changes.

Each object keeps its shape, colour and shading from frame to frame (its drawing is seeded per object); boxes
are tight to its visible pixels and objects less than 30 % visible are not annotated, as in the still images.
Frames are lossless PNGs, so a static background stays bit-identical between frames.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .synthetic import CLASSES, GENERATOR, MIN_SIZE, MIN_VISIBLE, _background, _draw_object

__all__ = [  # the public API (apps import only these)
    "ensure_video", "generate_video", "render_sequence", "sequences_of", "video_root",
]

KINDS = ("static", "jitter")
VIDEO_GENERATOR = "bundled-video-v1"
MAX_MOVING = 4
FRAMES, SEQUENCES = 40, 3  # per kind: 2 x 3 x 40 = 240 annotated frames


def video_root() -> Path:
    """``$CASC_DATA/bundled-video-v1``, else ``~/.cache/casc/bundled-video-v1``."""
    base = os.environ.get("CASC_DATA")
    return Path(base) / VIDEO_GENERATOR if base else Path.home() / ".cache" / "casc" / VIDEO_GENERATOR


def render_sequence(seed: int, kind: str = "static", frames: int = FRAMES,
                    size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The frames of sequence ``seed``: (RGB uint8 image, int boxes [N, 4] xyxy, labels [N], visible pixels [N])."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    margin = 8 if kind == "jitter" else 0
    background = _background(rng, size + 2 * margin)
    objects = []
    for j in range(int(rng.integers(1, MAX_MOVING + 1))):
        extent = math.exp(rng.uniform(math.log(max(MIN_SIZE, 16)), math.log(64)))
        speed, heading = rng.uniform(1.0, 4.0), rng.uniform(0, 2 * math.pi)
        objects.append({"label": int(rng.integers(len(CLASSES))), "extent": extent, "seed": [seed, j, 7],
                        "centre": rng.uniform(extent, size - extent, 2),
                        "velocity": speed * np.array([math.cos(heading), math.sin(heading)])})
    for _ in range(frames):
        img = background.copy()
        owner = np.full(img.shape[:2], -1, np.int16)
        drawn = []
        for j, obj in enumerate(objects):
            centre = obj["centre"] + margin
            full_area, window = _draw_object(img, owner, j, np.random.default_rng(obj["seed"]), obj["label"],
                                             centre, obj["extent"])
            drawn.append((obj["label"], full_area, window))
            _advance(obj, size)
        if kind == "jitter":
            dx, dy = (int(v) for v in rng.integers(-2, 3, 2))
            img = img[margin + dy:margin + dy + size, margin + dx:margin + dx + size]
            owner = owner[margin + dy:margin + dy + size, margin + dx:margin + dx + size]
            img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(4.0)
            drawn = [(label, area, (x0 - margin - dx, y0 - margin - dy, x1 - margin - dx, y1 - margin - dy))
                     for label, area, (x0, y0, x1, y1) in drawn]
        yield (np.clip(img, 0, 255).astype(np.uint8), *_visible_boxes(owner, drawn, size))


def _advance(obj: dict, size: int) -> None:
    """Move one step, bouncing off the borders (the centre stays an extent inside the frame)."""
    centre, velocity, low, high = obj["centre"], obj["velocity"], obj["extent"] * 0.5, size - obj["extent"] * 0.5
    centre += velocity
    for axis in range(2):
        if not low <= centre[axis] <= high:
            velocity[axis] = -velocity[axis]
            centre[axis] = min(max(centre[axis], low), high)


def _visible_boxes(owner: np.ndarray, drawn: list, size: int):
    boxes, labels, areas = [], [], []
    for j, (label, full_area, (x0, y0, x1, y1)) in enumerate(drawn):
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == j)
        if full_area == 0 or len(xs) < MIN_VISIBLE * full_area:
            continue
        box = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
        if box[2] - box[0] >= 3 and box[3] - box[1] >= 3:
            boxes.append(box)
            labels.append(label)
            areas.append(len(xs))
    return (np.array(boxes, np.int64).reshape(-1, 4), np.array(labels, np.int64), np.array(areas, np.int64))


def sequence_name(kind: str, index: int) -> str:
    return f"{kind}-{index:02d}"


def generate_video(root: str | os.PathLike, sequences: int = SEQUENCES, frames: int = FRAMES, seed: int = 0,
                   size: int = 256) -> Path:
    """Write the video split under ``root``: ``images/video/<kind>-<nn>/<frame>.png`` and one COCO json,
    ``annotations/instances_video.json``, whose images are in sequence and frame order."""
    root = Path(root)
    images, annotations = [], []
    for kind in KINDS:
        for index in range(sequences):
            name = sequence_name(kind, index)
            folder = root / "images" / "video" / name
            folder.mkdir(parents=True, exist_ok=True)
            for t, (img, boxes, labels, areas) in enumerate(render_sequence(seed * 1000 + index, kind, frames, size)):
                file_name = f"{name}/{t + 1:06d}.png"
                cv2.imwrite(str(root / "images" / "video" / file_name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                               "sequence": name, "frame": t + 1})
                for (x1, y1, x2, y2), label, area in zip(boxes.tolist(), labels.tolist(), areas.tolist()):
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"info": {"description": f"casc {GENERATOR} synthetic shapes, {VIDEO_GENERATOR} sequences"},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_video.json").write_text(json.dumps(data, separators=(",", ":")))
    (root / "VERSION").write_text(_version_text(sequences, frames, seed, size))
    return root


def _version_text(sequences: int, frames: int, seed: int, size: int) -> str:
    return json.dumps({"generator": VIDEO_GENERATOR, "sequences": sequences, "frames": frames, "seed": seed,
                       "size": size}) + "\n"


def ensure_video(root: str | os.PathLike | None = None, sequences: int = SEQUENCES, frames: int = FRAMES,
                 seed: int = 0, size: int = 256) -> Path:
    """The video split at ``root`` (default ``video_root()``), generated first unless it is there with the same
    parameters; written to a temporary sibling folder and renamed into place, so never half there."""
    root = Path(root) if root is not None else video_root()
    version = _version_text(sequences, frames, seed, size)
    if (root / "VERSION").is_file() and (root / "VERSION").read_text() == version:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        generate_video(tmp, sequences, frames, seed, size)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def sequences_of(files: list[str]) -> list[list[int]]:
    """Indices of ``files`` grouped by sequence (the folder each frame is in), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        groups.setdefault(str(Path(f).parent), []).append(i)
    return list(groups.values())
