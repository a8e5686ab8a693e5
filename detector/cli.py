"""The ``casc`` command.

    casc demo                      convert a built-in network and print its fidelity table
    casc train yolo|rcnn ...       train / fine-tune a QANN (see ``casc train yolo --help``)
    casc eval ...                  mAP-vs-timestep curves (eval/)
    casc serve ...                 the HTTP service (service/)

Each sub-command lives in the module that owns the work; this file only wires them, and imports
a module when its command is used (so ``casc demo`` does not import Ultralytics).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# family -> module exposing add_train_arguments(parser) and train_from_args(args)
TRAINERS = {"yolo": "detector.models.yolo", "rcnn": "detector.models.rcnn"}
# command -> module exposing add_arguments(parser) and main(args) -> exit code
COMMANDS = {
    "eval": ("eval.runner", "mAP against time steps for ANN, QANN, CASC SNN and the IF baseline"),
    "serve": ("service.server", "serve spiking detectors over HTTP (FastAPI)"),
}


def _demo(args: argparse.Namespace) -> int:
    from .fidelity import fidelity_table, format_table

    rows = fidelity_table(levels=tuple(args.levels), nets=args.nets, depth=args.depth, seed=args.seed)
    print(format_table(rows))
    return 0


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casc", description="Spiking object detectors by CASC conversion")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="convert random detector-like QANNs and print the fidelity table")
    demo.add_argument("--levels", type=int, nargs="+", default=[2, 4, 8])
    demo.add_argument("--nets", type=int, default=20, help="random networks per level count")
    demo.add_argument("--depth", type=int, default=12, help="spiking layers on the longest path")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

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
        command_parser = sub.add_parser(command, help=help_text)
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
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"casc {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
