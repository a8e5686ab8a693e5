"""The YOLO QAT recipe inside Ultralytics' ``DetectionTrainer``: ``casc train yolo`` (without ``--qat``).

Ultralytics' own data pipeline (mosaic and the other augmentations), schedules, EMA, AMP, validation, plots,
resume and multi-GPU DDP apply; the recipe adds, on top of a start checkpoint that ``detector.train.yolo``
writes (the calibrated QANN: MSE thresholds, BatchNorm re-estimated, first-layer levels; or a QANN whose
training continues):

- the thresholds in their own optimizer group without weight decay, learnt (``theta="learn"``) or kept as
  buffers at their calibrated values (``"freeze"``), with their own learning rate (``theta_lr``);
- optional distillation from the float model (``distill`` > 0): the raw head outputs regress onto the float
  model's, as in ``detector.train.yolo_qat``;
- ``last.casc.pt`` in this project's safe format at every save, beside Ultralytics' ``last.pt``.

The trainer class is defined at module level: for several GPUs Ultralytics pickles the trainer's class *by
reference* into a generated entry file (``ultralytics.utils.dist.generate_ddp_file``), which each worker
imports. The recipe's settings travel inside the start checkpoint's model (``model.yaml["casc"]["qat"]``),
which every worker loads, and which every checkpoint of the run carries, so ``resume`` finds them too.
Importing this module imports Ultralytics (offline: ``prepare_ultralytics``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.yolo import (build_qann, export_checkpoint, load_checkpoint, model_act, prepare_ultralytics,
                           quantize_model)
from ..quant import ClipQuan, qann_levels
from ..weights import resolve
from .recipe import THETA_GROUP, keep_thresholds_positive, split_thresholds
from .yolo_qat import distillation_loss, frozen_teacher

prepare_ultralytics()
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402


def qat_settings(model_or_cfg) -> dict:
    """The recipe's settings a start model carries: ``theta``, ``theta_lr``, ``distill``, ``teacher``."""
    cfg = model_or_cfg if isinstance(model_or_cfg, dict) else getattr(model_or_cfg, "yaml", {})
    return dict(cfg.get("casc", {}).get("qat") or {})


class DistilledLoss:
    """Ultralytics' detection loss plus ``weight`` x the distance of the raw head outputs to the float model's,
    reported as a fourth loss item (``distill``). A plain object, not a module: the teacher stays out of the
    trained model's parameters, its DDP wrapper and its checkpoints."""

    def __init__(self, loss, teacher: torch.nn.Module, weight: float):
        self.loss, self.teacher, self.weight = loss, teacher, weight

    def __call__(self, preds, batch: dict):
        loss, items = self.loss(preds, batch)
        with torch.no_grad():
            target = self.teacher(batch["img"])
        extra = distillation_loss(self.loss.parse_output(preds), target)
        scaled = (self.weight * extra * batch["img"].shape[0]).reshape(1)  # the loss terms are x batch size
        return torch.cat([loss, scaled]), {**items, "distill": extra.detach()}


class QATDetectionTrainer(DetectionTrainer):
    """``DetectionTrainer`` for a QANN (or a float model) from a start checkpoint of ``casc train yolo``."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        casc = dict(cfg.get("casc", {})) if isinstance(cfg, dict) else {}
        if weights is None or "qat" not in casc:
            raise ValueError("QATDetectionTrainer starts from a checkpoint written by casc train yolo (start.pt), "
                             f"not {self.args.model}")
        model = build_qann({k: v for k, v in cfg.items() if k != "casc"}, nc=self.data["nc"], quantize=False,
                           verbose=verbose)
        quantized = qann_levels(weights) is not None
        if quantized:  # the sites only; load() brings each one's threshold and levels
            model = quantize_model(model, qann_levels(weights), casc.get("act") or model_act(weights))
        model = self.set_model_names_for_load(model)
        model.load(weights)  # Ultralytics' partial load: a new class count keeps all but the class convolutions
        model.yaml["casc"] = dict(casc, **model.yaml["casc"])  # levels and act as built, and the recipe's settings
        if quantized:
            # before DDP and the EMA wrap the model: a threshold turned into a parameter later would be missed
            split_thresholds(model, casc["qat"].get("theta", "learn"))
        return model

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' groups, less the thresholds, which get their own: no weight decay, ``theta_lr`` (default:
        the weights' learning rate, as Ultralytics chose it). Under Adam a 0-d parameter's step is about the
        learning rate whatever its gradient's scale (``detector.train.yolo_qat``)."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        thresholds = [m.threshold_param for m in unwrap_model(model).modules() if isinstance(m, ClipQuan)
                      and m.learnable]
        if not thresholds:
            return optimizer
        ids = {id(p) for p in thresholds}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        weights = next(g for g in optimizer.param_groups if g.get("param_group") == "weight")
        theta_lr = qat_settings(unwrap_model(model)).get("theta_lr") or weights["lr"]
        optimizer.add_param_group({**{k: v for k, v in weights.items() if k != "params"}, "params": thresholds,
                                   "lr": theta_lr, "weight_decay": 0.0, "param_group": THETA_GROUP})
        keep_thresholds_positive(optimizer)
        return optimizer

    def _setup_train(self):
        super()._setup_train()
        model = unwrap_model(self.model)
        settings = qat_settings(model)
        if settings.get("distill"):  # installed after the EMA copy was taken: validation keeps the plain loss
            entry = resolve(settings["teacher"])
            teacher, _ = load_checkpoint(entry.path, sha256=entry.sha256)
            model.criterion = DistilledLoss(model.init_criterion(), frozen_teacher(teacher).to(self.device),
                                            float(settings["distill"]))

    def save_model(self):
        saved = super().save_model()
        export_checkpoint(self.ema.ema, Path(self.wdir) / "last.casc.pt", names=self.data["names"],
                          imgsz=int(self.args.imgsz))
        return saved
