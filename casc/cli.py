"""The ``casc`` command.

    casc demo                      the main job: mAP vs time steps of the bundled detectors
    casc fidelity                  exactness of the conversion on random detector-like networks
    casc train yolo|rcnn ...       train / fine-tune a QANN (see ``casc train yolo --help``)
    casc quantize ...              post-training quantization of a float checkpoint into a QANN
    casc predict ...               detections on images, folders, globs and videos (annotated output)
    casc export ...                the QANN and the spiking step graphs as ONNX
    casc eval ...                  mAP-vs-timestep curves (eval/)
    casc plot DIR [DIR ...]        several evaluations on one axis (eval/compare.py)
    casc serve ...                 the HTTP service (service/)

The application layer: each sub-command lives in the module that owns the work (``detector``,
``eval``, ``service``); this file only wires them, and imports a module when its command is used.
Ultralytics is made offline (``detector.models.yolo.prepare_ultralytics``) before any command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from detector import __version__
from detector.models.yolo import prepare_ultralytics

# family -> module exposing add_train_arguments(parser) and train_from_args(args)
TRAINERS = {"yolo": "detector.train.yolo", "rcnn": "detector.train.rcnn"}
# command -> module exposing add_arguments(parser) and main(args) -> exit code
COMMANDS = {
    "eval": ("eval.runner", "mAP against time steps for ANN, QANN, CASC SNN and the IF baseline"),
    "plot": ("eval.compare", "draw several casc eval results (e.g. YOLO and Faster R-CNN) on one axis"),
    "serve": ("service.server", "serve spiking detectors over HTTP (FastAPI)"),
    "export": ("detector.export.cli", "export a detector's QANN and spiking step graphs (ONNX)"),
    "quantize": ("detector.train.quantize", "post-training quantization: a float checkpoint -> a calibrated QANN"),
    "predict": ("detector.predict", "detect objects in images, folders, globs and videos; annotated output under runs/predict"),
}


# The main job: both bundled detectors on a subset of the bundled val split (about 10 minutes on 2 cores).
# The L = 4 QANN of each family; the Faster R-CNN with the spiking FPN (as accurate, a sixth of the energy).
DEMO_RUNS = (("yolov8n-bundled", 128), ("rcnn-r18-bundled-sfpn", 32))
HELP = argparse.ArgumentDefaultsHelpFormatter


def _demo(args: argparse.Namespace) -> int:
    from eval.runner import add_arguments, main as evaluate

    for name, limit in DEMO_RUNS:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        timesteps = ["--timesteps", args.timesteps] if args.timesteps else []
        eval_args = parser.parse_args(["--model", name, "--limit", str(args.limit or limit), *timesteps,
                                       "--out", str(Path(args.out) / name)])
        print(f"\n## {name} on the bundled benchmark (val, first {eval_args.limit} images)\n", flush=True)
        evaluate(eval_args)
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from detector.fidelity import fidelity_table, format_table

    rows = fidelity_table(levels=tuple(args.levels), nets=args.nets, depth=args.depth, seed=args.seed)
    print(format_table(rows))
    return 0


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casc", description="Spiking object detectors by CASC conversion")
    parser.add_argument("--version", action="version", version=f"casc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", formatter_class=HELP, help="the main job: mAP vs time steps of the bundled detectors (ANN, QANN, "
                                       "CASC, IF) on the bundled benchmark")
    demo.add_argument("--limit", type=int, default=None, help="images per detector (None: 128 YOLO, 32 R-CNN)")
    demo.add_argument("--timesteps", default=None, help="total steps T (None: casc eval's default per family)")
    demo.add_argument("--out", default="runs/demo", help="output folder, one sub-folder per detector")
    demo.set_defaults(func=_demo)

    fidelity = sub.add_parser("fidelity", formatter_class=HELP, help="convert random detector-like QANNs and print the fidelity table")
    fidelity.add_argument("--levels", type=int, nargs="+", default=[2, 4, 8], help="quantization levels L")
    fidelity.add_argument("--nets", type=int, default=20, help="random networks per level count")
    fidelity.add_argument("--depth", type=int, default=12, help="spiking layers on the longest path")
    fidelity.add_argument("--seed", type=int, default=0)
    fidelity.set_defaults(func=_fidelity)

    train = sub.add_parser("train", help="train or fine-tune a quantized network (QANN)")
    families = train.add_subparsers(dest="family", required=True)
    for family, module_name in TRAINERS.items():
        family_parser = families.add_parser(family, help=f"train a {family} QANN")
        # Only the module of the family asked for is imported (and only to build its options).
        if len(argv) >= 2 and argv[0] == "train" and argv[1] == family:
            module = importlib.import_module(module_name)
            module.add_train_arguments(family_parser)
            family_parser.set_defaults(func=lambda a, m=module: _train(m, a))
    for command, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(command, help=help_text, description=help_text, formatter_class=HELP)
        if argv and argv[0] == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(func=module.main)
    return parser


def _train(module, args: argparse.Namespace) -> int:
    path = module.train_from_args(args)
    print(f"checkpoint: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prepare_ultralytics()  # offline, before a sub-command (or its options) imports Ultralytics
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"casc {args.command}: error: {error}", file=sys.stderr)
        return 2
