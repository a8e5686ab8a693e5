"""Pascal VOC reader (Annotations/*.xml, ImageSets/Main/{split}.txt, JPEGImages/).

VOC coordinates are 1-based inclusive pixel indices; they become 0-based xyxy floats as
in Detectron2: (xmin - 1, ymin - 1, xmax, ymax), so a full-image box is (0, 0, W, H).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from .dataset import DatasetError, DetectionDataset, make_record, read_image_size

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def read_voc(root: str | os.PathLike, split: str = "val", classes: list[str] | tuple[str, ...] | None = None,
             name: str | None = None) -> DetectionDataset:
    """Read a VOC2007/VOC2012-style folder; objects marked difficult keep difficult=True. ``classes``: the class
    names by id (None: the 20 VOC classes)."""
    classes = VOC_CLASSES if classes is None else classes
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: VOC directory not found")
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{list_file}: image list for split {split!r} not found") from None
    label_of = {c: i for i, c in enumerate(classes)}
    records = [_read_annotation(root, image_id, index, label_of) for index, image_id in enumerate(ids)]
    return DetectionDataset(records, list(classes), name or f"voc:{root.name}/{split}")


def _read_annotation(root: Path, image_id: str, index: int, label_of: dict[str, int]):
    xml_path = root / "Annotations" / f"{image_id}.xml"
    src = str(xml_path)
    try:
        tree = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{xml_path}: annotation file not found") from None
    except ET.ParseError as e:
        raise DatasetError(f"{xml_path}: invalid XML ({e})") from None
    file_name = (tree.findtext("filename") or "").strip() or f"{image_id}.jpg"
    image_path = root / "JPEGImages" / file_name
    if not image_path.is_file() and (root / "JPEGImages" / f"{image_id}.jpg").is_file():
        image_path = root / "JPEGImages" / f"{image_id}.jpg"
    try:
        size = (int(tree.findtext("size/height")), int(tree.findtext("size/width")))
    except (TypeError, ValueError):
        size = None
    if size is None or min(size) <= 0:
        size = read_image_size(str(image_path))

    boxes, labels, difficult = [], [], []
    for obj in tree.iter("object"):
        cls = (obj.findtext("name") or "").strip()
        if cls not in label_of:
            raise DatasetError(f"{src}: unknown class name {cls!r} (known: {', '.join(label_of)}); give the dataset's "
                               "class names in the model's order (--names a,b,...; in Python read_voc(classes=...))")
        try:
            x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            is_difficult = int(float(obj.findtext("difficult") or 0)) == 1
        except (TypeError, ValueError):
            raise DatasetError(f"{src}: object {cls!r} has a missing or non-numeric bndbox/difficult") from None
        boxes.append((x1 - 1, y1 - 1, x2, y2))
        labels.append(label_of[cls])
        difficult.append(is_difficult)
    return make_record(str(image_path.resolve()), index, boxes, labels, difficult, size, src)
