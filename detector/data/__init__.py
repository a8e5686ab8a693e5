"""Detection datasets: COCO json, VOC xml and YOLO txt readers behind one API, and the bundled benchmark.

    ds = open_dataset("bundled" | "bundled-video" | "coco:DIR" | "voc:DIR" | "yolo:data.yaml" | "data.yaml", split="val")
    img, target = ds[i]   # RGB uint8 HxWx3; boxes float32 [N,4] xyxy px, labels int64 [N] 0-based,
                          # difficult bool [N], image_id int, file str
"""

from __future__ import annotations

from pathlib import Path

from .coco import open_coco_dir, read_coco
from .dataset import DatasetError, DatasetWarning, DetectionDataset, ImageRecord
from .synthetic import CLASSES as BUNDLED_CLASSES
from .synthetic import bundled_root, ensure_bundled, generate_bundled
from .video import ensure_video
from .voc import VOC_CLASSES, read_voc
from .yolo import read_yolo

SPEC_FORMS = "'bundled', 'bundled-video' (one split: 'video', also called 'val'), 'coco:DIR', 'voc:DIR', 'yolo:PATH.yaml' or a path ending in .yaml/.yml"


def open_dataset(spec: str, split: str = "val", classes: list[str] | None = None) -> DetectionDataset:
    """Open a dataset from a spec string (see SPEC_FORMS). ``classes``: the class names by id for formats whose
    files do not list them (VOC: default the 20 VOC classes; a data.yaml without ``names``); COCO keeps its own."""
    kind, sep, arg = spec.partition(":")
    if spec == "bundled":
        root = ensure_bundled()
        return read_coco(root / "images" / split, root / "annotations" / f"instances_{split}.json",
                         name=f"bundled/{split}")
    if spec == "bundled-video":
        if split not in ("video", "val"):  # one split, for evaluation: "val" (eval's default) names it too
            raise DatasetError(f"the bundled video dataset has one split, 'video' (got {split!r})")
        root = ensure_video()
        return read_coco(root / "images" / "video", root / "annotations" / "instances_video.json",
                         name="bundled-video")
    if sep and kind == "coco":
        return open_coco_dir(arg, split)
    if sep and kind == "voc":
        return read_voc(arg, split, classes=classes)
    if sep and kind == "yolo":
        return read_yolo(arg, split, classes=classes)
    if Path(spec).suffix in (".yaml", ".yml"):
        return read_yolo(spec, split, classes=classes)
    raise DatasetError(f"unknown dataset spec {spec!r}; expected {SPEC_FORMS}")


def parse_names(spec: str | None) -> list[str] | None:
    """``--names``: ``"circle,square"`` or a text file with one name per line."""
    if not spec:
        return None
    path = Path(spec)
    text = path.read_text() if path.is_file() else spec.replace(",", "\n")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"--names {spec!r}: no class names (give name1,name2,... or a file with one per line)")
    return names


__all__ = [
    "open_dataset", "parse_names", "DetectionDataset", "ImageRecord", "DatasetError", "DatasetWarning", "read_coco", "read_voc", "read_yolo",
    "open_coco_dir", "generate_bundled", "ensure_bundled", "bundled_root", "BUNDLED_CLASSES", "VOC_CLASSES",
]
