"""QANN ablation: post-training quantization choices and their mAP on the bundled val split.

    python benchmarks/qann_ablation.py --family yolo --val 500            # the YOLOv8n rows
    python benchmarks/qann_ablation.py --family rcnn --val 120            # the Faster R-CNN rows
    python benchmarks/qann_ablation.py --family yolo --qann runs/x.pt     # evaluate one QANN checkpoint

Each row quantizes the bundled float model (256 train images, no labels) with one choice changed and
evaluates the QANN (no spiking: the SNN at sleep="auto" equals it) with pycocotools. Prints a markdown
table with the command of every row; the float model's own mAP is the first row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detector.calibrate import quantize  # noqa: E402
from detector.data import open_dataset  # noqa: E402
from detector.train.quantize import calibration_images  # noqa: E402
from detector.weights import resolve  # noqa: E402
from eval.metrics import coco_metrics, detection_columns  # noqa: E402

FLOAT = {"yolo": "yolov8n-bundled-float", "rcnn": "rcnn-r18-bundled-float"}
# (label, quantize options); theta=None: every threshold 1 (the old default), no BN re-estimation
ROWS = [
    ("floor, θ = 1, no BN re-estimation (old recipe, no fine-tuning)", dict(rounding="floor", theta=None, bn=False)),
    ("round, θ = 1, no BN re-estimation", dict(rounding="round", theta=None, bn=False)),
    ("floor, θ = p99.9, BN re-estimated", dict(rounding="floor", theta="percentile", bn=True)),
    ("round, θ = p99.9, BN re-estimated", dict(rounding="round", theta="percentile", bn=True)),
    ("round, θ = MSE, no BN re-estimation", dict(rounding="round", theta="mse", bn=False)),
    ("round, θ = MSE, BN re-estimated (casc quantize default)", dict(rounding="round", theta="mse", bn=True)),
    ("round, θ = MSE, BN re-estimated, first layer L = 8", dict(rounding="round", theta="mse", bn=True, first=8)),
]


def float_model(family: str):
    entry = resolve(FLOAT[family])
    if family == "yolo":
        from detector.models import yolo

        model, meta = yolo.load_checkpoint(entry.path, sha256=entry.sha256)
        return model, meta
    from detector.models import rcnn

    return rcnn.load_float_for_calibration(entry.path, sha256=entry.sha256)


def inputs(family: str, rgb, meta):
    if family == "yolo":
        from detector.models import yolo

        return yolo.calibration_inputs(rgb, meta["imgsz"])
    from detector.models import rcnn

    return rcnn.calibration_inputs(rgb)


def build(family: str, levels: int, rgb, rounding: str, theta: str | None, bn: bool, first: int | None = None):
    from detector.quant import ClipQuan, to_qann

    model, meta = float_model(family)
    batches = inputs(family, rgb, meta)
    if theta is None:  # the old recipe: every threshold at 1
        qann = to_qann(model, levels, rounding=rounding)
        if first:
            next(m for m in qann.modules() if isinstance(m, ClipQuan)).levels = first
    else:
        qann = quantize(model, levels, batches, theta=theta, rounding=rounding, first_levels=first, reestimate_bn=bn)
    return qann, meta


def evaluate(family: str, model, meta, val: int, quantized: bool = True) -> dict:
    """mAP50-95 / mAP50 of ``model`` (a QANN, or the float model) on the first ``val`` bundled val images."""
    dataset = open_dataset("bundled", "val")
    count = min(val, len(dataset))
    if family == "yolo":
        from detector.models.yolo import SpikingYOLO

        det = SpikingYOLO.from_model(model, names=meta["names"], imgsz=meta["imgsz"]) if quantized else None
        predict = (det.qann_predict if det else _float_yolo(model, meta).qann_predict)
    else:
        from detector.models.rcnn import SpikingFasterRCNN

        det = (SpikingFasterRCNN(model, classes=meta.get("classes"), meta=meta) if quantized
               else SpikingFasterRCNN(model, classes=meta.get("classes"), meta=meta, neuron="if",
                                      calibration=[dataset.load_image(0)]))
        predict = det.qann_predict
    run = lambda ims: [r.to_dict(decimals=None) for r in predict(ims, conf=0.001, color="rgb")]  # noqa: E731
    detections, truth = [], []
    for start in range(0, count, 8):
        idx = list(range(start, min(start + 8, count)))
        for i, record in zip(idx, run([dataset.load_image(i) for i in idx])):
            detections.append({"image_id": i, **detection_columns(record)})
            target = dataset.target(i)
            h, w = dataset.image_size(i)
            truth.append({**target, "image_id": i, "height": h, "width": w})
    metrics = coco_metrics(truth, detections, list(dataset.classes))
    return {"map50_95": metrics["map50_95"], "map50": metrics["map50"]}


def _float_yolo(model, meta):
    """The float YOLO through the same pre- and post-processing (a ClipQuan-free net, evaluated as is)."""
    from detector.models.yolo import SpikingYOLO

    det = SpikingYOLO.__new__(SpikingYOLO)  # only the QANN path is used: no conversion of a float net
    SpikingYOLO.__init__(det, model, names=meta["names"], imgsz=meta["imgsz"], neuron="if",
                         calibration=[torch.zeros(1, 3, meta["imgsz"], meta["imgsz"])])
    return det


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FLOAT), default="yolo")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--val", type=int, default=500, help="bundled val images to evaluate on")
    parser.add_argument("--calibration", type=int, default=256, help="bundled train images to calibrate on")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (default: all)")
    parser.add_argument("--qann", default=None, help="evaluate this QANN checkpoint instead of the rows")
    args = parser.parse_args()
    if args.qann:
        entry = resolve(args.qann)
        if args.family == "yolo":
            from detector.models import yolo

            model, meta = yolo.load_checkpoint(entry.path)
        else:
            from detector.models import rcnn

            state, meta = rcnn._unwrap_state_dict(rcnn.load_checkpoint(entry.path))
            model = rcnn.model_from_state_dict(state, meta, levels=None)
        print(args.qann, evaluate(args.family, model, meta, args.val))
        return 0
    rgb = calibration_images("bundled", args.calibration)
    model, meta = float_model(args.family)
    reference = evaluate(args.family, model, meta, args.val, quantized=False)
    print(f"| {args.family} L = {args.levels} (bundled val, {args.val} images) | mAP50-95 | mAP50 | of float |")
    print("|---|---|---|---|")
    print(f"| float ANN | {reference['map50_95']:.3f} | {reference['map50']:.3f} | 100 % |", flush=True)
    wanted = {int(r) for r in args.rows.split(",")} if args.rows else set(range(len(ROWS)))
    for number, (label, options) in enumerate(ROWS):
        if number not in wanted:
            continue
        started = time.monotonic()
        qann, meta = build(args.family, args.levels, rgb, **options)
        m = evaluate(args.family, qann, meta, args.val)
        print(f"| {number}: {label} | {m['map50_95']:.3f} | {m['map50']:.3f} | "
              f"{100 * m['map50_95'] / reference['map50_95']:.0f} % | ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
