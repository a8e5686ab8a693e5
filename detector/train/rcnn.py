"""``casc train rcnn``: train a float Faster R-CNN or fine-tune its QANN (torchvision reference style).

SGD with warm-up and a multi-step schedule, as torchvision's detection reference scripts. ``--model`` is a
bundled name, a checkpoint or an architecture (a fresh model). A QANN start is either a ``casc quantize``
checkpoint or bundled QANN (calibrated thresholds, BatchNorm re-estimated: the recommended start; training
continues from it) or a float checkpoint with ``--levels``, quantized here with calibrated thresholds (its
frozen BatchNorms cannot be re-estimated). ``--theta learn|freeze`` and the other shared QAT options have the
same names as in ``casc train yolo``. ``--spiking-fpn`` adds the signed FPN-output quantizers
(``add_spiking_fpn``) to a QANN start before fine-tuning.

Under ``torchrun --nproc_per_node N -m casc train rcnn ...`` each process trains on its share of every
batch (``DistributedSampler``, ``DistributedDataParallel``; gloo on the CPU, NCCL on GPUs): ``--batch`` is
per process, so the global batch is N x ``--batch`` and the default learning rate is 0.02 x global batch / 16
(torchvision's 0.02 for 8 GPUs x 2 images). Process 0 alone writes checkpoints and shows progress.
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

from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from ..calibrate import quantize
from ..models.rcnn import (ARCHS, _unwrap_state_dict, add_spiking_fpn, build_fasterrcnn, calibration_inputs,
                           has_spiking_fpn, load_checkpoint, model_from_state_dict, save_checkpoint,
                           to_qann_fasterrcnn)
from ..quant import qann_levels
from ..weights import resolve
from .distributed import Process, start_process
from .recipe import (THETA_GROUP, add_output_arguments, add_qat_arguments, keep_thresholds_positive, output_folder,
                     split_thresholds)


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
    parser.add_argument("--model", "--weights", dest="model", default=None,
                        help="where to start: a bundled name (a bundled QANN continues its training), a checkpoint "
                             "(torchvision float weights, a reference checkpoint, or one of ours) or an architecture "
                             f"({', '.join(ARCHS)}: random init) (None: --arch)")
    parser.add_argument("--arch", default="resnet50_fpn", choices=ARCHS,
                        help="the architecture of a fresh model, or of a --model state dict that does not record "
                             "it (ResNets are recognised)")
    parser.add_argument("--sha256", default=None, help="expected sha256 of --model")
    parser.add_argument("--data", required=True, help="coco:DIR | voc:DIR | COCO or VOC directory | data.yaml | bundled")
    parser.add_argument("--split", default="train", help="the split to train on")
    parser.add_argument("--names", default=None,
                        help="a VOC dataset's (or a names-less data.yaml's) class names, comma-separated or a file "
                             "with one per line (None: the 20 VOC classes)")
    parser.add_argument("--levels", type=int, default=4,
                        help="quantization levels L of a float start (a QANN start keeps its own)")
    parser.add_argument("--float", action="store_true", help="train the float model (no quantization)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2, help="images per process (torchrun: the global batch is "
                        "--nproc_per_node x --batch)")
    parser.add_argument("--lr", type=float, default=None,
                        help="None: 0.02 x global batch / 16 (torchvision reference: 0.02 for 8 GPUs x 2 images)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=1000)
    parser.add_argument("--lr-steps", type=int, nargs="*", default=None, help="epochs where lr *= lr-gamma "
                        "(default: 2/3 and 11/12 of --epochs)")
    parser.add_argument("--lr-gamma", type=float, default=0.1)
    parser.add_argument("--min-size", type=int, default=None,
                        help="the input's shorter side (None: the checkpoint's, else torchvision's 800)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="the input's longer side at most (None: the checkpoint's, else 1333)")
    parser.add_argument("--representation-size", type=int, default=None, help="box head width (slim head)")
    parser.add_argument("--fpn-channels", type=int, default=256, help="ResNet FPN width (128: slim)")
    parser.add_argument("--trainable-layers", type=int, default=3)
    parser.add_argument("--train-bn", action="store_true",
                        help="trainable BatchNorm in the backbone (training from scratch; under torchrun on GPUs "
                             "synchronised across processes); a QANN fine-tuned from such weights freezes the "
                             "learnt statistics again")
    parser.add_argument("--spiking-fpn", action="store_true",
                        help="quantize the FPN's signed signals where they enter its output convs, the RPN head "
                             "and the box head (signed quantizers, calibrated on --calibrate-images images), so "
                             "those layers receive spikes")
    add_output_arguments(parser, "runs", "rcnn")
    parser.add_argument("--resume", default=None, help="continue from this checkpoint (model, optimizer, scheduler, epoch)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: each process's GPU)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_qat_arguments(parser.add_argument_group("QAT (the same options as casc train yolo)"))


def parameter_groups(model: torch.nn.Module, theta: str, weight_decay: float) -> list[dict]:
    """Trainable weights with decay; the quantizers' thresholds learnt without decay (``theta="learn"``) or frozen."""
    thresholds, weights = split_thresholds(model, theta)
    groups = [{"params": weights, "weight_decay": weight_decay, "param_group": "weight"}]
    if thresholds:
        groups.append({"params": thresholds, "weight_decay": 0.0, "param_group": THETA_GROUP})
    return groups


def train_sampler(dataset, process: Process, seed: int) -> DistributedSampler:
    """Every process's share of one seeded permutation per epoch (``set_epoch``). A job of one draws the same
    permutation, so N processes x ``b`` images see the same images per step as one process x N ``b``."""
    return DistributedSampler(dataset, num_replicas=process.world_size, rank=process.rank, shuffle=True, seed=seed)


def train_loader(dataset, batch: int, process: Process, seed: int, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_TorchvisionTargets(dataset), batch_size=batch,
                                       sampler=train_sampler(dataset, process, seed), num_workers=workers,
                                       collate_fn=_collate, drop_last=False, persistent_workers=False)


def distribute(model: torch.nn.Module, process: Process, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``, wrapped in ``DistributedDataParallel`` under torchrun: gradients are averaged over
    the processes, and process 0's weights and buffers are broadcast first, so every process starts equal."""
    model.to(device)
    if not process.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, device: torch.device,
                    process: Process, scaler: torch.amp.GradScaler | None = None, warmup=None,
                    deadline: float | None = None, progress=None) -> tuple[float, bool]:
    """One pass over ``loader`` (this process's share); returns (mean loss, stopped at ``deadline``). AMP when
    ``scaler`` is given (CUDA). Every process stops after the same batch: the time check is agreed on."""
    model.train()
    running, batches, stopped = 0.0, 0, False
    for images, targets in loader:
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device_type="cuda", enabled=scaler is not None):
            losses = model(images, targets)
            loss = sum(losses.values())
        if not math.isfinite(float(loss.detach())):
            raise ValueError(f"loss is {float(loss.detach())} at batch {batches}: lower --lr")
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
        batches += 1
        if progress is not None:
            progress.set_postfix(loss=f"{running / batches:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            progress.update(1)
        if deadline is not None and process.any(time.monotonic() > deadline):
            stopped = True
            break
    return running / max(batches, 1), stopped


def _start_model(args: argparse.Namespace, ds, num_classes: int, levels: int | None, process: Process):
    """(model, arch, levels) to train: ``--resume``'s, ``--model``'s checkpoint or a fresh ``--model``/``--arch``."""
    spec = args.model or args.arch
    sizes = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v}
    build = dict(trainable_layers=args.trainable_layers)
    if spec in ARCHS:
        if args.train_bn:
            build["frozen_bn"] = False
        if args.representation_size:
            build["representation_size"] = args.representation_size
        model = build_fasterrcnn(spec, num_classes, **{"min_size": 800, "max_size": 1333, **sizes},
                                 fpn_channels=args.fpn_channels, **build)
        if args.train_bn and process.distributed and process.device(args.device).type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBatchNorm runs on GPUs only
        return (to_qann_fasterrcnn(model, levels, inplace=True) if levels is not None else model), spec, levels
    entry = resolve(spec)
    if entry.family != "rcnn":
        raise ValueError(f"--model {spec} is a {entry.family} model; casc train rcnn trains Faster R-CNN")
    state, meta = _unwrap_state_dict(load_checkpoint(entry.path, args.sha256 or entry.sha256))
    arch = meta.get("arch") or (args.arch if args.model else None)
    model = model_from_state_dict(state, dict(meta, **sizes), arch=arch, levels=None, **build)
    predictor = model.roi_heads.box_predictor
    if predictor.cls_score.out_features != num_classes:  # new label set: a fresh predictor
        model.roi_heads.box_predictor = tv_frcnn.FastRCNNPredictor(predictor.cls_score.in_features, num_classes)
    if qann_levels(model) is not None:
        levels = qann_levels(model)
    elif levels is not None:  # a float start: calibrated thresholds (casc quantize also re-estimates BN)
        # every process calibrates on the same images; DistributedDataParallel then broadcasts process 0's result
        images = [ds.load_image(i) for i in range(min(args.calibrate_images, len(ds)))]
        model = quantize(model, levels, calibration_inputs(images), theta=args.theta_init,
                         first_levels=args.first_levels, inplace=True)
    return model, meta.get("arch") or arch or args.arch, levels


def train_from_args(args: argparse.Namespace) -> Path:
    """Fine-tune a Faster R-CNN QANN (or the float model with ``--float``); returns the checkpoint path."""
    process = start_process(args.device)
    try:
        return _train(args, process)
    finally:
        process.close()


def _model_to_train(args: argparse.Namespace, ds, process: Process) -> tuple[torch.nn.Module, dict, dict | None]:
    """The model to train (resumed, or started by ``_start_model``), its checkpoint metadata, and the resumed
    checkpoint (None when starting)."""
    classes = list(ds.classes)
    num_classes = len(classes) + 1
    levels = None if args.float else args.levels
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        state, meta = _unwrap_state_dict(resume)
        arch = meta.get("arch", args.arch)
        levels = meta.get("levels")
        model = model_from_state_dict(state, meta, arch=arch, levels=levels, trainable_layers=args.trainable_layers)
        if meta.get("num_classes") != num_classes:
            raise ValueError(f"--resume checkpoint has {meta.get('num_classes')} classes, the dataset {num_classes}")
    else:
        model, arch, levels = _start_model(args, ds, num_classes, levels, process)
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
    return model, meta, resume


def _warmup_schedule(optimizer, iterations: int, epoch_length: int):
    """The first epoch's linear warm-up from lr / 1000 (torchvision's reference recipe), or None."""
    iters = min(iterations, epoch_length - 1)
    if iters <= 0:
        return None
    factor = 1.0 / 1000
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: factor + (1 - factor) * min(it, iters) / iters)


def _train(args: argparse.Namespace, process: Process) -> Path:
    from tqdm import tqdm

    from ..data import parse_names

    torch.manual_seed(args.seed)
    device = process.device(args.device)
    ds = _open_dataset(args.data, args.split, parse_names(args.names))
    if len(ds) == 0:
        raise ValueError(f"dataset {args.data} ({args.split}) is empty")
    out = process.from_main(lambda: output_folder(args))
    if process.is_main:
        out.mkdir(parents=True, exist_ok=True)
    model, meta, resume = _model_to_train(args, ds, process)
    global_batch = args.batch * process.world_size
    lr = args.lr if args.lr is not None else 0.02 * global_batch / 16
    optimizer = torch.optim.SGD(parameter_groups(model, args.theta, args.weight_decay), lr=lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    keep_thresholds_positive(optimizer)
    trained = distribute(model, process, device)
    torch.manual_seed(args.seed + process.rank)  # each process its own RPN / RoI sampling draws
    loader = train_loader(ds, args.batch, process, args.seed, args.workers)
    steps = args.lr_steps if args.lr_steps else sorted({max(1, round(args.epochs * 2 / 3)),
                                                        max(1, round(args.epochs * 11 / 12))})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=args.lr_gamma)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None  # AMP on CUDA only
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start = int(resume["epoch"]) + 1
    path = out / "last.pt"
    if start >= args.epochs:
        if process.is_main:
            print(f"already trained {start} epochs (--epochs {args.epochs}); nothing to do", file=sys.stderr)
        return Path(args.resume)
    if process.is_main and process.distributed:
        print(f"torchrun: {process.world_size} processes x {args.batch} images = global batch {global_batch}, "
              f"lr {lr:g}", file=sys.stderr)

    started = time.monotonic()
    deadline = None if args.max_minutes is None else started + args.max_minutes * 60
    for epoch in range(start, args.epochs):
        loader.sampler.set_epoch(epoch)
        warmup = _warmup_schedule(optimizer, args.warmup_iters, len(loader)) if epoch == 0 else None
        with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr, dynamic_ncols=True,
                  disable=not process.is_main) as bar:
            loss, stopped = train_one_epoch(trained, loader, optimizer, device, process, scaler, warmup, deadline, bar)
        if stopped and process.is_main:  # a CPU epoch can outlast the cap: save now
            print(f"stopping in epoch {epoch + 1}: --max-minutes {args.max_minutes} reached", file=sys.stderr)
        if warmup is not None:  # leave the base lr for the multi-step schedule
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"]
        scheduler.step()
        if process.is_main:
            model.eval()
            save_checkpoint(path, model, meta, epoch=epoch, optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                            loss=loss, world_size=process.world_size, global_batch=global_batch)
        process.barrier()  # the others wait for the checkpoint (a resume right after reads it)
        if stopped:
            break
    return path
