"""BatchNorm folding before conversion.

A BatchNorm in eval mode is a per-channel affine map. Folded into the conv / linear layer right
before it, it costs nothing; a BatchNorm with no such layer (after an add, at the input) becomes
a ``ChannelAffine`` synapse whose shift is gated like any bias. Both are exact, so folding is only
done where the order is known for certain: consecutive children of an ``nn.Sequential``, and
(conv, bn) attribute pairs that a model adapter declares for a module class whose forward is
known (``ModuleRules.bn_pairs``, see ``detector.rules``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .rules import ModuleRules, resolve
from .synapses import ChannelAffine

BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, FrozenBatchNorm2d)
FOLD_TARGETS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def batchnorm_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``bn(x) == x * scale + shift`` per channel, in eval mode."""
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.track_running_stats:
        raise ValueError(f"{type(bn).__name__} without running statistics normalises by batch statistics "
                         "and cannot be converted; train it with track_running_stats=True")
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    scale = weight / torch.sqrt(bn.running_var + bn.eps)
    return scale.detach(), (bias - bn.running_mean * scale).detach()


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into the conv / linear ``layer`` that feeds it (in place)."""
    scale, shift = batchnorm_scale_shift(bn)
    out_features = layer.weight.shape[0]
    if scale.numel() != out_features:
        raise ValueError(f"cannot fold {type(bn).__name__}({scale.numel()}) into a layer with {out_features} outputs")
    layer.weight.mul_(scale.view(-1, *([1] * (layer.weight.dim() - 1))).to(layer.weight.dtype))
    old_bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
    layer.bias = nn.Parameter((old_bias * scale + shift).to(layer.weight.dtype))


def _known_pairs(model: nn.Module, rules: ModuleRules):
    for parent in model.modules():
        names = list(parent._modules)
        if type(parent).forward is nn.Sequential.forward:
            for a, b in zip(names, names[1:]):
                yield parent, a, b
        for module_type, pairs in rules.bn_pairs.items():
            if isinstance(parent, module_type):
                yield from ((parent, conv, bn) for conv, bn in pairs)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, rules: ModuleRules | None = None) -> tuple[int, int]:
    """Fold every BatchNorm of ``model`` (in place); returns (folded, kept as ChannelAffine). ``rules``: the
    model adapter's ``ModuleRules`` (their ``bn_pairs``), merged with the built-in and registered ones."""
    folded = 0
    for parent, conv_name, bn_name in list(_known_pairs(model, resolve(rules))):
        conv, bn = parent._modules.get(conv_name), parent._modules.get(bn_name)
        if isinstance(conv, FOLD_TARGETS) and isinstance(bn, BATCHNORMS):
            fold_into(conv, bn)
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    kept = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BATCHNORMS):
                setattr(parent, name, ChannelAffine(*batchnorm_scale_shift(child)))
                kept += 1
    return folded, kept
