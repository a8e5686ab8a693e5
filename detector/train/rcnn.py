"""``casc train rcnn``: train a float Faster R-CNN or fine-tune its QANN (torchvision reference style).

SGD with warm-up and a multi-step schedule, as torchvision's detection reference scripts. A QANN start
is either a ``casc quantize`` checkpoint (calibrated thresholds, BatchNorm re-estimated: the recommended
start) or a float checkpoint with ``--levels``, quantized here with calibrated thresholds (its frozen
BatchNorms cannot be re-estimated). ``--theta learn|freeze`` and the other shared QAT options have the
same names as in ``casc train yolo``. ``--spiking-fpn`` adds the signed FPN-output quantizers
(``add_spiking_fpn``) to a QANN start before fine-tuning.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import faster_rcnn as tv_frcnn

from ..calibrate import quantize
from ..models.rcnn import (ARCHS, _unwrap_state_dict, add_spiking_fpn, build_fasterrcnn, calibration_inputs,
                           has_spiking_fpn, load_checkpoint, model_from_state_dict, save_checkpoint,
                           to_qann_fasterrcnn)
from ..quant import ClipQuan, qann_levels
from .recipe import add_output_arguments, add_qat_arguments, output_folder


def _open_dataset(spec: str, split: str, classes: list[str] | None = None):
    path = Path(spec)
    if ":" not in spec.split("/")[0] and path.is_dir():  # a bare directory: detect the layout
        if (path / "annotations").is_dir():
            spec = f"coco:{spec}"
        elif (path / "Annotations").is_dir():
            spec = f"voc:{spec}"
    from ..data import open_dataset  # the project's readers

    return open_dataset(spec, split=split, classes=classes)


class _TorchvisionTargets(torch.utils.data.Dataset):
    """Dataset contract -> (CHW float tensor in [0, 1], torchvision target with 1-based labels)."""

    def __init__(self, ds, drop_difficult: bool = False):
        self.ds = ds
        self.drop_difficult = drop_difficult

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, target = self.ds[i]
        boxes = torch.as_tensor(np.asarray(target["boxes"], dtype=np.float32)).reshape(-1, 4)
        labels = torch.as_tensor(np.asarray(target["labels"], dtype=np.int64)).reshape(-1) + 1
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if self.drop_difficult and "difficult" in target:
            keep &= ~torch.as_tensor(np.asarray(target["difficult"], dtype=np.bool_)).reshape(-1)
        image = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / 255.0
        return image, {"boxes": boxes[keep], "labels": labels[keep]}


def _collate(batch):
    return tuple(zip(*batch))


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``casc train rcnn``."""
    parser.add_argument("--arch", default="resnet50_fpn", choices=ARCHS)
    parser.add_argument("--weights", default=None, help="start from this state-dict file (torchvision float "
                        "weights, a reference checkpoint, or one of ours); default: random init")
    parser.add_argument("--sha256", default=None, help="expected sha256 of --weights")
    parser.add_argument("--data", required=True, help="coco:DIR | voc:DIR | COCO or VOC directory | data.yaml | bundled")
    parser.add_argument("--split", default="train", help="the split to train on")
    parser.add_argument("--names", default=None,
                        help="a VOC dataset's (or a names-less data.yaml's) class names, comma-separated or a file "
                             "with one per line (None: the 20 VOC classes)")
    parser.add_argument("--levels", type=int, default=4, help="quantization levels L of the QANN")
    parser.add_argument("--float", action="store_true", help="train the float model (no quantization)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="default 0.02 * batch / 16 (torchvision reference)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=1000)
    parser.add_argument("--lr-steps", type=int, nargs="*", default=None, help="epochs where lr *= lr-gamma "
                        "(default: 2/3 and 11/12 of --epochs)")
    parser.add_argument("--lr-gamma", type=float, default=0.1)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--representation-size", type=int, default=None, help="box head width (slim head)")
    parser.add_argument("--fpn-channels", type=int, default=256, help="ResNet FPN width (128: slim)")
    parser.add_argument("--trainable-layers", type=int, default=3)
    parser.add_argument("--train-bn", action="store_true",
                        help="trainable BatchNorm in the backbone (training from scratch); a QANN fine-tuned "
                             "from such weights freezes the learnt statistics again")
    parser.add_argument("--spiking-fpn", action="store_true",
                        help="quantize the FPN's signed signals where they enter its output convs, the RPN head "
                             "and the box head (signed quantizers, calibrated on --calibrate-images images), so "
                             "those layers receive spikes")
    add_output_arguments(parser, "runs", "rcnn")
    parser.add_argument("--resume", default=None, help="continue from this checkpoint (model, optimizer, scheduler, epoch)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_qat_arguments(parser.add_argument_group("QAT (the same options as casc train yolo)"))


def parameter_groups(model: torch.nn.Module, theta: str, weight_decay: float) -> list[dict]:
    """Trainable weights with decay; the quantizers' thresholds learnt without decay (``theta="learn"``) or frozen."""
    quantizers = [m for m in model.modules() if isinstance(m, ClipQuan)]
    for quantizer in quantizers:
        quantizer.set_learnable(theta == "learn")
    thresholds = {id(q.threshold_param) for q in quantizers if q.learnable}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in thresholds]
    groups = [{"params": weights, "weight_decay": weight_decay}]
    if thresholds:
        groups.append({"params": [q.threshold_param for q in quantizers if q.learnable], "weight_decay": 0.0})
    return groups


def train_from_args(args: argparse.Namespace) -> Path:
    """Fine-tune a Faster R-CNN QANN (or the float model with ``--float``); returns the checkpoint path."""
    from tqdm import tqdm

    from ..data import parse_names

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    ds = _open_dataset(args.data, args.split, parse_names(args.names))
    if len(ds) == 0:
        raise ValueError(f"dataset {args.data} ({args.split}) is empty")
    classes = list(ds.classes)
    num_classes = len(classes) + 1
    levels = None if args.float else args.levels
    out = output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    arch = args.arch
    build = dict(min_size=args.min_size, max_size=args.max_size, trainable_layers=args.trainable_layers)
    if args.train_bn and not args.weights and not args.resume:
        build["frozen_bn"] = False
    if args.representation_size:
        build["representation_size"] = args.representation_size
    if args.fpn_channels != 256 and not args.weights and not args.resume:
        build["fpn_channels"] = args.fpn_channels

    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        state, meta = _unwrap_state_dict(resume)
        arch = meta.get("arch", arch)
        levels = meta.get("levels")
        model = model_from_state_dict(state, meta, arch=arch, levels=levels,
                                      trainable_layers=args.trainable_layers)
        if meta.get("num_classes") != num_classes:
            raise ValueError(f"--resume checkpoint has {meta.get('num_classes')} classes, the dataset {num_classes}")
    elif args.weights:
        state, meta = _unwrap_state_dict(load_checkpoint(args.weights, args.sha256))
        arch = meta.get("arch", arch)
        model = model_from_state_dict(state, meta, arch=arch, levels=None,
                                      **{k: v for k, v in build.items() if k != "representation_size"})
        model.transform.min_size, model.transform.max_size = (args.min_size,), args.max_size
        predictor = model.roi_heads.box_predictor
        if predictor.cls_score.out_features != num_classes:  # new label set: a fresh predictor
            model.roi_heads.box_predictor = tv_frcnn.FastRCNNPredictor(predictor.cls_score.in_features, num_classes)
        if qann_levels(model) is not None:
            levels = qann_levels(model)
        elif levels is not None:  # a float start: calibrated thresholds (casc quantize also re-estimates BN)
            images = [ds.load_image(i) for i in range(min(args.calibrate_images, len(ds)))]
            model = quantize(model, levels, calibration_inputs(images), theta=args.theta_init,
                             first_levels=args.first_levels, inplace=True)
    else:
        model = build_fasterrcnn(arch, num_classes, **build)
        if levels is not None:
            model = to_qann_fasterrcnn(model, levels, inplace=True)
    if args.spiking_fpn and not has_spiking_fpn(model):
        if levels is None:
            raise ValueError("--spiking-fpn quantizes a QANN's FPN outputs; it does not apply to --float")
        images = [ds.load_image(i) for i in range(min(args.calibrate_images, len(ds)))]
        model = add_spiking_fpn(model, calibration=calibration_inputs(images), inplace=True)
    rep = model.roi_heads.box_predictor.cls_score.in_features
    meta = {"arch": arch, "num_classes": num_classes, "levels": levels, "classes": classes,
            "spiking_fpn": has_spiking_fpn(model),
            "min_size": int(model.transform.min_size[0]), "max_size": int(model.transform.max_size),
            "representation_size": int(rep), "fpn_channels": int(model.backbone.out_channels), "data": str(args.data)}
    model.to(device)

    loader = torch.utils.data.DataLoader(
        _TorchvisionTargets(ds), batch_size=args.batch, shuffle=True, num_workers=args.workers,
        collate_fn=_collate, drop_last=False, persistent_workers=False)
    lr = args.lr if args.lr is not None else 0.02 * args.batch / 16
    optimizer = torch.optim.SGD(parameter_groups(model, args.theta, args.weight_decay), lr=lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    steps = args.lr_steps if args.lr_steps else sorted({max(1, round(args.epochs * 2 / 3)),
                                                        max(1, round(args.epochs * 11 / 12))})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=args.lr_gamma)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start = int(resume["epoch"]) + 1
    path = out / "last.pt"
    if start >= args.epochs:
        print(f"already trained {start} epochs (--epochs {args.epochs}); nothing to do", file=sys.stderr)
        return Path(args.resume)

    started = time.monotonic()
    deadline = None if args.max_minutes is None else started + args.max_minutes * 60
    for epoch in range(start, args.epochs):
        if deadline is not None and time.monotonic() > deadline:
            print(f"stopping before epoch {epoch + 1}: --max-minutes {args.max_minutes} reached", file=sys.stderr)
            break
        model.train()
        warmup = None
        if epoch == 0 and args.warmup_iters > 0:
            iters = min(args.warmup_iters, len(loader) - 1)
            if iters > 0:
                factor = 1.0 / 1000
                warmup = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda it: factor + (1 - factor) * min(it, iters) / iters)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr, dynamic_ncols=True)
        running = 0.0
        for i, (images, targets) in enumerate(bar):
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with torch.autocast(device_type="cuda", enabled=use_amp):
                losses = model(images, targets)
                loss = sum(losses.values())
            if not math.isfinite(float(loss.detach())):
                raise ValueError(f"loss is {float(loss.detach())} at epoch {epoch + 1}, batch {i}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if warmup is not None:
                warmup.step()
            running += float(loss.detach())
            bar.set_postfix(loss=f"{running / (i + 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if deadline is not None and time.monotonic() > deadline:  # a CPU epoch can outlast the cap: save now
                print(f"stopping in epoch {epoch + 1} after {i + 1} batches: --max-minutes {args.max_minutes} "
                      "reached", file=sys.stderr)
                break
        if warmup is not None:  # leave the base lr for the multi-step schedule
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"]
        scheduler.step()
        model.eval()
        save_checkpoint(path, model, meta, epoch=epoch, optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                         loss=running / max(i + 1, 1))
        if deadline is not None and time.monotonic() > deadline:
            break
    return path


