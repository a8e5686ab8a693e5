"""``casc train yolo``: train or fine-tune a YOLO QANN with one recipe, on one CPU thread or many GPUs.

The start (both paths): ``--model`` is a bundled name, a checkpoint or a model YAML. A QANN continues its
training; a float model becomes a calibrated QANN first (MSE thresholds, BatchNorm re-estimated, optional
first-layer levels: ``detector.calibrate.quantize`` on ``--calibrate-images`` training images); ``--float``
trains the float model itself. Then:

- Ultralytics' trainer (default; ``detector.train.yolo_trainer``): its augmentation, schedules, EMA, AMP,
  plots, resume and multi-GPU DDP (``--device 0,1,...``), with the thresholds in their own group and optional
  distillation. It writes ``best.pt`` / ``last.pt`` (Ultralytics' pickles, for ``YOLO(path)``) and
  ``best.casc.pt`` / ``last.casc.pt`` beside them (this project's safe format: load these);
- ``--qat``: the CPU-sized loop of ``detector.train.yolo_qat`` (same start, groups and distillation; flips
  as its only augmentation; an iteration budget), writing our safe format only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from ..models.yolo import (ACTIVATIONS, build_qann, export_checkpoint, load_checkpoint, save_qann,
                           ultralytics_start_checkpoint)
from ..quant import qann_levels
from .recipe import add_output_arguments, add_qat_arguments, output_folder


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``casc train yolo``."""
    parser.add_argument("--model", default="yolov8n.yaml",
                        help="where to start: a bundled name (a bundled QANN continues its training), a checkpoint "
                             "(ours, or an Ultralytics .pt: loaded without running its pickle) or a model YAML "
                             "(yolov8n.yaml, yolov5nu.yaml, yolo11n.yaml, ...: random init)")
    parser.add_argument("--data", required=True,
                        help="'bundled' or an Ultralytics dataset YAML (with --qat also coco:DIR or voc:DIR)")
    parser.add_argument("--levels", type=int, default=4,
                        help="quantization levels L of a float start (a QANN start keeps its own)")
    parser.add_argument("--epochs", type=int, default=100, help="Ultralytics' trainer: epochs")
    parser.add_argument("--iterations", type=int, default=None,
                        help="optimizer steps (None: --qat 1000; the trainer: --epochs); the trainer rounds them up "
                             "to whole epochs")
    parser.add_argument("--imgsz", type=int, default=None, help="image size (None: the checkpoint's, 640 for a YAML)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (Ultralytics DDP: over all GPUs)")
    parser.add_argument("--device", default=None, help="cpu, 0, 0,1, ... (None: Ultralytics' choice)")
    parser.add_argument("--act", choices=sorted(ACTIVATIONS), default=None,
                        help="float activation of a YAML model before quantization (None: SiLU, the YAML's own)")
    parser.add_argument("--float", action="store_true",
                        help="train the float model without quantization (e.g. the ReLU net of the IF baseline)")
    add_output_arguments(parser, "runs/casc", "train")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers")
    parser.add_argument("--resume", action="store_true", help="resume from OUT/weights/last.pt (the trainer)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip Ultralytics' plots")
    parser.add_argument("--time", type=float, default=None,
                        help="train for this many hours instead of --epochs (Ultralytics fits the schedule to it; "
                             "--max-minutes says the same in minutes)")
    add_qat_arguments(parser.add_argument_group("QAT (the same options as casc train rcnn)"))
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate (None: --qat 1e-3 on a cosine schedule; the trainer: Ultralytics' "
                             "choice of optimizer and rate)")
    parser.add_argument("--theta-lr", type=float, default=None,
                        help="learning rate of the thresholds (None: the weights')")
    parser.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the float model")
    parser.add_argument("--float-model", default=None,
                        help="the float model to distil from (None: --model when it is float)")
    qat = parser.add_argument_group("--qat: the CPU-sized loop (detector/train/yolo_qat.py)")
    qat.add_argument("--qat", action="store_true", help="fine-tune with the CPU loop instead of Ultralytics' trainer "
                     "(--data may then also be coco:DIR or voc:DIR)")
    qat.add_argument("--no-ema", dest="ema", action="store_false", help="save the raw weights, not their EMA")
    qat.add_argument("--save-every", type=int, default=100, help="checkpoint every N iterations")


def warn_if_silu(act: str) -> None:
    """A SiLU QANN converts with CASC, but the IF baseline (and so casc eval's IF curve) needs a ReLU model."""
    if act == "silu":
        print("casc train yolo: warning: quantizing a SiLU model; the CASC SNN is exact to its QANN, but the IF "
              "baseline converts ReLU networks only (train the float model with --act relu to compare with it)",
              file=sys.stderr)


def start_model(args: argparse.Namespace):
    """(model to train, its metadata, the float model it came from or None, the training dataset): ``--model``'s
    QANN as it is (training continues), its float model as a calibrated QANN, or (``--float``) the float model."""
    from ..calibrate import quantize
    from ..data import open_dataset
    from ..models.yolo import calibration_inputs
    from ..weights import resolve

    if Path(args.model).suffix in {".yaml", ".yml"}:
        dataset = open_dataset(args.data, "train")
        model = build_qann(args.model, act=args.act, nc=len(dataset.classes), quantize=False)
        meta = {"names": dict(enumerate(dataset.classes)), "imgsz": 640, "act": args.act or "silu",
                "quantized": False}
    else:
        entry = resolve(args.model)
        if entry.family != "yolo":
            raise ValueError(f"--model {args.model} is a {entry.family} model; casc train yolo trains YOLO")
        model, meta = load_checkpoint(entry.path, sha256=entry.sha256)
        names = meta["names"]
        classes = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
        dataset = open_dataset(args.data, "train", classes=classes)  # VOC: read with the model's names
    meta = dict(meta, imgsz=args.imgsz or meta["imgsz"])
    if meta["quantized"]:
        if args.float:
            raise ValueError(f"--float trains a float model; {args.model} is a QANN")
        return model, meta, None, dataset
    if args.float:
        return model, meta, model, dataset
    warn_if_silu(meta["act"])
    rgb = [dataset.load_image(i) for i in range(min(args.calibrate_images, len(dataset)))]
    qann = quantize(model, args.levels, calibration_inputs(rgb, meta["imgsz"]), theta=args.theta_init,
                    first_levels=args.first_levels)
    qann.yaml["casc"] = {"levels": qann_levels(qann), "act": meta["act"], "quantized": True}
    return qann, dict(meta, levels=qann_levels(qann), quantized=True), model, dataset


def teacher_spec(args: argparse.Namespace, float_start: torch.nn.Module | None) -> str | None:
    """What ``--distill`` distils from (a bundled name or a path): ``--float-model``, else ``--model`` when float."""
    if not args.distill:
        return None
    spec = args.float_model or (args.model if float_start is not None else None)
    if spec is None or Path(spec).suffix in {".yaml", ".yml"}:
        raise ValueError("--distill needs the float model: --float-model NAME|PATH (or a float --model checkpoint)")
    return str(Path(spec).resolve()) if Path(spec).is_file() else spec  # the trainer's workers may run elsewhere


def train_qat(args: argparse.Namespace) -> Path:
    """``casc train yolo --qat``: the recipe's start, then the CPU loop of ``detector.train.yolo_qat``."""
    from ..weights import resolve
    from .yolo_qat import finetune

    model, meta, float_start, dataset = start_model(args)
    spec, teacher = teacher_spec(args, float_start), None
    if spec is not None:
        entry = resolve(spec)
        teacher = load_checkpoint(entry.path, sha256=entry.sha256)[0] if args.float_model else float_start
    out = output_folder(args)
    save = lambda m, path: save_qann(m, path, names=meta["names"], imgsz=meta["imgsz"], act=meta["act"])  # noqa: E731
    summary = finetune(model, dataset, meta["imgsz"], out, save, iterations=args.iterations or 1000, batch=args.batch,
                       lr=args.lr or 1e-3, theta=args.theta, theta_lr=args.theta_lr, teacher=teacher,
                       distill=args.distill, ema=args.ema, max_minutes=args.max_minutes, save_every=args.save_every,
                       log=lambda message: print(message, flush=True))
    summary.pop("model")
    (out / "summary.json").write_text(json.dumps({**summary, "command": vars(args)}, indent=1, default=str))
    return Path(summary["checkpoint"])


def data_yaml(data: str) -> Path:
    """The Ultralytics data YAML of ``--data``: ``bundled``'s, or the file given (checked before any folder is made or
    Ultralytics runs: it would look a missing name up in its datasets folder and try a download)."""
    if data == "bundled":
        from ..data import ensure_bundled

        return ensure_bundled() / "data.yaml"
    path = Path(data)
    if path.suffix not in {".yaml", ".yml"}:
        raise ValueError(f"--data {data}: Ultralytics' trainer reads 'bundled' or a data YAML; train on coco:DIR or "
                         "voc:DIR with --qat")
    if not path.is_file():
        raise FileNotFoundError(f"data YAML not found: {data}; give the path of an Ultralytics data.yaml (path, "
                                "train, val, names; named datasets such as coco8.yaml are not downloaded here)")
    return path.resolve()


def trainer_overrides(args: argparse.Namespace, start: Path, data: Path, imgsz: int, train_images: int) -> dict:
    """Ultralytics' arguments for a run from the start checkpoint ``start``."""
    out = output_folder(args).resolve()
    epochs = args.epochs
    if args.iterations:  # Ultralytics counts epochs: enough of them for the steps asked for
        epochs = math.ceil(args.iterations / math.ceil(train_images / args.batch))
    overrides = dict(model=str(start), data=str(data), epochs=int(epochs), imgsz=int(imgsz), batch=int(args.batch),
                     workers=int(args.workers), project=str(out.parent), name=out.name, exist_ok=True,
                     plots=bool(args.plots))
    hours = args.time or (args.max_minutes / 60 if args.max_minutes else None)
    if hours:
        overrides["time"] = hours
    if args.device is not None:
        overrides["device"] = args.device
    if args.lr:
        overrides.update(optimizer="AdamW", lr0=args.lr)
    if torch.cuda.is_available() and str(args.device).lower() != "cpu":
        # Ultralytics' fp16 AMP check downloads a model (impossible offline); bf16 needs no check.
        overrides["amp"] = "bf16"
    return overrides


def train_ultralytics(args: argparse.Namespace) -> Path:
    """The recipe inside Ultralytics' trainer (``QATDetectionTrainer``); returns ``best.pt`` and writes
    ``best.casc.pt`` beside it."""
    from ..models.yolo.pt_files import load_ultralytics_file
    from .yolo_trainer import QATDetectionTrainer

    data = data_yaml(args.data)
    out = output_folder(args).resolve()
    if args.resume:
        last = out / "weights" / "last.pt"
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no {last} to resume from")
        if load_ultralytics_file(last).get("epoch", -1) < 0:  # Ultralytics marks a finished run's last.pt so
            raise ValueError(f"--resume: the run in {out} has finished; train its QANN further with --model "
                             f"{last.with_suffix('.casc.pt')}")
        overrides = {"resume": str(last), "model": str(last)}
        imgsz = None
    else:
        model, meta, float_start, dataset = start_model(args)
        model.yaml.setdefault("casc", {})["qat"] = {"theta": args.theta, "theta_lr": args.theta_lr,
                                                    "distill": args.distill, "teacher": teacher_spec(args, float_start)}
        # beside the run folder, not in it: Ultralytics' multi-GPU launch empties the run folder first
        start = ultralytics_start_checkpoint(model, out.with_name(f"{out.name}-start.pt"))
        imgsz = meta["imgsz"]
        overrides = trainer_overrides(args, start, data, imgsz, len(dataset))
    trainer = QATDetectionTrainer(overrides=overrides)
    trainer.train()
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    if not best.is_file():
        raise RuntimeError(f"training wrote no checkpoint under {out}")
    export_checkpoint(best, best.with_suffix(".casc.pt"), imgsz=imgsz or int(trainer.args.imgsz))
    return best


def train_from_args(args: argparse.Namespace) -> Path:
    """Run ``casc train yolo``; returns the written checkpoint (``best.pt``, or ``last.pt`` with ``--qat``)."""
    return train_qat(args) if args.qat else train_ultralytics(args)
