"""``casc export``: a detector's QANN and spiking step graphs in one folder, described by ``export.json``.

    out/export.json            what was exported: model, family, input size, batch, dtype, levels, graphs
    out/qann.onnx              the QANN (YOLO: up to the raw head maps; R-CNN: stage 1 and stage 2 graphs)
    out/snn.{first,wake,sleep}.onnx                  YOLO: the spiking network's step graphs
    out/stage1.*.onnx, out/stage2.*.onnx             Faster R-CNN: one set per spiking stage

Graphs end where the spiking network ends: Ultralytics' decoding and NMS, torchvision's anchors,
proposal selection, RoIAlign and box decoding stay in the host code, run on the accumulated readouts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .graphs import export_qann, export_steps

FORMAT = "casc-onnx/1"
MANIFEST = "export.json"
DTYPES = ("float32", "float16", "float64")


def _yolo_graphs(det, out: Path, batch: int, imgsz: int, dtype: torch.dtype) -> dict:
    example = torch.zeros(batch, 3, imgsz, imgsz, dtype=dtype)
    return {"qann": {"snn": export_qann(det.readout_net, example, out / "qann.onnx")},
            "networks": {"snn": export_steps(det.snn, example, out, "snn")},
            "names": {str(k): v for k, v in det.names.items()}}


def _rcnn_graphs(det, out: Path, batch: int, imgsz: int, dtype: torch.dtype) -> dict:
    # Stage 1 sees the padded image batch; stage 2 every image's RoIs (the RPN keeps at most
    # post_nms_top_n per image), RoIAligned to the box head's input.
    qann = det.qann
    images = torch.zeros(batch, 3, imgsz, imgsz, dtype=dtype)
    pool = qann.roi_heads.box_roi_pool
    size = pool.output_size if isinstance(pool.output_size, (tuple, list)) else (pool.output_size,) * 2
    rois = torch.zeros(batch * qann.rpn.post_nms_top_n(), qann.backbone.out_channels, *size, dtype=dtype)
    qann_graphs = {"stage1": export_qann(det.qann_stage1, images, out / "qann.stage1.onnx"),
                   "stage2": export_qann(det.qann_stage2, rois, out / "qann.stage2.onnx")}
    return {"qann": qann_graphs,
            "networks": {"stage1": export_steps(det.stage1, images, out, "stage1"),
                         "stage2": export_steps(det.stage2, rois, out, "stage2")}}


def export_detector(model: str | Path, out: str | Path, imgsz: int | None = None, batch: int = 1,
                    dtype: str = "float32") -> Path:
    """Export a bundled model (by name) or checkpoint (by path) to ``out``; returns ``out/export.json``."""
    from ..weights import load_detector, resolve

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    entry = resolve(model)
    torch_dtype = getattr(torch, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if entry.family == "yolo":
        det = load_detector(model, dtype=torch_dtype, **({"imgsz": imgsz} if imgsz else {}))
        imgsz = det.imgsz
        graphs = _yolo_graphs(det, out, batch, imgsz, torch_dtype)
    else:
        det = load_detector(model, dtype=torch_dtype)
        stride = 32  # torchvision pads every image batch to a multiple of 32
        imgsz = imgsz or -(-int(det.qann.transform.max_size) // stride) * stride
        if imgsz % stride:
            raise ValueError(f"imgsz {imgsz} must be a multiple of {stride} for Faster R-CNN")
        graphs = _rcnn_graphs(det, out, batch, imgsz, torch_dtype)
    manifest = {"format": FORMAT, "model": str(model), "name": entry.name, "family": entry.family,
                "sha256": entry.sha256, "imgsz": imgsz, "batch": batch, "dtype": dtype, **graphs}
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


# --- the `casc export` command -------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="bundled model name or checkpoint path")
    parser.add_argument("--format", default="onnx", choices=["onnx"])
    parser.add_argument("--imgsz", type=int, default=None,
                        help="input size (default: the model's; Faster R-CNN: its padded max size)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (graphs have static shapes)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="graph dtype (float64 exports, but ONNX Runtime's CPU provider has no float64 Conv)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/export/NAME-bBATCH)")


def main(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / "export" / f"{Path(str(args.model)).stem}-b{args.batch}"
    path = export_detector(args.model, out, imgsz=args.imgsz, batch=args.batch, dtype=args.dtype)
    manifest = read_manifest(path.parent)
    files = [g["file"] for g in manifest["qann"].values()]
    files += [g["file"] for net in manifest["networks"].values() for g in net["graphs"].values()]
    print(f"exported {manifest['name']} ({manifest['family']}, {manifest['imgsz']}px, batch {manifest['batch']}, "
          f"{manifest['dtype']}) to {path.parent}:")
    for name in files:
        print(f"  {name}  {(path.parent / name).stat().st_size / 2**20:.1f} MiB")
    return 0
