"""The dataset container every reader returns, its error type and shared box checks."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from .. import images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
BOX_SLACK_PX = 1.0  # boxes may overshoot the image by this much; they are clipped


class DatasetWarning(UserWarning):
    """Something in a dataset was skipped (e.g. a zero-size box); the rest loads."""


class DatasetError(ValueError):
    """A dataset could not be read; the message names the file and the problem."""


@dataclass
class ImageRecord:
    """One image and its ground truth, as parsed from the annotations."""

    file: str  # absolute path
    image_id: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels
    labels: np.ndarray  # int64 [N], 0-based
    difficult: np.ndarray  # bool [N]
    size: tuple[int, int] | None = None  # (h, w) when the annotations say it


class DetectionDataset:
    """Images with boxes; `ds[i]` -> (RGB uint8 HxWx3, target dict).

    `category_ids[label]` is the id the label is written under in COCO-style results
    (the json's ids for COCO, 1..K for other formats). `annotation_file` is the COCO
    json the records came from, when there is one (for pycocotools).
    """

    def __init__(self, records: list[ImageRecord], classes: list[str], name: str,
                 category_ids: list[int] | None = None, annotation_file: str | None = None):
        self.records = records
        self.classes = list(classes)
        self.name = name
        self.category_ids = list(category_ids) if category_ids is not None else list(range(1, len(classes) + 1))
        self.annotation_file = annotation_file
        if len(self.category_ids) != len(self.classes):
            raise DatasetError(f"{name}: {len(self.category_ids)} category ids for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"DetectionDataset({self.name!r}, {len(self)} images, {len(self.classes)} classes)"

    def image_path(self, i: int) -> str:
        return self.records[i].file

    def image_size(self, i: int) -> tuple[int, int]:
        """(h, w) from the annotations, else from the image header (no decoding)."""
        record = self.records[i]
        if record.size is None:
            record.size = read_image_size(record.file)
        return record.size

    def target(self, i: int) -> dict:
        """The ground truth of image i, without loading the image."""
        record = self.records[i]
        return {"boxes": record.boxes.copy(), "labels": record.labels.copy(),
                "difficult": record.difficult.copy(), "image_id": record.image_id, "file": record.file}

    def load_image(self, i: int) -> np.ndarray:
        """Decode image i as RGB uint8 HxWx3."""
        record = self.records[i]
        img = read_image(record.file)
        if record.size is not None and img.shape[:2] != tuple(record.size):
            raise DatasetError(f"{record.file}: image is {img.shape[0]}x{img.shape[1]} (h x w) "
                               f"but the annotations say {record.size[0]}x{record.size[1]}")
        return img

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return self.load_image(i), self.target(i)


def read_image(path: str) -> np.ndarray:
    """Decode an image file as RGB uint8 HxWx3 (``detector.images``: EXIF orientation applied, 16-bit scaled,
    alpha composited, CMYK/palette/gray converted)."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: image file not found")
    try:
        return images.read_image(path)
    except images.ImageError as e:
        raise DatasetError(f"{path}: not a readable image ({e})") from None


def read_image_size(path: str) -> tuple[int, int]:
    """(h, w) as ``read_image`` returns it (EXIF orientation applied), from the header without decoding."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: image file not found")
    try:
        w, h = images.read_size(path)
    except images.ImageError as e:
        raise DatasetError(f"{path}: not a readable image ({e})") from None
    return h, w


def make_record(file: str, image_id: int, boxes, labels, difficult, size: tuple[int, int] | None,
                source: str) -> ImageRecord:
    """Build a record, checking the boxes against the image size (`source` names the file in errors)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    difficult = np.asarray(difficult, dtype=np.bool_).reshape(-1)
    if len(boxes):
        boxes, keep = check_boxes(boxes, size or (np.inf, np.inf), source)
        labels, difficult = labels[keep], difficult[keep]
    return ImageRecord(file=file, image_id=int(image_id), boxes=boxes, labels=labels,
                       difficult=difficult, size=size)


def check_boxes(boxes: np.ndarray, size: tuple[int, int], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes that overshoot the image by at most BOX_SLACK_PX; reject boxes beyond that.

    Returns (clipped boxes, keep mask). Boxes of zero size (also once clipped) are dropped with a
    warning, as torchvision's detection reference does: real COCO has a few, and they carry no object.
    """
    h, w = size
    x1, y1, x2, y2 = boxes.T
    problems = [
        (~np.isfinite(boxes).all(axis=1), "is not finite"),
        ((x1 < -BOX_SLACK_PX) | (y1 < -BOX_SLACK_PX) | (x2 > w + BOX_SLACK_PX) | (y2 > h + BOX_SLACK_PX),
         f"lies outside the {w}x{h} (w x h) image"),
    ]
    for bad, problem in problems:
        if bad.any():
            raise DatasetError(f"{source}: {_describe(boxes[np.argmax(bad)])} {problem}")
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0, w, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, h, out=clipped[:, 1::2])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not keep.all():
        warnings.warn(f"{source}: dropped {int((~keep).sum())} box(es) of zero size, e.g. "
                      f"{_describe(boxes[np.argmin(keep)])}", DatasetWarning, stacklevel=3)
    return clipped[keep], keep


def _describe(box: np.ndarray) -> str:
    return "box [" + ", ".join(f"{float(v):g}" for v in box) + "] (xyxy)"
