"""Seeded random QANNs with the building blocks of detectors, for exactness tests and benchmarks.

A net is a chain of blocks on a feature map: conv (+BN) + ClipQuan, residual add, channel
split -> branch -> concat, nearest upsample, max-pool (SPPF- and stem-style), avg-pool and a
BatchNorm after an add (which cannot be folded). It returns a tuple (dense readout map, linear
readout) so that structured outputs are exercised too.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from .quant import ClipQuan, SignedClipQuan


def _randomise_batchnorm(bn: nn.BatchNorm2d, rng: torch.Generator) -> nn.BatchNorm2d:
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=rng) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=rng) * 1.5 + 0.3)
        bn.weight.copy_(torch.rand(c, generator=rng) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=rng) * 0.2)
    return bn


class ConvUnit(nn.Module):
    """conv -> (BN) -> ClipQuan: the unit Ultralytics calls Conv."""

    def __init__(self, c_in, c_out, levels, rng, pick: random.Random, stride=1):
        super().__init__()
        k = pick.choice([1, 3])
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=pick.random() < 0.5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=rng) * (1.6 / (c_in * k * k) ** 0.5))
            if self.conv.bias is not None:
                self.conv.bias.copy_(torch.randn(c_out, generator=rng) * 0.3)
        self.bn = _randomise_batchnorm(nn.BatchNorm2d(c_out), rng) if pick.random() < 0.6 else nn.Identity()
        self.act = ClipQuan(levels, threshold=pick.choice([1.0, 1.0, 0.5, 1.7]))

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c, levels, rng, pick, post_bn: bool):
        super().__init__()
        self.body = nn.Sequential(ConvUnit(c, c, levels, rng, pick), ConvUnit(c, c, levels, rng, pick))
        self.post = _randomise_batchnorm(nn.BatchNorm2d(c), rng) if post_bn else nn.Identity()

    def forward(self, x):
        return self.post(x + self.body(x))


class SplitConcat(nn.Module):
    """C2f-style: split channels, transform one half, concatenate (also the untouched half)."""

    def __init__(self, c, levels, rng, pick):
        super().__init__()
        self.half = c // 2
        self.branch = ConvUnit(c - self.half, c - self.half, levels, rng, pick)
        self.merge = ConvUnit(c + (c - self.half), c, levels, rng, pick)

    def forward(self, x):
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return self.merge(torch.cat([a, b, self.branch(b)], dim=1))


class UpDown(nn.Module):
    """Nearest upsample, a conv unit at the higher resolution, then back down by a pool."""

    def __init__(self, c, levels, rng, pick):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.unit = ConvUnit(c, c, levels, rng, pick)
        self.down = pick.choice([nn.MaxPool2d(2, 2), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2, 2)])

    def forward(self, x):
        return self.down(self.unit(self.up(x)))


class RandomQANN(nn.Module):
    def __init__(self, blocks: nn.ModuleList, c: int, classes: int, rng):
        super().__init__()
        self.blocks = blocks
        self.readout_map = nn.Conv2d(c, classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.readout_vec = nn.Linear(c, classes)
        with torch.no_grad():
            for layer in (self.readout_map, self.readout_vec):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=rng) * 0.5)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.readout_map(x), self.readout_vec(self.pool(x).flatten(1))


def random_qann(seed: int, levels: int = 4, depth: int = 8, channels: int = 6, in_channels: int = 3,
                classes: int = 3, rounding: str = "round", first_levels: int | None = None,
                signed: float = 0.0) -> RandomQANN:
    """A random QANN with about ``depth`` ClipQuan layers on the longest path (eval mode).

    ``rounding``: every ClipQuan's mode; ``first_levels``: the first layer's level count (the
    per-layer levels case: the network then runs ``max`` of both wake steps); ``signed``: the fraction
    of quantizers made ``SignedClipQuan`` (drawn apart, so the rest of the net is the same as without)."""
    pick = random.Random(seed)
    rng = torch.Generator().manual_seed(seed)
    blocks = nn.ModuleList([ConvUnit(in_channels, channels, levels, rng, pick)])
    layers = 1
    while layers < depth:
        kind = pick.choice(["conv", "residual", "split", "updown", "sppf", "avg"])
        if kind == "conv":
            blocks.append(ConvUnit(channels, channels, levels, rng, pick)); layers += 1
        elif kind == "residual" and layers + 2 <= depth:
            blocks.append(Residual(channels, levels, rng, pick, post_bn=pick.random() < 0.4)); layers += 2
        elif kind == "split" and layers + 2 <= depth:
            blocks.append(SplitConcat(channels, levels, rng, pick)); layers += 2
        elif kind == "updown":
            blocks.append(UpDown(channels, levels, rng, pick)); layers += 1
        elif kind == "sppf":
            blocks.append(nn.Sequential(nn.MaxPool2d(5, 1, 2), ConvUnit(channels, channels, levels, rng, pick)))
            layers += 1
        elif kind == "avg":
            blocks.append(nn.Sequential(nn.AvgPool2d(3, 1, 1), ConvUnit(channels, channels, levels, rng, pick)))
            layers += 1
    net = RandomQANN(blocks, channels, classes, rng).eval()
    for module in net.modules():
        if isinstance(module, ClipQuan):
            module.rounding = rounding
    if signed:
        flip = random.Random(seed + 1)
        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, ClipQuan) and flip.random() < signed:
                    setattr(parent, name, SignedClipQuan(child.levels, child.threshold, rounding=child.rounding))
    if first_levels is not None:
        blocks[0].act.levels = first_levels
    return net


@torch.no_grad()
def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread the BatchNorm statistics (``BatchNorm2d`` and torchvision's ``FrozenBatchNorm2d``) of a
    random-init model so that its activations cover the quantization levels, as trained ones do: for
    exactness tests and benchmarks without trained weights. In place; returns the model."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


@torch.no_grad()
def randomise_class_biases(layers, seed: int = 0, low: float = -2.0, high: float = 1.0) -> None:
    """Uniform biases in [low, high) for a random-init detector's class-score layers, so that it
    produces boxes to compare (exactness tests, benchmarks)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in layers:
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * (high - low) + low)
