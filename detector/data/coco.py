"""COCO json reader (instances_*.json, bbox xywh -> xyxy, sparse category ids -> 0-based labels)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from .dataset import DatasetError, DetectionDataset, make_record


def read_coco(images_dir: str | os.PathLike, annotations_json: str | os.PathLike,
              name: str | None = None) -> DetectionDataset:
    """Read a COCO detection json; image files are `images_dir / file_name`.

    Categories are sorted by id and numbered 0..K-1 (`ds.category_ids[label]` is the
    COCO id). Crowd annotations (iscrowd=1) are kept with difficult=True.
    """
    ann_path = Path(annotations_json)
    return _dataset_from_json(_load_json(ann_path), Path(images_dir), ann_path, name)


def _dataset_from_json(data: dict, images_dir: Path, ann_path: Path, name: str | None) -> DetectionDataset:
    src = str(ann_path)
    try:
        categories = sorted(data["categories"], key=lambda c: c["id"])
        category_ids = [int(c["id"]) for c in categories]
        classes = [str(c["name"]) for c in categories]
        images = data["images"]
        annotations = data.get("annotations", [])
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{src}: not a COCO detection json (missing or malformed {e})") from None
    label_of = {cid: i for i, cid in enumerate(category_ids)}

    per_image = defaultdict(list)
    for ann in annotations:
        try:
            image_id, category_id, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
            x, y, w, h = (float(v) for v in bbox)
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{src}: malformed annotation {ann.get('id', '?') if isinstance(ann, dict) else ann!r} "
                               f"({type(e).__name__}: {e})") from None
        if category_id not in label_of:
            raise DatasetError(f"{src}: annotation {ann.get('id', '?')} has unknown category_id {category_id}")
        per_image[image_id].append((x, y, x + w, y + h, label_of[category_id], bool(ann.get("iscrowd", 0))))

    records = []
    known_ids = set()
    for img in images:
        try:
            image_id, file_name = int(img["id"]), str(img["file_name"])
            size = (int(img["height"]), int(img["width"])) if "height" in img and "width" in img else None
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{src}: malformed image entry {img!r} ({type(e).__name__}: {e})") from None
        known_ids.add(image_id)
        anns = per_image.get(image_id, [])
        records.append(make_record(
            file=str((images_dir / file_name).resolve()), image_id=image_id,
            boxes=[a[:4] for a in anns], labels=[a[4] for a in anns], difficult=[a[5] for a in anns],
            size=size, source=f"{src} (image {image_id}, {file_name})"))
    orphans = set(per_image) - known_ids
    if orphans:
        raise DatasetError(f"{src}: annotations refer to unknown image ids {sorted(orphans)[:5]}")
    return DetectionDataset(records, classes, name or f"coco:{ann_path.stem}", category_ids=category_ids,
                            annotation_file=str(ann_path.resolve()))


def open_coco_dir(root: str | os.PathLike, split: str = "val") -> DetectionDataset:
    """`coco:DIR`: DIR/annotations/instances_{split}*.json, images in DIR/{split}2017/,
    DIR/images/{split}/, DIR/{split}/ or relative to DIR (the json's file_name)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: COCO directory not found")
    candidates = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if not candidates:
        raise DatasetError(f"{root}: no annotations/instances_{split}*.json")
    ann_path = candidates[0]
    data = _load_json(ann_path)
    images = data.get("images")
    first = images[0] if isinstance(images, list) and images and isinstance(images[0], dict) else {}
    first_file = str(first.get("file_name", ""))
    image_dirs = [root / f"{split}2017", root / "images" / split, root / split, root]
    images_dir = next((d for d in image_dirs if not first_file or (d / first_file).is_file()), None)
    if images_dir is None:
        raise DatasetError(f"{ann_path}: image {first_file!r} not found in any of "
                           + ", ".join(str(d) for d in image_dirs))
    return _dataset_from_json(data, images_dir, ann_path, f"coco:{root.name}/{split}")


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    return data

