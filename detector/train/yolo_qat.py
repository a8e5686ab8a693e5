"""Quantization-aware fine-tuning of a YOLO QANN, sized for a CPU: the loop behind ``casc train yolo --qat``.

Its parameter groups, distillation and frozen teacher are also the recipe's inside Ultralytics' trainer
(``detector.train.yolo_trainer``), the path for GPUs, Ultralytics' augmentation and DDP; this loop is the
CPU path that produced the bundled QANNs (``weights/manifest.json``).

Start from a calibrated QANN (``casc quantize``: MSE thresholds, rounding, BatchNorm re-estimated),
then fine-tune with Ultralytics' detection loss:

- AdamW with a cosine schedule and warm-up, a fixed number of iterations (a budget, not epochs);
- thresholds theta in their own parameter group without weight decay, learnt (``theta="learn"``) or
  frozen at their calibrated values (``theta="freeze"``); under Adam the step of a 0-d parameter is
  about the learning rate whatever its gradient's scale, so the group has its own learning rate;
- an exponential moving average of the weights (Ultralytics' ``ModelEMA``), which is what is saved;
- optional distillation from the float model: the QANN's raw head outputs regress onto the float
  model's (box distributions by MSE, class logits by BCE on the float sigmoid), weight ``distill``;
- horizontal flips as the only augmentation (the bundled scenes are synthetic and already varied).

Checkpoints (our safe format) are written every ``save_every`` iterations and at the end, so a time
cap or an interruption loses at most that much work.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.yolo import letterbox, prepare_ultralytics
from .recipe import THETA_GROUP, keep_thresholds_positive, split_thresholds


def _batch(dataset, indices: list[int], imgsz: int, flip: random.Random) -> dict:
    """Ultralytics' training batch (``img``, ``cls``, ``bboxes`` normalised xywh, ``batch_idx``)."""
    images, cls, boxes, owner = [], [], [], []
    for n, i in enumerate(indices):
        rgb = dataset.load_image(i)
        target = dataset.target(i)
        h, w = rgb.shape[:2]
        xyxy = np.asarray(target["boxes"], np.float32).reshape(-1, 4)
        if flip.random() < 0.5:
            rgb = rgb[:, ::-1]
            xyxy = np.stack([w - xyxy[:, 2], xyxy[:, 1], w - xyxy[:, 0], xyxy[:, 3]], 1)
        images.append(np.ascontiguousarray(rgb[..., ::-1]))  # letterbox takes BGR
        scale = min(imgsz / h, imgsz / w)
        pad_x, pad_y = (imgsz - w * scale) / 2, (imgsz - h * scale) / 2
        px = xyxy * scale + np.array([pad_x, pad_y, pad_x, pad_y], np.float32)
        xywh = np.stack([(px[:, 0] + px[:, 2]) / 2, (px[:, 1] + px[:, 3]) / 2, px[:, 2] - px[:, 0],
                         px[:, 3] - px[:, 1]], 1) / imgsz
        boxes.append(xywh)
        cls.append(np.asarray(target["labels"], np.float32).reshape(-1, 1))
        owner.append(np.full(len(xywh), n, np.float32))
    img, _ = letterbox(images, imgsz)
    return {"img": img, "cls": torch.from_numpy(np.concatenate(cls)), "bboxes": torch.from_numpy(np.concatenate(boxes)),
            "batch_idx": torch.from_numpy(np.concatenate(owner))}


def distillation_loss(student: dict, teacher: dict) -> torch.Tensor:
    """Distance of the QANN's raw head outputs to the float model's: box distributions by MSE, class logits by
    BCE on the float model's sigmoid."""
    return F.mse_loss(student["boxes"], teacher["boxes"]) + F.binary_cross_entropy_with_logits(
        student["scores"], teacher["scores"].sigmoid())


def frozen_teacher(float_model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the float model for distillation: no gradients, BatchNorm in eval, its Detect head in the
    training form, whose raw outputs ``distillation_loss`` compares."""
    teacher = copy.deepcopy(float_model).float().eval()
    teacher.model[-1].train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def parameter_groups(model: torch.nn.Module, lr: float, weight_decay: float, theta: str, theta_lr: float) -> list[dict]:
    """Weights with decay; biases and norms without; thresholds in their own group (or frozen)."""
    thresholds, others = split_thresholds(model, theta)
    groups = [{"params": [p for p in others if p.ndim > 1], "weight_decay": weight_decay, "lr": lr},
              {"params": [p for p in others if p.ndim <= 1], "weight_decay": 0.0, "lr": lr}]
    if thresholds:
        groups.append({"params": thresholds, "weight_decay": 0.0, "lr": theta_lr, "param_group": THETA_GROUP})
    return groups


def finetune(qann, dataset, imgsz: int, out: Path, save, iterations: int = 1000, batch: int = 16,
             lr: float = 1e-3, weight_decay: float = 5e-4, theta: str = "learn", theta_lr: float | None = None,
             teacher=None, distill: float = 0.0, ema: bool = True, warmup: int = 50, max_minutes: float | None = None,
             save_every: int = 100, seed: int = 0, log=None) -> dict:
    """Fine-tune ``qann`` (an Ultralytics DetectionModel with ClipQuan activations) in place.

    ``save(model, path)`` writes a checkpoint; ``out`` is the folder (``last.pt`` is the latest).
    ``teacher``: the float model for distillation (weight ``distill``). Returns a summary dict:
    iterations done, seconds, the last smoothed loss, and the checkpoint path."""
    prepare_ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.torch_utils import ModelEMA

    if distill and teacher is None:
        raise ValueError("distillation needs the float model (teacher)")
    torch.manual_seed(seed)
    order = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    qann.args = get_cfg()  # the loss reads its box / cls / dfl gains from here
    qann.criterion = None
    qann.train()
    for p in qann.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameter_groups(qann, lr, weight_decay, theta, theta_lr or lr), lr=lr)
    keep_thresholds_positive(optimizer)
    base = [g["lr"] for g in optimizer.param_groups]
    averaged = ModelEMA(qann) if ema else None
    if teacher is not None:
        teacher = frozen_teacher(teacher)
    indices: list[int] = []
    started = time.monotonic()
    smoothed, done = None, 0
    path = out / "last.pt"
    bar = tqdm(range(iterations), desc="QAT", file=sys.stderr, dynamic_ncols=True, disable=None)
    for it in bar:
        # A time cap shortens the schedule instead of cutting it: the cosine follows whichever of
        # iterations and time is further along, so a capped run still anneals.
        progress_made = it / iterations
        if max_minutes is not None:
            progress_made = max(progress_made, (time.monotonic() - started) / (max_minutes * 60))
        if progress_made >= 1:
            print(f"stopping after {it} iterations: --max-minutes {max_minutes} reached", file=sys.stderr)
            break
        scale = min(1.0, (it + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress_made))
        for group, lr0 in zip(optimizer.param_groups, base):
            group["lr"] = lr0 * scale
        if len(indices) < batch:
            more = list(range(len(dataset)))
            order.shuffle(more)
            indices += more
        chosen, indices = indices[:batch], indices[batch:]
        data = _batch(dataset, chosen, imgsz, order)
        preds = qann(data["img"])
        loss, _ = qann.loss(data, preds)
        loss = loss.sum() / batch
        if distill:
            with torch.no_grad():
                target = teacher(data["img"])
            loss = loss + distill * distillation_loss(preds, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(qann.parameters(), 10.0)
        optimizer.step()
        if averaged is not None:
            averaged.update(qann)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(f"loss is {value} at iteration {it}: lower --lr")
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        done = it + 1
        bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if done % save_every == 0:
            save((averaged.ema if averaged else qann), path)
            if log is not None:
                log(f"iteration {done} loss {smoothed:.4f} {time.monotonic() - started:.0f} s")
    final = averaged.ema if averaged else qann
    save(final, path)
    return {"iterations": done, "seconds": time.monotonic() - started, "loss": smoothed, "checkpoint": str(path),
            "model": final}
