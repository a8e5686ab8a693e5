"""Post-training quantization: a float ReLU/SiLU model becomes a calibrated QANN, with no labels and no GPU.

``quantize(model, levels, batches)`` runs three steps, each of which matters for a detector (the
ablation in ``docs/results/qann-ablation.md`` has the numbers):

1. per activation, the threshold theta that minimises the mean squared error between the float
   activation and its clip-round staircase, on samples of its inputs (a percentile is an option);
   theta = 1, or a high percentile, leaves most of a deep detector's levels unused;
2. the ClipQuan swap itself (rounding by default; a first layer may get more levels);
3. BatchNorm statistics re-estimated on the quantized network, whose activations are not the float
   network's any more (cumulative averages over the calibration batches).

``batches`` are whatever ``model(batch)`` accepts: letterboxed image tensors for YOLO, lists of
image tensors for a torchvision detector.
"""

from __future__ import annotations

import copy
import sys
from collections import defaultdict
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from .quant import QUANTIZABLE_ACTIVATIONS, ClipQuan, ROUNDING, activation_references, to_qann, unshare_modules

THETA_METHODS = ("mse", "percentile")


def _forward_all(model: nn.Module, batches: Iterable, desc: str) -> int:
    """Run ``model`` on every batch (with a progress bar); returns how many batches there were."""
    count = 0
    for batch in tqdm(batches, desc=desc, file=sys.stderr, leave=False, disable=None):
        model(batch)
        count += 1
    return count


@torch.no_grad()
def activation_samples(model: nn.Module, batches: Iterable, types: tuple[type[nn.Module], ...] = QUANTIZABLE_ACTIVATIONS,
                       per_call: int = 4096, seed: int = 0, desc: str = "activations") -> dict[str, torch.Tensor]:
    """Per activation module path, a random sample of its *inputs* over ``batches`` (every call pooled).

    Run it on a model whose shared activations were unshared (``unshare_modules``) so that a path is one
    module of the quantized network. The model runs in eval mode."""
    samples: dict[str, list[torch.Tensor]] = defaultdict(list)
    generator = torch.Generator().manual_seed(seed)
    paths = {id(m): p for p, m in model.named_modules() if isinstance(m, types)}

    def hook(module, inputs):
        flat = inputs[0].detach().flatten().float().cpu()
        if flat.numel() > per_call:
            flat = flat[torch.randint(flat.numel(), (per_call,), generator=generator)]
        samples[paths[id(module)]].append(flat)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if id(m) in paths]
    was_training = model.training
    model.eval()
    try:
        count = _forward_all(model, batches, desc)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not count:
        raise ValueError("calibration needs at least one batch")
    return {path: torch.cat(parts) for path, parts in samples.items()}


def mse_threshold(z: torch.Tensor, activation: nn.Module, levels: int, rounding: str = "round",
                  candidates: int = 100, signed: bool = False) -> float:
    """The theta minimising ``mean((ClipQuan_theta(z) - activation(z))**2)`` over a grid of candidates
    (quantiles of the positive inputs from the median up, and the maximum). ``signed``: for a
    ``SignedClipQuan`` (clip range ``[-theta, theta]``, quantiles of ``|z|``; ``activation`` is then
    normally ``nn.Identity()``)."""
    target = activation(z)
    magnitudes = z.abs() if signed else z
    positive = magnitudes[magnitudes > 0]
    if positive.numel() == 0:  # a dead activation: any positive threshold gives zeros
        return 1.0
    grid = torch.quantile(positive[:1_000_000] if positive.numel() > 1_000_000 else positive,
                          torch.linspace(0.5, 1.0, candidates, dtype=z.dtype))
    grid = torch.unique(grid.clamp_min(1e-6))
    phi = ROUNDING[rounding]
    lower = -1.0 if signed else 0.0
    errors = []
    for chunk in grid.split(25):  # [c, n] at a time keeps memory bounded
        theta = chunk[:, None]
        stepped = torch.floor(torch.clamp(z[None] / theta, lower, 1) * levels + phi) / levels * theta
        errors.append(((stepped - target[None]) ** 2).mean(1))
    return float(grid[torch.cat(errors).argmin()])


def percentile_threshold(z: torch.Tensor, percentile: float) -> float:
    """The ``percentile`` of the activation's positive inputs (the usual conversion threshold)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    positive = z[z > 0].double()
    if positive.numel() == 0:
        return 1.0
    k = max(1, int(round(percentile / 100 * positive.numel())))
    return max(float(positive.kthvalue(k).values), 1e-6)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable, desc: str = "BatchNorm") -> int:
    """Recompute every BatchNorm's running statistics on ``batches`` (cumulative average; the rest of the
    model in eval mode). Frozen BatchNorms have no statistics to update and are left alone. Returns how
    many were re-estimated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    try:
        if not _forward_all(model, batches, desc):
            raise ValueError("BatchNorm re-estimation needs at least one batch")
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
        model.train(was_training)
    return len(norms)


def quantize(model: nn.Module, levels: int, batches: Iterable, theta: str = "mse", percentile: float = 99.9,
             rounding: str = "round", first_levels: int | None = None, site_levels: dict[str, int] | None = None,
             reestimate_bn: bool = True, inplace: bool = False) -> nn.Module:
    """A calibrated QANN of the float ``model`` (a copy unless ``inplace``): see the module docstring.

    ``levels``: L of every activation; ``first_levels``: L of the first activation (in registration
    order; the most sensitive layer of a detector), ``site_levels``: L per activation path (wins over
    both). ``theta``: ``"mse"`` (default) or ``"percentile"``. ``batches`` serve the thresholds and the
    BatchNorm re-estimation (``reestimate_bn=False`` skips it; so does a model without BatchNorms that
    keep running statistics).
    """
    if theta not in THETA_METHODS:
        raise ValueError(f"theta must be one of {THETA_METHODS}, got {theta!r}")
    if any(isinstance(m, ClipQuan) for m in model.modules()):
        raise ValueError("quantize takes a float model; this one already has ClipQuan activations")
    target = model if inplace else copy.deepcopy(model)
    unshare_modules(target, QUANTIZABLE_ACTIVATIONS)
    refs = activation_references(target, QUANTIZABLE_ACTIVATIONS)
    if not refs:
        raise ValueError("quantize: the model has no ReLU/SiLU/LeakyReLU/ReLU6 activation to quantize")
    chosen = dict(site_levels or {})
    if first_levels is not None:
        chosen.setdefault(refs[0][2], first_levels)
    batches = list(batches)
    samples = activation_samples(target, batches)
    floats = {path: getattr(parent, name) for parent, name, path in refs}
    thresholds = {}
    for path, z in samples.items():
        site_l = chosen.get(path, levels)
        thresholds[path] = (mse_threshold(z, floats[path], site_l, rounding) if theta == "mse"
                            else percentile_threshold(z, percentile))
    to_qann(target, levels, inplace=True, rounding=rounding, site_levels=chosen)
    for path, module in target.named_modules():
        if isinstance(module, ClipQuan) and path in thresholds:
            module.threshold_param.fill_(thresholds[path])
    if reestimate_bn:
        reestimate_batchnorm(target, batches)
    return target

