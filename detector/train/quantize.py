"""``casc quantize``: a float detector checkpoint becomes a calibrated QANN in minutes on a CPU, no labels.

    casc quantize --model yolov8n-bundled-float --levels 4 --data bundled --out runs/quantize/yolo-l4.pt

Per-layer thresholds (MSE-optimal by default), rounding ClipQuan, an optional first layer with more
levels, and BatchNorm statistics re-estimated on the quantized network (``detector.calibrate``).
The result is this project's safe checkpoint, ready for ``casc eval`` or as the start of ``casc train``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..calibrate import THETA_METHODS
from ..data import open_dataset, parse_names
from ..families import get_family
from ..quant import ROUNDING
from ..weights import resolve, verify_sha256


def calibration_images(data: str, count: int, split: str = "train", classes: list[str] | None = None) -> list:
    """The first ``count`` images (RGB uint8) of ``data``'s ``split`` (``classes``: how a VOC dataset's objects are
    named; see ``open_dataset``)."""
    dataset = open_dataset(data, split, classes=classes)
    if len(dataset) == 0:
        raise ValueError(f"{data} ({split}) has no images to calibrate on")
    return [dataset.load_image(i) for i in range(min(count, len(dataset)))]


def quantize_checkpoint(model: str, data: str, out: str | Path, levels: int = 4, images: int = 256,
                        batch: int = 16, theta: str = "mse", percentile: float = 99.9, rounding: str = "round",
                        first_levels: int | None = None, split: str = "train", spiking_fpn: bool = False,
                        names: list[str] | None = None, min_size: int | None = None, max_size: int | None = None,
                        log=print) -> Path:
    """Quantize the float checkpoint ``model`` (a bundled name or a path) and write the QANN to ``out``.

    ``spiking_fpn`` (Faster R-CNN): also quantize the FPN's signed signals where they enter the next layers
    (``add_spiking_fpn``); ``model`` may then be a QANN already, which gets only those quantizers. ``names``: the
    class names to store (default: the checkpoint's). ``min_size`` / ``max_size`` (Faster R-CNN): the input sizes,
    for a torchvision state dict that does not record them (else torchvision's 800 / 1333). ``log`` gets one line
    per stage (progress that also shows in a log file)."""
    entry = resolve(model)
    verify_sha256(entry.path, entry.sha256)
    family = get_family(entry.family)
    options = dict(theta=theta, percentile=percentile, rounding=rounding, first_levels=first_levels, names=names,
                   spiking_fpn=spiking_fpn, min_size=min_size, max_size=max_size)
    foreign = family.foreign_quantize_options(options)
    if foreign:  # before reading any image
        raise ValueError(f"{' and '.join('--' + k.replace('_', '-') for k in foreign)}: not an option for "
                         f"{model}, a {family.name} model")
    rgb = calibration_images(data, images, split, names)
    log(f"quantize: {len(rgb)} calibration images from {data} ({split}); calibrating {levels} levels"
        + (" and the spiking FPN's signed quantizers" if spiking_fpn else "") + " ...")
    return family.quantize(entry.path, entry.sha256, rgb, out, levels, batch, **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="float checkpoint: a bundled name or a path")
    parser.add_argument("--data", required=True, help="calibration images: 'bundled', coco:DIR, voc:DIR or a YOLO YAML")
    parser.add_argument("--split", default="train", help="split the calibration images come from")
    parser.add_argument("--out", required=True, help="where to write the QANN checkpoint")
    parser.add_argument("--levels", type=int, default=4, help="quantization levels L of every activation")
    parser.add_argument("--first-levels", type=int, default=None,
                        help="levels of the first activation (the most sensitive layer; e.g. 8)")
    parser.add_argument("--images", type=int, default=256, help="calibration images")
    parser.add_argument("--batch", type=int, default=16, help="images per calibration batch")
    parser.add_argument("--theta", choices=THETA_METHODS, default="mse",
                        help="per-layer threshold: minimise the quantization MSE, or an activation percentile")
    parser.add_argument("--percentile", type=float, default=99.9, help="with --theta percentile")
    parser.add_argument("--rounding", choices=sorted(ROUNDING), default="round",
                        help="ClipQuan rounding (round: floor(Lz/θ + 1/2); floor: the paper's form)")
    parser.add_argument("--spiking-fpn", action="store_true",
                        help="Faster R-CNN: also quantize the FPN's signed signals where they enter its output "
                             "convs, the RPN head and the box head (signed quantizers), so those layers receive "
                             "spikes; --model may then be a QANN")
    parser.add_argument("--names", default=None,
                        help="class names to store, comma-separated or a file with one per line (None: the "
                             "checkpoint's)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="Faster R-CNN: the input's shorter side, for a state dict that does not record it (None: "
                             "the checkpoint's, else torchvision's 800)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="Faster R-CNN: the input's longer side at most (None: the checkpoint's, else 1333)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    path = quantize_checkpoint(args.model, args.data, args.out, levels=args.levels, images=args.images,
                               batch=args.batch, theta=args.theta, percentile=args.percentile,
                               rounding=args.rounding, first_levels=args.first_levels, split=args.split,
                               spiking_fpn=args.spiking_fpn, names=parse_names(args.names), min_size=args.min_size,
                               max_size=args.max_size, log=lambda line: print(line, flush=True))
    print(f"QANN written to {path} ({time.monotonic() - started:.0f} s)")
    return 0
