"""``casc eval`` (also ``python -m eval``): its options, and the table it prints; the work is ``eval.evaluate``."""

from __future__ import annotations

import argparse
from dataclasses import fields

from detector.families import FAMILIES
from detector.options import Schedule, Selection, add_arguments as add_options
from detector.video import KEYFRAME_EVERY
from detector.weights import ENGINES, load_manifest

from .config import DEFAULT_METHODS, PAPER_SLEEP_EXTRA, EvalConfig, parse_methods, parse_timesteps
from .plots import METRIC_NAMES
from .report import report_text
from .run import evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    manifest = load_manifest()
    default_model = next((n for n, e in manifest.items() if e.kind == "qann"), None)
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="QANN: a bundled name (weights/manifest.json) or a checkpoint path")
    parser.add_argument("--float-model", default=None,
                        help="the float model it was fine-tuned from, for ANN and IF (None: the manifest's)")
    parser.add_argument("--data", default="bundled", help="bundled | bundled-video | coco:DIR | voc:DIR | data.yaml")
    parser.add_argument("--split", default="val", help="dataset split to evaluate")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated: ann (float network), qann (quantized network), casc (the CASC SNN), "
                             f"casc-paper (CASC with the paper's schedule: burst 1, L+{PAPER_SLEEP_EXTRA} sleep steps), "
                             "qcfs (the same QANN as QCFS neurons, wake=T, no sleep), if (plain IF rate-coded SNN "
                             "baseline of the float model)")
    parser.add_argument("--timesteps", default=None,
                        help="total steps T to evaluate, e.g. 1-16,24,32 (Faster R-CNN: even T, T/2 per stage). "
                             "None: the family's own list (" + "; ".join(f"{f.name}: {f.default_timesteps}"
                                                                          for f in FAMILIES.values()) + ")")
    # CASC's schedule and the detections kept, from their one declaration (conf low, for mAP)
    add_options(parser, Schedule, Selection, defaults={"conf": EvalConfig.conf}, skip=("classes",))
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images (None: all)")
    parser.add_argument("--batch", type=int, default=1, help="images per run (also the cache and progress unit)")
    parser.add_argument("--calibration-images", type=int, default=32,
                        help="training images for the IF baseline's thresholds")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--engine", default="pytorch", choices=ENGINES,
                        help="what runs the CASC network: pytorch (eager), or onnxruntime (its exported step graphs, "
                             "exported on first use; no spike counts, so no energy; ann, qann and the IF baseline "
                             "stay on PyTorch)")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                        help="ONNX Runtime execution provider with --engine onnxruntime")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="float64: CASC reproduces the QANN exactly; float32: rare boundary flips")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (None: half the cores, at least 1; more threads than free cores "
                             "make every step wait for a descheduled thread)")
    parser.add_argument("--names", default=None,
                        help="class names, comma-separated or a text file with one per line: how a VOC dataset's "
                             "(or a names-less data.yaml's) objects map to class ids (None: the model's names)")
    parser.add_argument("--metric", default="map50_95", choices=list(METRIC_NAMES),
                        help="what the table, the plots and T to 99%% QANN show: COCO mAP50-95 or mAP50, VOC07 "
                             "11-point or all-point AP50 (results.json and curve.csv keep them all)")
    parser.add_argument("--project", default="runs/eval", help="parent folder of the run folders")
    parser.add_argument("--name", default=None, help="run folder name (None: the model's name; numbered when "
                                                     "taken: NAME2, NAME3, ...)")
    parser.add_argument("--exist-ok", action="store_true",
                        help="write into PROJECT/NAME even if it exists (and resume its finished batches); always so "
                             "under torchrun")
    parser.add_argument("--out", default=None, help="the output folder itself, used as it is (resumes a run there); "
                                                    "None: PROJECT/NAME")
    parser.add_argument("--video", action=argparse.BooleanOptionalAction, default=None,
                        help="the images are video frames, one sequence per folder: CASC also runs them by delta "
                             "frames against fresh runs (video.json, energy_per_frame.png; default: on for "
                             "bundled-video)")
    parser.add_argument("--keyframe-every", type=int, default=KEYFRAME_EVERY,
                        help="with --video: a whole schedule every N frames (0: only the first of each sequence)")


def config_of(args: argparse.Namespace) -> EvalConfig:
    """The ``EvalConfig`` that ``casc eval``'s parsed options ask for."""
    options = {f.name: getattr(args, f.name) for f in fields(EvalConfig)}
    options["methods"] = parse_methods(args.methods)
    options["timesteps"] = tuple(parse_timesteps(args.timesteps)) if args.timesteps else None
    return EvalConfig(**options)


def main(args: argparse.Namespace) -> int:
    report = evaluate(config_of(args))
    if report is not None:  # None: a torchrun process other than the first
        print(report_text(report))
    return 0
