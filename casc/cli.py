"""The ``casc`` command.

    casc demo                      the main job: mAP vs time steps of the bundled detectors
    casc fidelity                  exactness of the conversion on random detector-like networks
    casc train yolo|rcnn ...       train / fine-tune a QANN (see ``casc train yolo --help``)
    casc quantize ...              post-training quantization of a float checkpoint into a QANN
    casc predict ...               detections on images, folders, globs, videos, webcams and streams
    casc export ...                the QANN and the spiking step graphs as ONNX
    casc eval ... (or casc val)    mAP-vs-timestep curves (eval/)
    casc plot DIR [DIR ...]        several evaluations on one axis (eval/compare.py)
    casc serve ...                 the HTTP service (service/)

Options may also be given as Ultralytics writes them, ``key=value`` (``casc predict model=yolov8n-bundled
source=bus.jpg conf=0.4 save_txt=True``): each becomes ``--key value`` (``--key`` / ``--no-key`` for a switch).

The application layer: each sub-command lives in the module that owns the work (``detector``,
``eval``, ``service``); this file only wires them, and imports a module when its command is used, so
``casc --help`` imports neither torch nor Ultralytics. Ultralytics is made offline
(``detector.models.yolo.prepare_ultralytics``) before a sub-command runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from detector import __version__
from detector.families import FAMILIES

# command -> module exposing add_arguments(parser) and main(args) -> exit code
COMMANDS = {
    "eval": ("eval.cli", "mAP against time steps for ANN, QANN, CASC SNN and the IF baseline"),
    "plot": ("eval.compare", "draw several casc eval results (e.g. YOLO and Faster R-CNN) on one axis"),
    "serve": ("service.server", "serve spiking detectors over HTTP (FastAPI)"),
    "export": ("detector.export.cli", "export a detector's QANN and spiking step graphs (ONNX)"),
    "quantize": ("detector.train.quantize", "post-training quantization: a float checkpoint -> a calibrated QANN"),
    "predict": ("detector.predict", "detect objects in images, folders, globs, videos, webcams and streams; "
                                    "annotated output under runs/predict"),
}
ALIASES = {"val": "eval"}  # Ultralytics' name for it
# A module a command may miss -> what installs it (pyproject.toml's extras; Ultralytics without its GUI OpenCV).
INSTALL_HINTS = {
    **dict.fromkeys(("fastapi", "uvicorn", "multipart", "fastapi_offline"),
                    "the 'service' extra: pip install -e '.[service]'"),
    **dict.fromkeys(("onnx", "onnxruntime", "onnxscript"), "the 'onnx' extra: pip install -e '.[onnx]'"),
    "ultralytics": "Ultralytics, without its GUI OpenCV: pip install --no-deps 'ultralytics==8.4.190'",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default, once: not where the help text already states it, nor for None / off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text or "None:" in text):
            return text
        return f"{text} (default: %(default)s)".lstrip()


# The main job: both bundled detectors on a subset of the bundled val split (about 10 minutes on 2 cores).
# The L = 4 QANN of each family; the Faster R-CNN with the spiking FPN (as accurate, a sixth of the energy).
DEMO_RUNS = (("yolov8n-bundled", 128), ("rcnn-r18-bundled-sfpn", 32))


def _demo(args: argparse.Namespace) -> int:
    from eval import EvalConfig, evaluate, parse_timesteps, report_text

    timesteps = tuple(parse_timesteps(args.timesteps)) if args.timesteps else None
    for name, limit in DEMO_RUNS:
        config = EvalConfig(model=name, limit=args.limit or limit, timesteps=timesteps, out=Path(args.out) / name)
        print(f"\n## {name} on the bundled benchmark (val, first {config.limit} images)\n", flush=True)
        print(report_text(evaluate(config)))
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from detector.fidelity import fidelity_table, format_table

    rows = fidelity_table(levels=tuple(args.levels), nets=args.nets, depth=args.depth, seed=args.seed)
    print(format_table(rows))
    return 0


def _command_parser(sub, name: str, help_text: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter, **kwargs)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casc", description="Spiking object detectors by CASC conversion",
                                     epilog="Options may also be given as key=value (casc predict model=NAME "
                                            "source=DIR conf=0.4). casc COMMAND --help lists a command's options.")
    parser.add_argument("--version", action="version", version=f"casc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = _command_parser(sub, "demo", "the main job: mAP vs time steps of the bundled detectors (ANN, QANN, "
                                        "CASC, IF) on the bundled benchmark")
    demo.add_argument("--limit", type=int, default=None, help="images per detector (None: 128 YOLO, 32 R-CNN)")
    demo.add_argument("--timesteps", default=None, help="total steps T (None: casc eval's default per family)")
    demo.add_argument("--out", default="runs/demo", help="output folder, one sub-folder per detector")
    demo.set_defaults(func=_demo)

    fidelity = _command_parser(sub, "fidelity", "convert random detector-like QANNs and print the fidelity table "
                                                "(max |SNN - QANN|, sleep steps, spikes)")
    fidelity.add_argument("--levels", type=int, nargs="+", default=[2, 4, 8], help="quantization levels L")
    fidelity.add_argument("--nets", type=int, default=20, help="random networks per level count")
    fidelity.add_argument("--depth", type=int, default=12, help="spiking layers on the longest path")
    fidelity.add_argument("--seed", type=int, default=0, help="seed of the first network")
    fidelity.set_defaults(func=_fidelity)

    train = _command_parser(sub, "train", "train or fine-tune a quantized network (QANN)")
    families = train.add_subparsers(dest="family", required=True)
    for family, module_name in ((f.name, f.trainer) for f in FAMILIES.values() if f.trainer):
        family_parser = _command_parser(families, family, f"train a {family} QANN")
        # Only the module of the family asked for is imported (and only to build its options).
        if len(argv) >= 2 and argv[0] == "train" and argv[1] == family:
            module = importlib.import_module(module_name)
            module.add_train_arguments(family_parser)
            family_parser.set_defaults(func=lambda a, m=module: _train(m, a))
    for command, (module_name, help_text) in COMMANDS.items():
        aliases = [alias for alias, target in ALIASES.items() if target == command]
        command_parser = _command_parser(sub, command, help_text, aliases=aliases)
        if argv and ALIASES.get(argv[0], argv[0]) == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(func=module.main)
    return parser


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub-)command ``argv`` names (``parser`` itself when it names none)."""
    for token in argv[:2]:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or token not in choices:
            break
        parser = choices[token]
    return parser


def expand_key_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Ultralytics' ``key=value`` arguments as options of ``parser``: ``conf=0.4`` -> ``--conf 0.4``,
    ``save_txt=True`` -> ``--save-txt``, ``save=False`` -> ``--no-save``, ``source=X`` -> the positional X.
    A token whose key is no option (a file named ``a=b.jpg``) stays as it is."""
    options = parser._option_string_actions
    out = []
    for token in argv:
        key, sep, value = token.partition("=")
        flag = "--" + key.replace("_", "-")
        if not sep or token.startswith("-") or not key.isidentifier():
            out.append(token)
        elif key == "source":
            out.append(value)
        elif flag in options and options[flag].nargs != 0:
            out += [flag, value]
        elif flag in options or f"--no-{flag[2:]}" in options:
            on = _switch(key, value)
            if on and flag in options:
                out.append(flag)
            elif not on and f"--no-{flag[2:]}" in options:
                out.append(f"--no-{flag[2:]}")
            # else the switch's default already says so (save_txt=False)
        else:
            out.append(token)
    return out


def _switch(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{key}={value}: {key} is a switch; give {key}=True or {key}=False")


def _train(module, args: argparse.Namespace) -> int:
    path = module.train_from_args(args)
    # One write per line: under torchrun every process prints here to one shared stdout, and an unbuffered
    # print writes the text and its newline apart, so two processes' lines could merge.
    sys.stdout.write(f"checkpoint: {path}\n")
    sys.stdout.flush()
    return 0


def install_hint(error: ModuleNotFoundError) -> str:
    """What to install for a missing module, in one line."""
    name = (error.name or "").split(".")[0]
    hint = INSTALL_HINTS.get(name)
    return f"needs {hint} (missing module {name})" if hint else \
        f"missing module {name}: reinstall as docs/quickstart.md says (make install)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = ALIASES.get(argv[0], argv[0]) if argv else None
    try:
        # Offline, before a sub-command (or its options) imports Ultralytics; without it only YOLO models fail.
        if (command in COMMANDS or command in ("train", "demo")) and importlib.util.find_spec("ultralytics"):
            from detector.models.yolo import prepare_ultralytics

            prepare_ultralytics()
        parser = build_parser(argv)
        args = parser.parse_args(expand_key_values(_subparser(parser, argv), argv))
        return args.func(args)
    except ModuleNotFoundError as error:
        print(f"casc {command}: error: {install_hint(error)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"casc {command}: error: {error}", file=sys.stderr)
        return 2
