"""``casc export``: a bundled model or checkpoint's QANN and spiking step graphs as ONNX, in one folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .bundle import DTYPES, read_manifest


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
    from ..weights import export_detector

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
