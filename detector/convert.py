"""QANN -> spiking network: a fixed lifecycle of validate, copy, fold, (calibrate,) rewrite.

Rewrite rules (``docs/method.md`` §2): ClipQuan -> CIF neuron (one state per call site), or a QCFS neuron
(``neuron="qcfs"``: the usual conversion of the same QANN); ReLU -> IF neuron for the baseline;
max-pool -> LIPool; conv / linear / unfoldable BatchNorm -> Synapse (bias
gated by the runtime); modules named in ``analog=[...]`` -> AnalogIsland. Everything else must be
linear in its input (pass-through): ``validate`` checks the module tree, and the first stack of
every run traces the functions applied to the signal (``flow.SpikeFlowTrace``).
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import UnsupportedModuleError
from .fuse import BATCHNORMS, fold_batchnorm
from .islands import AnalogIsland
from .neuron_kinds import NeuronKind, neuron_kind
from .neurons import Neuron
from .pooling import MAX_POOLS, LIPool
from .quant import QUANTIZABLE_ACTIVATIONS, ClipQuan, calibrate_thresholds, qann_levels, unshare_modules
from .rules import ModuleRules, resolve
from .runtime import SpikingNetwork
from .state import SimulationState
from .synapses import SYNAPTIC_LAYERS, Synapse

def _module_problems(model: nn.Module, kind: NeuronKind, analog: set[str],
                     rules: ModuleRules) -> list[tuple[str, str, str]]:
    spiking = kind.activations()
    allowed_leaves = (*spiking, *SYNAPTIC_LAYERS, *BATCHNORMS, *MAX_POOLS, *rules.linear)
    problems = []

    def visit(module: nn.Module, path: str) -> None:
        if path in analog:
            return
        module_type = type(module).__name__
        if isinstance(module, rules.nonlinear):
            problems.append((path, module_type, "non-linear module that cannot spike"))
        elif isinstance(module, QUANTIZABLE_ACTIVATIONS) and not isinstance(module, spiking):
            why = ("the IF baseline converts ReLU networks only" if kind.converts_float
                   else "activation not quantized: run to_qann(model, levels) first")
            problems.append((path, module_type, why))
        elif not kind.signed and isinstance(module, ClipQuan) and module.signed:
            problems.append((path, module_type, f"signed quantizer: {kind.label} neurons fire positive spikes only "
                                                "(a spiking-FPN model needs negative spikes: convert it with CASC)"))
        elif isinstance(module, MAX_POOLS) and getattr(module, "return_indices", False):
            problems.append((path, module_type, "max-pool returning indices is not supported"))
        elif not module._modules and not isinstance(module, allowed_leaves) and _has_tensors(module):
            # A parameter-free leaf is judged by the functions it applies (the run's flow trace);
            # one with weights does arithmetic we cannot see.
            problems.append((path, module_type, "unknown module with weights: not known to be linear "
                                         "(declare it in ModuleRules(linear=...) if it is, or keep it analog)"))
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return problems


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def validate(model: nn.Module, neuron: str | Callable = "cif", analog: Iterable[str] = (),
             rules: ModuleRules | None = None) -> None:
    """Raise a clear error if ``model`` cannot be converted (every offending module listed). ``rules``: the
    model adapter's ``ModuleRules``, merged with the built-in ones (``detector.rules.resolve``)."""
    analog = set(analog)
    paths = {p for p, _ in model.named_modules()}
    unknown = sorted(analog - paths)
    if unknown:
        raise ValueError(f"analog=[...] names modules that do not exist: {', '.join(unknown)}")
    kind = neuron_kind(neuron)
    problems = _module_problems(model, kind, analog, resolve(rules))
    if problems:
        raise UnsupportedModuleError(
            problems, "Modules that must stay analog can be kept as analog islands: convert(..., analog=[paths]).")
    if not any(isinstance(m, kind.activations()) for m in model.modules()):
        raise ValueError("the model has no activation to turn into spiking neurons "
                         "(expected ClipQuan modules from to_qann; ReLU for the IF baseline)")


def _rewrite(module: nn.Module, path: str, kind: NeuronKind, thresholds, analog: set[str], done: dict[int, nn.Module],
             wake_levels: int | None):
    for name, child in list(module.named_children()):
        child_path = f"{path}.{name}" if path else name
        if id(child) in done:  # a shared module stays shared: one object, several call sites
            setattr(module, name, done[id(child)])
            continue
        if child_path in analog:
            new = AnalogIsland(child)
        elif isinstance(child, kind.activations()):
            new = kind.make(child, child_path, thresholds, wake_levels)
        elif isinstance(child, MAX_POOLS):
            new = LIPool(child)
        elif isinstance(child, SYNAPTIC_LAYERS):
            new = Synapse(child)
        else:
            _rewrite(child, child_path, kind, thresholds, analog, done, wake_levels)
            continue
        new.site_name = child_path
        done[id(child)] = new
        setattr(module, name, new)


def convert(
    model: nn.Module,
    neuron: str | Callable[[float], Neuron] = "cif",
    thresholds: dict[str, float] | None = None,
    calibration: Iterable[torch.Tensor] | None = None,
    percentile: float = 99.9,
    analog: Iterable[str] = (),
    rules: ModuleRules | None = None,
) -> SpikingNetwork:
    """Convert a QANN (``neuron="cif"``: CASC; ``"qcfs"``: QCFS neurons, run with ``wake=T, sleep=0``) or a float
    ReLU ANN (``neuron="if"``) to a SpikingNetwork.

    The input model is not modified: the network works on a deep copy in eval mode, with
    BatchNorm folded. ``neuron`` may also be a callable ``threshold -> Neuron`` (ablations).
    For ``"if"`` give per-site ``thresholds`` or ``calibration`` batches (the ``percentile`` of
    each site's activations becomes its threshold). ``analog`` lists module paths kept as
    analog islands; every other non-linear module is refused with an error naming it. ``rules``: what the
    model adapter declares about its module types (``ModuleRules``: linear, non-linear, (conv, bn) pairs),
    merged with the built-in rules; nothing else changes what a conversion accepts or folds.
    """
    kind = neuron_kind(neuron)
    analog = set(analog)
    validate(model, neuron, analog, rules)
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if kind.converts_float:
        unshare_modules(net, kind.activations())
        if thresholds is None:
            if calibration is None:
                raise ValueError(f'convert(neuron="{kind.name}") needs calibration batches or thresholds')
            thresholds = calibrate_thresholds(net, calibration, percentile)
    folded, kept = fold_batchnorm(net, rules)
    sim = SimulationState()
    _rewrite(net, "", kind, thresholds or {}, analog, {}, qann_levels(model))
    return SpikingNetwork(net, sim, levels=qann_levels(model), neuron=kind.name,
                          analog=sorted(analog), batchnorm=(folded, kept))
