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
from .families import FAMILIES, get_family

__all__ = [  # the public API (apps import only these)
    "ENGINES", "ModelEntry", "load_manifest", "resolve", "checkpoint_family", "load_detector", "export_detector",
    "sha256_of", "verify_sha256",
]

WEIGHTS_DIR = Path(os.environ.get("CASC_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
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
                raise ValueError(f"family must be one of {', '.join(FAMILIES)} and kind float|qann, got "
                                 f"{family}/{kind}")
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
    """The family whose ``checkpoint_format`` this project's checkpoint carries; of other files, ``"rcnn"`` for
    torchvision state dicts and reference checkpoints, else ``"yolo"`` (Ultralytics' files)."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an Ultralytics pickle: only the YOLO loader (Ultralytics') can read it
        return "yolo"
    if isinstance(data, dict):
        family = next((f.name for f in FAMILIES.values() if f.checkpoint_format == data.get("format")), None)
        if family is not None:
            return family
        if "model" in data:
            return "rcnn"
        if any(str(k).startswith(("backbone.", "rpn.", "roi_heads.")) for k in data):
            return "rcnn"
    return "yolo"


def load_detector(name_or_path: str | os.PathLike, device="cpu", dtype=None, engine: str = "pytorch",
                  provider: str = "cpu", batch: int = 1, imgsz: int | None = None, export_dir=None,
                  threads: int | None = None, **kwargs):
    """The detector of a bundled name or a checkpoint path (sha256-checked), built by its family's adapter
    (``detector.families``): a ``SpikingYOLO`` or a ``SpikingFasterRCNN``.

    ``engine="onnxruntime"``: its spiking networks run on ONNX Runtime with ``provider`` (cpu, cuda, tensorrt) and
    ``threads`` intra-op threads, the rest on the CPU; graphs for ``batch`` images of ``imgsz`` (larger batches
    run in slices of it) from ``export_dir`` (a ``casc export`` folder; its own size, batch and dtype) or exported
    on first use into the cache (``detector.export.detectors.cache_root``). ``kwargs`` go to the adapter's
    ``from_checkpoint``."""
    import torch

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    dtype = dtype or torch.float32
    entry = resolve(name_or_path)
    verify_sha256(entry.path, entry.sha256)
    family = get_family(entry.family)
    if engine == "pytorch":
        return family.load(entry.path, sha256=entry.sha256, device=device, dtype=dtype, imgsz=imgsz, **kwargs)
    if torch.device(device).type != "cpu":
        raise ValueError(f"device {device}: with the ONNX Runtime engine the spiking networks run on the "
                         f"provider ({provider}) and the rest on the CPU; choose the GPU with provider='cuda'")
    try:
        from .export.bundle import read_manifest
        from .export.detectors import attach_onnx_networks, cache_folder, has_graphs
    except ImportError as error:
        raise ValueError(f"the ONNX Runtime engine needs the onnx extra (pip install 'casc-detector[onnx]'): "
                         f"{error}") from None
    dtype_name = str(dtype).removeprefix("torch.")
    if export_dir is not None:
        folder = Path(export_dir)
        manifest = read_manifest(folder)
        if manifest["name"] != entry.name:
            raise ValueError(f"{folder} holds the graphs of {manifest['name']}, not of {name_or_path}")
    else:
        folder = cache_folder(entry.name, entry.sha256 or sha256_of(entry.path), imgsz, batch, dtype_name)
        if not has_graphs(folder):
            export_detector(name_or_path, folder, imgsz=imgsz, batch=batch, dtype=dtype_name)
        manifest = read_manifest(folder)
    detector = family.load(entry.path, sha256=entry.sha256, dtype=getattr(torch, manifest["dtype"]),
                           imgsz=manifest["imgsz"], **kwargs)
    return attach_onnx_networks(detector, family, folder, provider=provider, threads=threads)


def export_detector(model: str | os.PathLike, out: str | os.PathLike, imgsz: int | None = None, batch: int = 1,
                    dtype: str = "float32") -> Path:
    """Export a bundled model (by name) or checkpoint (by path) to ``out`` (``casc export``); returns
    ``out/export.json``."""
    import torch

    from .export.bundle import DTYPES, export_graphs

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    entry = resolve(model)
    family = get_family(entry.family)
    det = load_detector(model, dtype=getattr(torch, dtype), imgsz=imgsz)
    return export_graphs(det, family, out, imgsz=imgsz, batch=batch, dtype=dtype,
                         about={"model": str(model), "name": entry.name, "sha256": entry.sha256})
