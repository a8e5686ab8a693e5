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
from .neurons import CIFNeuron, IFNeuron, Neuron, QCFSNeuron
from .pooling import MAX_POOLS, LIPool
from .quant import QUANTIZABLE_ACTIVATIONS, ClipQuan, calibrate_thresholds, qann_levels, unshare_modules
from .rules import ModuleRules, resolve
from .runtime import SpikingNetwork
from .state import SimulationState
from .synapses import SYNAPTIC_LAYERS, Synapse

NEURONS: dict[str, Callable[..., Neuron]] = {"cif": CIFNeuron, "qcfs": QCFSNeuron, "if": IFNeuron}
# Neurons that fire at most one positive spike per step and run wake=T steps with no sleep (rate coding).
RATE_CODED = ("if", "qcfs")


def _activation_types(neuron: str | Callable) -> tuple[type[nn.Module], ...]:
    return (nn.ReLU, ClipQuan) if neuron == "if" else (ClipQuan,)


def _module_problems(model: nn.Module, neuron, analog: set[str], rules: ModuleRules) -> list[tuple[str, str, str]]:
    spiking = _activation_types(neuron)
    allowed_leaves = (*spiking, *SYNAPTIC_LAYERS, *BATCHNORMS, *MAX_POOLS, *rules.linear)
    problems = []

    def visit(module: nn.Module, path: str) -> None:
        if path in analog:
            return
        kind = type(module).__name__
        if isinstance(module, rules.nonlinear):
            problems.append((path, kind, "non-linear module that cannot spike"))
        elif isinstance(module, QUANTIZABLE_ACTIVATIONS) and not isinstance(module, spiking):
            why = ("activation not quantized: run to_qann(model, levels) first" if neuron != "if"
                   else "the IF baseline converts ReLU networks only")
            problems.append((path, kind, why))
        elif neuron in RATE_CODED and isinstance(module, ClipQuan) and module.signed:
            who = "the IF baseline's" if neuron == "if" else "QCFS"
            problems.append((path, kind, f"signed quantizer: {who} neurons fire positive spikes only "
                                         "(a spiking-FPN model needs negative spikes: convert it with CASC)"))
        elif isinstance(module, MAX_POOLS) and getattr(module, "return_indices", False):
            problems.append((path, kind, "max-pool returning indices is not supported"))
        elif not module._modules and not isinstance(module, allowed_leaves) and _has_tensors(module):
            # A parameter-free leaf is judged by the functions it applies (the run's flow trace);
            # one with weights does arithmetic we cannot see.
            problems.append((path, kind, "unknown module with weights: not known to be linear "
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
    problems = _module_problems(model, neuron, analog, resolve(rules))
    if problems:
        raise UnsupportedModuleError(
            problems, "Modules that must stay analog can be kept as analog islands: convert(..., analog=[paths]).")
    if not any(isinstance(m, _activation_types(neuron)) for m in model.modules()):
        raise ValueError("the model has no activation to turn into spiking neurons "
                         "(expected ClipQuan modules from to_qann; ReLU for the IF baseline)")


def _rewrite(module: nn.Module, path: str, neuron, thresholds, analog: set[str], done: dict[int, nn.Module],
             wake_levels: int | None):
    for name, child in list(module.named_children()):
        child_path = f"{path}.{name}" if path else name
        if id(child) in done:  # a shared module stays shared: one object, several call sites
            setattr(module, name, done[id(child)])
            continue
        if child_path in analog:
            new = AnalogIsland(child)
        elif isinstance(child, (ClipQuan, nn.ReLU)) and isinstance(child, _activation_types(neuron)):
            new = _make_neuron(child, child_path, neuron, thresholds, wake_levels)
        elif isinstance(child, MAX_POOLS):
            new = LIPool(child)
        elif isinstance(child, SYNAPTIC_LAYERS):
            new = Synapse(child)
        else:
            _rewrite(child, child_path, neuron, thresholds, analog, done, wake_levels)
            continue
        new.site_name = child_path
        done[id(child)] = new
        setattr(module, name, new)


def _make_neuron(activation: nn.Module, path: str, neuron, thresholds, wake_levels: int | None) -> Neuron:
    if neuron == "if":
        sites = [thresholds[path]] if path in thresholds else []
        n = 2
        while f"{path}#{n}" in thresholds:
            sites.append(thresholds[f"{path}#{n}"])
            n += 1
        if not sites:
            raise ValueError(f"no IF threshold for activation {path}: pass calibration data or thresholds")
        return IFNeuron(sites)
    if neuron == "cif":
        return CIFNeuron.for_quantizer(activation, wake_levels)
    if neuron == "qcfs":
        return QCFSNeuron(activation.threshold)
    # An ablation factory (threshold -> neuron) sees the threshold one spike is worth.
    made = neuron(activation.threshold * wake_levels / activation.levels)
    if isinstance(made, CIFNeuron):
        reference = CIFNeuron.for_quantizer(activation, wake_levels)
        made.precharge, made.levels, made.wake_levels = reference.precharge, reference.levels, reference.wake_levels
        made.signed = reference.signed
    return made


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
    if isinstance(neuron, str) and neuron not in NEURONS:
        raise ValueError(f"unknown neuron {neuron!r}; choose from {sorted(NEURONS)} or pass a callable")
    analog = set(analog)
    validate(model, neuron, analog, rules)
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if neuron == "if":
        unshare_modules(net, (nn.ReLU, ClipQuan))
        if thresholds is None:
            if calibration is None:
                raise ValueError('convert(neuron="if") needs calibration batches or thresholds')
            thresholds = calibrate_thresholds(net, calibration, percentile)
    folded, kept = fold_batchnorm(net, rules)
    sim = SimulationState()
    _rewrite(net, "", neuron, thresholds or {}, analog, {}, qann_levels(model))
    return SpikingNetwork(net, sim, levels=qann_levels(model), neuron=neuron if isinstance(neuron, str) else "custom",
                          analog=sorted(analog), batchnorm=(folded, kept))
