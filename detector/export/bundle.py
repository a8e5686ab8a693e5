"""A detector's QANN and spiking step graphs in one folder, described by ``export.json`` (``casc export``).

    out/export.json            what was exported: model, family, input size, batch, dtype, levels, graphs
    out/qann.onnx              the QANN (YOLO: up to the raw head maps; R-CNN: qann.stage1 / qann.stage2.onnx)
    out/NETWORK.{first,wake,sleep}.onnx   the step graphs of each spiking network the family has (its
                                         ``stages``: YOLO ``snn``; Faster R-CNN ``stage1``, ``stage2``)

Graphs end where the spiking network ends: Ultralytics' decoding and NMS, torchvision's anchors,
proposal selection, RoIAlign and box decoding stay in the host code, run on the accumulated readouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .graphs import export_qann, export_steps

FORMAT = "casc-onnx/1"
MANIFEST = "export.json"
DTYPES = ("float32", "float16", "float64")


def export_graphs(det, family, out: str | Path, imgsz: int | None = None, batch: int = 1,
                  dtype: str = "float32", about: dict | None = None) -> Path:
    """Export the loaded detector ``det`` of ``family`` (``detector.families``) to ``out``: its QANN and every
    spiking network's step graphs, as the detector states them (``export_networks``); ``about``: what the
    manifest records of the model (name, sha256, ...). Returns ``out/export.json``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    imgsz, networks = det.export_networks(imgsz, batch, getattr(torch, dtype))
    one = len(networks) == 1
    qann = {name: export_qann(module, example, out / ("qann.onnx" if one else f"qann.{name}.onnx"))
            for name, (_, module, example) in networks.items()}
    steps = {name: export_steps(snn, example, out, name) for name, (snn, _, example) in networks.items()}
    manifest = {"format": FORMAT, **(about or {}), "family": family.name, "imgsz": imgsz, "batch": batch,
                "dtype": dtype, "qann": qann, "networks": steps, "names": {str(k): v for k, v in det.names.items()}}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    return path


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported graphs here (run `casc export` first)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    return manifest
