"""Options that both families' QAT recipes share, under the same names (``casc train yolo|rcnn``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..calibrate import THETA_METHODS
from ..predict import run_folder
from ..quant import ClipQuan

THETA_MODES = ("learn", "freeze")
THETA_GROUP = "theta"  # the optimizer group of the thresholds (the key Ultralytics names its groups with)
MIN_THRESHOLD = 1e-4  # a threshold stays > 0: the clip divides by it, a CIF neuron refuses <= 0 (detector/neurons.py)


def add_output_arguments(parser: argparse.ArgumentParser, project: str, name: str) -> None:
    """Where a training run writes, as Ultralytics names it: ``--project``/``--name`` (numbered when taken),
    ``--exist-ok``; ``--out`` names the folder itself."""
    parser.add_argument("--project", default=project, help="parent folder of the run folders")
    parser.add_argument("--name", default=name, help="run folder name (numbered when taken: NAME2, NAME3, ...)")
    parser.add_argument("--exist-ok", action="store_true", help="write into PROJECT/NAME even if it exists")
    parser.add_argument("--out", default=None, help="the output folder itself, used as it is (None: PROJECT/NAME)")


def output_folder(args: argparse.Namespace) -> Path:
    """The run's folder: ``--out``, else ``PROJECT/NAME`` (numbered unless ``--exist-ok`` or resuming)."""
    if args.out:
        return Path(args.out)
    return run_folder(args.project, args.name, args.exist_ok or bool(getattr(args, "resume", None)))


def add_qat_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--theta``, ``--calibrate-images``, ``--first-levels``, ``--theta-init``, ``--max-minutes``."""
    parser.add_argument("--theta", choices=THETA_MODES, default="learn",
                        help="thresholds during fine-tuning: learnt in their own group (no weight decay) or frozen "
                             "at their calibrated values")
    parser.add_argument("--theta-init", choices=THETA_METHODS, default="mse",
                        help="calibrated threshold of a float start: quantization-MSE optimum or a percentile")
    parser.add_argument("--calibrate-images", type=int, default=256,
                        help="training images for the post-training calibration of a float start (no labels used)")
    parser.add_argument("--first-levels", type=int, default=None,
                        help="levels of the first activation (e.g. 8; the network then runs that many wake steps)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this many minutes")


def split_thresholds(model: torch.nn.Module, theta: str) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(thresholds, the other trainable parameters) of a QANN. ``theta="learn"`` makes every ClipQuan threshold a
    parameter (its own optimizer group, without weight decay); ``"freeze"`` keeps them as buffers at their
    calibrated values, so no optimizer (nor Ultralytics' trainer, which re-enables frozen parameters) moves them."""
    if theta not in THETA_MODES:
        raise ValueError(f"theta must be one of {THETA_MODES}, got {theta!r}")
    quantizers = [m for m in model.modules() if isinstance(m, ClipQuan)]
    for quantizer in quantizers:
        quantizer.set_learnable(theta == "learn")
    thresholds = [q.threshold_param for q in quantizers if q.learnable]
    ids = {id(p) for p in thresholds}
    return thresholds, [p for p in model.parameters() if p.requires_grad and id(p) not in ids]


def keep_thresholds_positive(optimizer: torch.optim.Optimizer) -> None:
    """After every step, raise the thresholds of the ``THETA_GROUP`` group that fell below ``MIN_THRESHOLD``: an
    Adam step moves a 0-d parameter by about the learning rate, enough to carry a small calibrated threshold (of a
    randomly initialised network, say) below zero."""
    def clamp(optimizer, *_):
        with torch.no_grad():
            for group in optimizer.param_groups:
                if group.get("param_group") == THETA_GROUP:
                    for p in group["params"]:
                        p.clamp_(min=MIN_THRESHOLD)

    optimizer.register_step_post_hook(clamp)
