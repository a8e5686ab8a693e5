"""Ultralytics YOLO reader: data.yaml + labels/<split>/*.txt (`cls cx cy w h`, normalised).

`path` in the yaml is the dataset root; a relative one is taken relative to the yaml's
folder (Ultralytics would resolve it against its own datasets dir), a missing one means
the yaml's folder. A split entry is an image folder, a .txt list of images, or a list of
those. An image's label file is its path with the last `/images/` replaced by `/labels/`
and the suffix by `.txt`; a missing label file means an image without objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from .dataset import IMAGE_SUFFIXES, DatasetError, DetectionDataset, ImageRecord, check_boxes, read_image_size


def read_yolo(data_yaml: str | os.PathLike, split: str = "val", name: str | None = None,
              classes: list[str] | None = None) -> DetectionDataset:
    """Read the `split` entry (train/val/test) of an Ultralytics data.yaml. ``classes``: the class names when the
    YAML has no ``names`` (the YAML's own win)."""
    yaml_path = Path(data_yaml)
    try:
        config = yaml.safe_load(yaml_path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{yaml_path}: data yaml not found") from None
    except yaml.YAMLError as e:
        raise DatasetError(f"{yaml_path}: invalid YAML ({e})") from None
    if not isinstance(config, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with path, {split} and names")
    classes = _class_names(config.get("names"), yaml_path) if config.get("names") or not classes else list(classes)
    if not config.get(split):
        raise DatasetError(f"{yaml_path}: no {split!r} entry")
    root = Path(config.get("path") or ".")
    if not root.is_absolute():
        root = yaml_path.parent / root
    images = _image_files(root, config[split], yaml_path)
    records = [_read_labels(image, index, len(classes)) for index, image in enumerate(images)]
    return DetectionDataset(records, classes, name or f"yolo:{yaml_path.stem}/{split}")


def label_path(image_path: str | os.PathLike) -> Path:
    """The label file Ultralytics pairs with an image."""
    sep = os.sep
    image_path = str(image_path)
    head, marker, tail = image_path.rpartition(f"{sep}images{sep}")
    if marker:
        image_path = f"{head}{sep}labels{sep}{tail}"
    return Path(image_path).with_suffix(".txt")


def _class_names(names, yaml_path: Path) -> list[str]:
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    if isinstance(names, dict) and names:
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            keys = None
        if keys == list(range(len(names))):
            return [str(names[k] if k in names else names[str(k)]) for k in keys]
        raise DatasetError(f"{yaml_path}: names dict must have the keys 0..{len(names) - 1}")
    raise DatasetError(f"{yaml_path}: 'names' must be a non-empty list or dict (or give the class names: "
                       "--names a,b,...)")


def _image_files(root: Path, entry, yaml_path: Path) -> list[Path]:
    files = []
    for item in entry if isinstance(entry, list) else [entry]:
        path = Path(item) if Path(item).is_absolute() else root / item
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix == ".txt":
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            files += [Path(ln) if Path(ln).is_absolute() else root / ln for ln in lines]
        else:
            raise DatasetError(f"{yaml_path}: image folder or list {path} not found")
    return [p.resolve() for p in files]


def _read_labels(image: Path, index: int, num_classes: int):
    size = read_image_size(str(image))
    h, w = size
    labels_file = label_path(image)
    rows = []
    if labels_file.is_file():
        for line_no, line in enumerate(labels_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{labels_file} line {line_no}"
            values = line.split()
            if len(values) != 5:
                raise DatasetError(f"{where}: expected 'cls cx cy w h', got {len(values)} values")
            try:
                cls = int(values[0])
                cx, cy, bw, bh = (float(v) for v in values[1:])
            except ValueError:
                raise DatasetError(f"{where}: non-numeric value in {line.strip()!r}") from None
            if not 0 <= cls < num_classes:
                raise DatasetError(f"{where}: class {cls} out of range ({num_classes} classes)")
            box = np.array([[cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]]) * (w, h, w, h)
            clipped, keep = check_boxes(box.astype(np.float32), size, where)
            if keep[0]:
                rows.append((cls, *clipped[0]))
    rows = np.array(rows, dtype=np.float64).reshape(-1, 5)
    return ImageRecord(file=str(image), image_id=index, boxes=rows[:, 1:].astype(np.float32),
                       labels=rows[:, 0].astype(np.int64), difficult=np.zeros(len(rows), dtype=bool), size=size)
