"""What the converter must be told about module types whose ``forward`` it cannot see.

``ModuleRules`` lists them: ``linear`` (parameter-free modules whose output is linear in their inputs,
e.g. a concat), ``nonlinear`` (modules that compute a non-linear function and cannot spike: refused
unless kept analog) and ``bn_pairs`` (``{module type: ((conv, bn), ...)}``: that type's forward applies
attribute ``bn`` directly to the output of ``conv``, so the BatchNorm folds into the conv).

Each model adapter states its own rules and passes them where they are used
(``convert(..., rules=)``, ``validate(..., rules=)``, ``fold_batchnorm(..., rules=)``); ``resolve``
merges them with the built-in rules and with what a user declared for the whole process with
``register_linear_module`` / ``register_nonlinear_module`` / ``register_bn_pairs``. No module of
this library registers anything: converting a model never depends on which adapter was imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from torch import nn

BnPairs = Mapping[type[nn.Module], tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class ModuleRules:
    """Module types the converter is told about (see the module docstring); ``a | b`` merges two sets
    (``b``'s (conv, bn) pairs win for a type both name)."""

    linear: tuple[type[nn.Module], ...] = ()
    nonlinear: tuple[type[nn.Module], ...] = ()
    bn_pairs: BnPairs = field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "linear", tuple(self.linear))
        object.__setattr__(self, "nonlinear", tuple(self.nonlinear))
        pairs = {t: tuple((conv, bn) for conv, bn in p) for t, p in self.bn_pairs.items()}
        object.__setattr__(self, "bn_pairs", MappingProxyType(pairs))

    def __or__(self, other: "ModuleRules") -> "ModuleRules":
        return ModuleRules(linear=tuple(dict.fromkeys((*self.linear, *other.linear))),
                           nonlinear=tuple(dict.fromkeys((*self.nonlinear, *other.nonlinear))),
                           bn_pairs={**self.bn_pairs, **other.bn_pairs})


BUILTIN_RULES = ModuleRules(
    # Parameter-free leaf modules that are linear in their input: spikes pass through unchanged
    # (they commute with summing over time).
    linear=(
        nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Unflatten,
        nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
        nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    ),
    # Modules that compute something non-linear and cannot spike: refused unless kept analog.
    nonlinear=(
        nn.Sigmoid, nn.Tanh, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softmax, nn.LogSoftmax,
        nn.Softmin, nn.MultiheadAttention, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.PReLU,
        nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
        nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
    ),
)

_registered = ModuleRules()


def registered_rules() -> ModuleRules:
    """What ``register_*`` declared in this process (empty unless a user called them)."""
    return _registered


def _register(rules: ModuleRules) -> None:
    global _registered
    _registered = _registered | rules


def register_linear_module(module_type: type[nn.Module]) -> None:
    """Declare, for every conversion in this process, a parameter-free module whose output is linear in
    its inputs (e.g. a concat). Prefer ``convert(..., rules=ModuleRules(linear=(...)))``."""
    _register(ModuleRules(linear=(module_type,)))


def register_nonlinear_module(module_type: type[nn.Module]) -> None:
    """Declare, for every conversion in this process, a module that computes a non-linear function of its
    input (e.g. an attention block). Prefer ``convert(..., rules=ModuleRules(nonlinear=(...)))``."""
    _register(ModuleRules(nonlinear=(module_type,)))


def register_bn_pairs(module_type: type[nn.Module], pairs: list[tuple[str, str]]) -> None:
    """Declare, for every conversion in this process, that ``module_type.forward`` applies attribute ``bn``
    directly to the output of ``conv`` (and uses that conv output nowhere else), for each ``(conv, bn)``."""
    _register(ModuleRules(bn_pairs={module_type: tuple(pairs)}))


def resolve(rules: ModuleRules | None = None) -> ModuleRules:
    """The rules a conversion uses: the built-in ones, the registered ones, then ``rules``."""
    return BUILTIN_RULES | _registered | (rules or ModuleRules())
