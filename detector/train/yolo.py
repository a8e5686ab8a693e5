"""``casc train yolo``: train or fine-tune a YOLO QANN.

Two recipes:

- the Ultralytics trainer (default): a float model from a YAML (``--float``), or a QANN fine-tuned
  with Ultralytics' schedule and augmentation; it writes ``best.pt`` (Ultralytics' pickle, for
  ``YOLO(path)``) and ``best.casc.pt`` beside it (this project's safe format: load this one);
- ``--qat``: the CPU-sized recipe of ``detector.train.yolo_qat`` (calibrated start, thresholds in
  their own group or frozen, EMA, optional distillation), writing our safe format only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .recipe import add_output_arguments, add_qat_arguments, output_folder
from ..models.yolo import (ACTIVATIONS, build_qann, export_checkpoint, is_qann_checkpoint, letterbox, load_checkpoint,
                           model_act, prepare_ultralytics, quantize_model, save_qann, ultralytics_start_checkpoint)
from ..models.yolo.model import _check_yaml, _yaml_dict


def calibration_batches(data: str | Path, imgsz: int, images: int = 64, batch: int = 16) -> list[torch.Tensor]:
    """The first ``images`` training images of an Ultralytics data YAML, letterboxed, in batches: what
    ``to_qann(..., calibration=...)`` needs to start each ClipQuan threshold at its activation percentile."""
    from ..data import read_yolo

    dataset = read_yolo(data, "train")
    count = min(images, len(dataset))
    bgr = [dataset.load_image(i)[..., ::-1] for i in range(count)]
    return [letterbox(bgr[i:i + batch], imgsz)[0] for i in range(0, count, batch)]


# --- training with the Ultralytics trainer -----------------------------------------------------------------

def _trainer_class():
    prepare_ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    class QANNDetectionTrainer(DetectionTrainer):
        """Ultralytics DetectionTrainer whose model is our QANN (or the float model with ``casc_float``)."""

        casc_levels: int | None = 4
        casc_act: str | None = None
        casc_float: bool = False
        casc_calibration: list[torch.Tensor] | None = None  # float -> QANN: thresholds from these, learnt

        def get_model(self, cfg=None, weights=None, verbose=True):
            info = dict(cfg.get("casc", {})) if isinstance(cfg, dict) else {}
            levels = self.casc_levels if self.casc_levels is not None else info.get("levels")
            act = self.casc_act or info.get("act")
            quantize = not self.casc_float
            source = cfg if cfg is not None else "yolov8n.yaml"
            if isinstance(source, dict):
                source = {k: v for k, v in source.items() if k != "casc"}
            model = build_qann(source, levels=levels, act=act, nc=self.data["nc"], quantize=False,
                               verbose=verbose)
            model = self.set_model_names_for_load(model) if hasattr(self, "set_model_names_for_load") else model
            if weights:
                model.load(weights)
            if quantize:
                calibrated = self.casc_calibration is not None
                model = quantize_model(model, levels, act or model_act(model), learnable=calibrated,
                                  calibration=self.casc_calibration)
            return model

    return QANNDetectionTrainer


def train(model: str | Path = "yolov8n.yaml", data: str | Path = "coco8.yaml", levels: int = 4, epochs: int = 100,
          imgsz: int = 640, batch: int = 16, device: str | None = None, act: str | None = None,
          float_model: bool = False, out: str | Path = "runs/casc/train", workers: int = 2, resume: bool = False,
          plots: bool = True, calibrate: int = 0, **overrides) -> Path:
    """Fine-tune (a ``.pt``) or train (a YAML) the QANN with the Ultralytics trainer; returns ``best.pt``
    (an Ultralytics checkpoint holding the QANN, loadable by ``YOLO(path)`` and ``load_checkpoint``) and
    writes ``best.casc.pt`` (our safe format) beside it. Quantizing a float ``.pt``, the thresholds start at
    the 99.9th percentile of each activation on ``calibrate`` training images and are learnt (0: theta = 1)."""
    check_inputs(model, data)
    model_path = Path(str(model))
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if not float_model:
        warn_if_silu(act or ("silu" if model_path.suffix in {".yaml", ".yml"} else load_checkpoint(model_path)[1]["act"]))
    out = Path(out).resolve()
    if model_path.suffix == ".pt" and not resume:
        model = model_path = ultralytics_start_checkpoint(model_path, out)
    args = dict(model=str(model), data=str(data), epochs=int(epochs), imgsz=int(imgsz), batch=int(batch),
                workers=int(workers), project=str(out.parent), name=out.name, exist_ok=True, plots=bool(plots),
                pretrained=model_path.suffix == ".pt")
    if device is not None:
        args["device"] = device
    if resume:
        last = out / "weights" / "last.pt"
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no {last} to resume from")
        args = {"resume": str(last), "model": str(last)}
    if "amp" not in overrides and torch.cuda.is_available() and str(device).lower() != "cpu":
        # Ultralytics' fp16 AMP check downloads a model (impossible offline); bf16 needs no check.
        args["amp"] = "bf16"
    args.update(overrides)
    trainer_cls = _trainer_class()
    trainer_cls.casc_levels = None if float_model else int(levels)
    trainer_cls.casc_act = act
    trainer_cls.casc_float = bool(float_model)
    from_float = model_path.suffix == ".pt" and not float_model and not resume and not is_qann_checkpoint(model_path)
    trainer_cls.casc_calibration = calibration_batches(data, imgsz, calibrate) if calibrate and from_float else None
    trainer = trainer_cls(overrides=args)
    trainer.train()
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    if not best.is_file():
        raise RuntimeError(f"training wrote no checkpoint under {out}")
    export_checkpoint(best, best.with_suffix(".casc.pt"), imgsz=imgsz)
    return best


def check_inputs(model: str | Path, data: str | Path) -> None:
    """The model and data files exist and the model YAML is supported, before any folder is made or Ultralytics
    runs (it would look a missing name up in its datasets folder and try a download)."""
    model_path = Path(str(model))
    if model_path.suffix == ".pt" and not model_path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {model}")
    if model_path.suffix in {".yaml", ".yml"}:
        _check_yaml(_yaml_dict(str(model)))
    data_path = Path(str(data))
    if data_path.suffix in {".yaml", ".yml"} and not data_path.is_file():
        raise FileNotFoundError(f"data YAML not found: {data}; give the path of an Ultralytics data.yaml (path, "
                                "train, val, names; named datasets such as coco8.yaml are not downloaded here)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``casc train yolo``."""
    parser.add_argument("--model", default="yolov8n.yaml",
                        help="model YAML (yolov8n.yaml, yolov5nu.yaml, yolo11n.yaml, ...) or a .pt to fine-tune "
                             "(Ultralytics .pt files are pickles: trusted files only)")
    parser.add_argument("--data", required=True, help="Ultralytics dataset YAML (YOLO format)")
    parser.add_argument("--levels", type=int, default=4, help="quantization levels L of ClipQuan")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--imgsz", type=int, default=None, help="image size (default: 640; with --qat the checkpoint's)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu, 0, 0,1, ... (default: Ultralytics' choice)")
    parser.add_argument("--act", choices=sorted(ACTIVATIONS), default=None,
                        help="float activation before quantization (default: the model's own; SiLU for YAMLs)")
    parser.add_argument("--float", dest="float_model", action="store_true",
                        help="train the float model without quantization (e.g. the ReLU net of the IF baseline)")
    add_output_arguments(parser, "runs/casc", "train")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers")
    parser.add_argument("--resume", action="store_true", help="resume from PROJECT/NAME/weights/last.pt (or OUT's)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip Ultralytics' plots")
    parser.add_argument("--calibrate", type=int, default=0,
                        help="quantizing a float .pt: start each threshold at its 99.9th activation percentile on "
                             "this many training images and learn it (default 0: fixed threshold 1, which fine-tuned "
                             "better on the bundled benchmark at L=4: see weights/training/)")
    parser.add_argument("--time", type=float, default=None,
                        help="train for this many hours instead of --epochs (Ultralytics fits the schedule to it)")
    qat = parser.add_argument_group("--qat: the CPU-sized QAT recipe (calibrated start, see detector/train/yolo_qat.py)")
    qat.add_argument("--qat", action="store_true", help="fine-tune with the QAT recipe instead of Ultralytics' trainer "
                     "(--data may then also be 'bundled', coco:DIR or voc:DIR)")
    add_qat_arguments(qat)
    qat.add_argument("--iterations", type=int, default=1000, help="optimizer steps (a budget, not epochs)")
    qat.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine schedule)")
    qat.add_argument("--theta-lr", type=float, default=None, help="learning rate of the thresholds (default: --lr)")
    qat.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the float model")
    qat.add_argument("--no-ema", dest="ema", action="store_false", help="save the raw weights, not their EMA")
    qat.add_argument("--save-every", type=int, default=100, help="checkpoint every N iterations")
    qat.add_argument("--float-model", default=None,
                     help="the float model to distil from (default: --model when it is float)")


def warn_if_silu(act: str) -> None:
    """A SiLU QANN converts with CASC, but the IF baseline (and so casc eval's IF curve) needs a ReLU model."""
    if act == "silu":
        print("casc train yolo: warning: quantizing a SiLU model; the CASC SNN is exact to its QANN, but the IF "
              "baseline converts ReLU networks only (train the float model with --act relu to compare with it)",
              file=sys.stderr)


def train_qat(args: argparse.Namespace) -> Path:
    """``casc train yolo --qat``: quantize a float checkpoint (or take a QANN) and fine-tune it."""
    from ..calibrate import quantize
    from ..data import open_dataset
    from ..models.yolo import calibration_inputs
    from ..weights import resolve
    from .quantize import calibration_images
    from .yolo_qat import finetune

    entry = resolve(args.model)
    model, meta = load_checkpoint(entry.path, sha256=entry.sha256)
    imgsz = args.imgsz or meta["imgsz"]
    teacher = None
    if not meta["quantized"]:
        teacher = model
        warn_if_silu(meta["act"])
        rgb = calibration_images(args.data, args.calibrate_images, classes=_class_list(meta["names"]))
        model = quantize(model, args.levels, calibration_inputs(rgb, imgsz), theta=args.theta_init,
                         first_levels=args.first_levels)
    if args.distill:
        if args.float_model:
            teacher, _ = load_checkpoint(resolve(args.float_model).path)
        if teacher is None:
            raise ValueError("--distill needs the float model: --float-model NAME|PATH (or a float --model)")
    dataset = open_dataset(args.data, "train", classes=_class_list(meta["names"]))  # VOC: read with the model's names
    out = output_folder(args)
    save = lambda m, path: save_qann(m, path, names=meta["names"], imgsz=imgsz, act=meta["act"])  # noqa: E731
    summary = finetune(model, dataset, imgsz, out, save, iterations=args.iterations, batch=args.batch, lr=args.lr,
                       theta=args.theta, theta_lr=args.theta_lr, teacher=teacher if args.distill else None,
                       distill=args.distill, ema=args.ema, max_minutes=args.max_minutes, save_every=args.save_every,
                       log=lambda message: print(message, flush=True))
    summary.pop("model")
    (out / "summary.json").write_text(json.dumps({**summary, "command": vars(args)}, indent=1, default=str))
    return Path(summary["checkpoint"])


def _class_list(names) -> list[str]:
    """A checkpoint's names (a dict by id or a list) as the list ``open_dataset(classes=)`` takes."""
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


def train_from_args(args: argparse.Namespace) -> Path:
    """Run ``casc train yolo``; returns the written checkpoint (``best.pt``, or ``last.pt`` with ``--qat``)."""
    if args.qat:
        return train_qat(args)
    check_inputs(args.model, args.data)
    return train(model=args.model, data=args.data, levels=args.levels, epochs=args.epochs, imgsz=args.imgsz or 640,
                 batch=args.batch, device=args.device, act=args.act, float_model=args.float_model, out=output_folder(args),
                 workers=args.workers, resume=args.resume, plots=getattr(args, "plots", True), calibrate=args.calibrate,
                 **({"time": args.time} if args.time else {}))
