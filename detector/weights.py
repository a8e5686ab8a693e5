"""Bundled weights: the manifest, sha256 verification, and loading a detector by name or path.

``weights/manifest.json`` lists every bundled checkpoint::

    {"models": [{"name": "yolov8n-bundled", "family": "yolo", "kind": "qann", "file": "yolov8n-bundled-qann.pt",
                 "sha256": "...", "float_model": "yolov8n-bundled-float", "arch": "yolov8n", "levels": 4,
                 "dataset": "bundled-v1", "imgsz": 256, "training_command": "...", "metrics": {...}}, ...]}

Every file is checked against its sha256 before it is loaded, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import file_sha256 as sha256_of
from .checkpoint import verify_file as verify_sha256

WEIGHTS_DIR = Path(os.environ.get("CASC_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
FAMILIES = ("yolo", "rcnn")
ENGINES = ("pytorch", "onnxruntime")  # what runs the spiking networks


@dataclass
class ModelEntry:
    """One manifest entry; ``path`` is resolved against the manifest's folder."""

    name: str
    family: str
    kind: str  # "float" or "qann"
    path: Path
    sha256: str
    info: dict = field(default_factory=dict)  # everything else in the entry (arch, levels, metrics, ...)

    @property
    def float_model(self) -> str | None:
        return self.info.get("float_model")


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, ModelEntry]:
    """Entries by name. A missing manifest is an empty one (nothing bundled yet)."""
    path = Path(path) if path else WEIGHTS_DIR / "manifest.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    entries = {}
    for item in data.get("models", []):
        try:
            family, kind = item["family"], item["kind"]
            if family not in FAMILIES or kind not in ("float", "qann"):
                raise ValueError(f"family must be one of {FAMILIES} and kind float|qann, got {family}/{kind}")
            entries[item["name"]] = ModelEntry(
                name=item["name"], family=family, kind=kind, path=path.parent / item["file"], sha256=item["sha256"],
                info={k: v for k, v in item.items() if k not in ("name", "family", "kind", "file", "sha256")})
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: bad entry {item!r}: {error}") from None
    return entries


def resolve(name_or_path: str | os.PathLike, manifest: dict[str, ModelEntry] | None = None) -> ModelEntry:
    """A manifest entry by name, or an entry describing a checkpoint file given by path."""
    manifest = load_manifest() if manifest is None else manifest
    key = str(name_or_path)
    if key in manifest:
        return manifest[key]
    path = Path(key)
    if not path.is_file():
        known = ", ".join(sorted(manifest)) or "none bundled"
        raise FileNotFoundError(f"{key!r} is neither a bundled model ({known}) nor a checkpoint file")
    return ModelEntry(name=path.stem, family=checkpoint_family(path), kind="qann", path=path, sha256=None)


def checkpoint_family(path: Path) -> str:
    """``"rcnn"`` for this project's Faster R-CNN checkpoints and torchvision state dicts, else ``"yolo"``."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an Ultralytics pickle: only the YOLO loader (Ultralytics') can read it
        return "yolo"
    if isinstance(data, dict):
        if data.get("format") == "casc-fasterrcnn" or "model" in data:
            return "rcnn"
        if any(str(k).startswith(("backbone.", "rpn.", "roi_heads.")) for k in data):
            return "rcnn"
    return "yolo"


def load_detector(name_or_path: str | os.PathLike, device="cpu", dtype=None, engine: str = "pytorch",
                  provider: str = "cpu", **kwargs):
    """A ``SpikingYOLO`` or ``SpikingFasterRCNN`` from a bundled name or a checkpoint path (sha256-checked).

    ``engine="onnxruntime"``: its spiking networks run on ONNX Runtime with ``provider`` (cpu, cuda,
    tensorrt), the rest on the CPU; ``batch``, ``imgsz``, ``export_dir`` and ``threads`` go to
    ``detector.export.load_onnx_detector``."""
    import torch

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    dtype = dtype or torch.float32
    if engine == "onnxruntime":
        if torch.device(device).type != "cpu":
            raise ValueError(f"device {device}: with the ONNX Runtime engine the spiking networks run on the "
                             f"provider ({provider}) and the rest on the CPU; choose the GPU with provider='cuda'")
        try:
            from .export.detectors import load_onnx_detector
        except ImportError as error:
            raise ValueError(f"the ONNX Runtime engine needs the onnx extra (pip install 'casc-detector[onnx]'): "
                             f"{error}") from None
        return load_onnx_detector(name_or_path, provider=provider, dtype=dtype, **kwargs)
    entry = resolve(name_or_path)
    verify_sha256(entry.path, entry.sha256)
    if entry.family == "yolo":
        from .models.yolo import SpikingYOLO

        return SpikingYOLO.from_checkpoint(entry.path, sha256=entry.sha256, device=device, dtype=dtype, **kwargs)
    from .models.rcnn import SpikingFasterRCNN

    return SpikingFasterRCNN.from_checkpoint(entry.path, sha256=entry.sha256, device=device, dtype=dtype, **kwargs)
