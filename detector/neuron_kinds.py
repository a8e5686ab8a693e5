"""The neuron kinds a conversion makes, looked up by name: what the converter, the detectors and the schedule
need to know of each, in one place.

A ``NeuronKind`` states what it converts (a QANN's ``ClipQuan`` sites, or a float model's ReLUs with thresholds
calibrated on its activations), whether it is rate-coded (``wake = T`` steps, no sleep, so no fixed point to
settle on), whether it may fire negative spikes, and the factory that makes the neuron of one activation.
``NEURON_KINDS`` is a plain dict; ``neuron_kind`` also turns an ablation's factory (``threshold -> Neuron``) into
a kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch import nn

from .neurons import CIFNeuron, IFNeuron, Neuron, QCFSNeuron
from .quant import ClipQuan

__all__ = ["NeuronKind", "NEURON_KINDS", "neuron_kind"]  # the public API (apps import only these)

# (the activation module, its path, the calibrated thresholds by call site, the QANN's wake levels) -> its neuron
NeuronFactory = Callable[[nn.Module, str, dict[str, float], "int | None"], Neuron]


@dataclass(frozen=True)
class NeuronKind:
    name: str
    label: str  # how error messages name its neurons: "CIF", "QCFS", "IF"
    converts_float: bool  # True: a float model's ReLUs at calibrated thresholds; False: a QANN's ClipQuans
    rate_coded: bool  # wake = T steps and no sleep: the readout is a spike rate, with no fixed point
    signed: bool  # may fire negative spikes (what a signed quantizer, the spiking FPN, needs)
    make: NeuronFactory

    def activations(self) -> tuple[type[nn.Module], ...]:
        """The activation modules that become its neurons."""
        return (nn.ReLU, ClipQuan) if self.converts_float else (ClipQuan,)


def _if_neuron(activation: nn.Module, path: str, thresholds: dict[str, float], wake_levels: int | None) -> Neuron:
    # a module called at several sites has one calibrated threshold per call: path, path#2, path#3, ...
    sites = [thresholds[path]] if path in thresholds else []
    n = 2
    while f"{path}#{n}" in thresholds:
        sites.append(thresholds[f"{path}#{n}"])
        n += 1
    if not sites:
        raise ValueError(f"no IF threshold for activation {path}: pass calibration data or thresholds")
    return IFNeuron(sites)


def _cif_neuron(activation: nn.Module, path: str, thresholds: dict[str, float], wake_levels: int | None) -> Neuron:
    return CIFNeuron.for_quantizer(activation, wake_levels)


def _qcfs_neuron(activation: nn.Module, path: str, thresholds: dict[str, float], wake_levels: int | None) -> Neuron:
    return QCFSNeuron(activation.threshold)


NEURON_KINDS: dict[str, NeuronKind] = {
    "cif": NeuronKind("cif", "CIF", converts_float=False, rate_coded=False, signed=True, make=_cif_neuron),
    "qcfs": NeuronKind("qcfs", "QCFS", converts_float=False, rate_coded=True, signed=False, make=_qcfs_neuron),
    "if": NeuronKind("if", "IF", converts_float=True, rate_coded=True, signed=False, make=_if_neuron),
}


def neuron_kind(neuron: str | Callable[[float], Neuron]) -> NeuronKind:
    """The kind called ``neuron``, or the kind of an ablation's factory ``threshold -> Neuron`` (it converts a QANN
    and runs CASC's schedule); a ValueError lists the known names."""
    if callable(neuron):
        return NeuronKind("custom", "custom", converts_float=False, rate_coded=False, signed=True,
                          make=partial(_ablation, neuron))
    try:
        return NEURON_KINDS[neuron]
    except (KeyError, TypeError):
        raise ValueError(f"unknown neuron {neuron!r}: neuron must be one of {', '.join(NEURON_KINDS)} or a callable "
                         "threshold -> Neuron") from None


def _ablation(factory: Callable[[float], Neuron], activation: nn.Module, path: str, thresholds: dict[str, float],
              wake_levels: int | None) -> Neuron:
    # An ablation factory (threshold -> neuron) sees the threshold one spike is worth.
    made = factory(activation.threshold * wake_levels / activation.levels)
    if isinstance(made, CIFNeuron):
        reference = CIFNeuron.for_quantizer(activation, wake_levels)
        made.precharge, made.levels, made.wake_levels = reference.precharge, reference.levels, reference.wake_levels
        made.signed = reference.signed
    return made
