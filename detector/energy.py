"""Counting spikes, synaptic operations and MACs, and the energy estimate built on them.

Conventions (DESIGN §4): a spike is an event whatever its sign, a burst of n spikes is n
events; a synaptic operation (SOP) is one input event reaching one target through a weight,
counted with the layer's real fan-out (borders and stride included); a layer whose input is
analog (the image, or an analog island's output) does dense MACs instead. Energy uses 45 nm
figures: 0.9 pJ per SOP and 4.6 pJ per MAC. Sleep steps are counted like any other step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

PJ_PER_SOP = 0.9
PJ_PER_MAC = 4.6


def layer_macs(layer: nn.Module, output: torch.Tensor) -> int:
    """MACs of one call for the whole batch, from its output shape (elementwise layers: one each)."""
    if isinstance(layer, nn.Linear):
        return output.numel() * layer.in_features
    if isinstance(layer, _ConvNd):
        fan_in = layer.in_channels // layer.groups
        for k in layer.kernel_size:
            fan_in *= k
        return output.numel() * fan_in
    return output.numel()


class MacCounter:
    """Context manager counting conv / linear MACs of every call inside ``module``."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.macs = 0
        self._hooks = []

    def _hook(self, layer, inputs, output):
        self.macs += layer_macs(layer, output)

    def __enter__(self):
        for m in self.module.modules():
            if isinstance(m, (nn.Linear, _ConvNd)):
                self._hooks.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []


@torch.no_grad()
def count_macs(model: nn.Module, *inputs) -> int:
    """MACs of one forward pass of ``model`` (conv and linear layers) for the given batch."""
    with MacCounter(model) as counter:
        model(*inputs)
    return counter.macs


class StatsRecorder:
    """Collects per-layer counts while the network runs; tensors stay on the device until `summary`."""

    def __init__(self, batch: int):
        self.batch = batch
        self.stack_index = -1
        self.spikes: dict[str, list[torch.Tensor]] = defaultdict(list)  # each [steps, batch]
        self.elements: dict[str, int] = defaultdict(int)  # neurons per sample, all call sites
        self.sops: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.analog_macs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.forward_macs: dict[str, int] = defaultdict(int)  # MACs per sample of one ANN forward
        self.island_macs: dict[str, int] = defaultdict(int)
        self.skipped_rows: list[torch.Tensor] = []
        self._skipped_macs: list[torch.Tensor] = []
        self.steps_recorded = 0
        # One [batch] row per time step, all layers (a layer called n times per step adds to one row).
        self.spikes_per_step: list[torch.Tensor] = []
        self.energy_pj_per_step: list[torch.Tensor] = []

    def begin_stack(self, steps: int) -> None:
        self.stack_index += 1
        self.steps_recorded += steps
        self._stack_spikes: torch.Tensor | float = 0.0  # [steps, batch] once something was recorded
        self._stack_energy: torch.Tensor | float = 0.0
        self._stack_steps = steps

    @property
    def first_stack(self) -> bool:
        return self.stack_index == 0

    def _per_sample(self, site: str, values: torch.Tensor) -> torch.Tensor:
        """[steps, rows] as [steps, batch]: rows must be the network's samples."""
        if values.shape[1] != self.batch:
            raise RuntimeError(f"{site}: {values.shape[1]} rows per step where the network input has {self.batch} "
                               "samples; a forward that mixes samples on the batch axis cannot be simulated")
        return values

    def record_spikes(self, site: str, counts: torch.Tensor, elements_per_row: int) -> None:
        counts = self._per_sample(site, counts)
        self.spikes[site].append(counts)
        self._stack_spikes = self._stack_spikes + counts
        if self.first_stack and len(self.spikes[site]) == 1:
            self.elements[site] += elements_per_row

    def record_synapse(self, site, macs_per_row, ops, analog_macs, skipped_rows) -> None:
        if self.first_stack:
            self.forward_macs[site] += macs_per_row
        if ops is not None:  # counts above 2**24 are not exact in float32
            ops = self._per_sample(site, ops).double()
            self.sops[site].append(ops)
            self._stack_energy = self._stack_energy + ops * PJ_PER_SOP
        if analog_macs is not None:
            analog_macs = self._per_sample(site, analog_macs).double()
            self.analog_macs[site].append(analog_macs)
            self._stack_energy = self._stack_energy + analog_macs * PJ_PER_MAC
        if not isinstance(skipped_rows, int):  # a tensor: this was a sleep stack
            self.skipped_rows.append(skipped_rows)
            self._skipped_macs.append(skipped_rows * macs_per_row)

    def record_island(self, site: str, macs: int, steps: int) -> None:
        """``macs``: everything the island computed in this stack (all steps, all rows)."""
        if self.first_stack:
            self.island_macs[site] += macs // (steps * self.batch)
        macs_per_row = torch.full((steps, self.batch), macs / (steps * self.batch), dtype=torch.float64)
        self.analog_macs[site].append(macs_per_row)
        self._stack_energy = self._stack_energy + macs_per_row * PJ_PER_MAC

    def end_stack(self) -> None:
        """One row per step of this stack (zeros for a step in which no layer computed anything)."""
        for acc, rows in ((self._stack_spikes, self.spikes_per_step), (self._stack_energy, self.energy_pj_per_step)):
            if not isinstance(acc, torch.Tensor):
                acc = torch.zeros(self._stack_steps, self.batch, dtype=torch.float64)
            rows.extend(acc.double().unbind(0))

    def summary(self, wake: int, steps_used: torch.Tensor) -> "RunStats":
        def total(parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
            return {k: torch.cat(v).double().sum(0).cpu() for k, v in parts.items()}

        # Multistep sleep stacks may run past the step at which the last sample fell silent; those
        # steps changed nothing and are not part of the run.
        steps = int(steps_used.max()) if steps_used.numel() else self.steps_recorded
        spikes_rows, energy_rows = self.spikes_per_step[:steps], self.energy_pj_per_step[:steps]
        spikes = total(self.spikes)
        sops = total(self.sops)
        analog = total(self.analog_macs)
        zeros = torch.zeros(self.batch, dtype=torch.float64)
        firing = {
            site: float(s.sum()) / (self.elements[site] * self.batch * steps)
            for site, s in spikes.items() if self.elements[site]
        }
        ann = sum(self.forward_macs.values()) + sum(self.island_macs.values())
        empty = torch.zeros(0, self.batch, dtype=torch.float64)
        return RunStats(
            wake=wake,
            steps=steps_used.cpu(),
            spikes=sum(spikes.values(), zeros),
            sops=sum(sops.values(), zeros),
            analog_macs=sum(analog.values(), zeros),
            ann_macs=ann,
            island_macs=sum(self.island_macs.values()),
            spikes_per_layer={k: v.sum().item() for k, v in spikes.items()},
            sops_per_layer={k: v.sum().item() for k, v in sops.items()},
            firing_rates=firing,
            spikes_per_step=torch.stack([r.cpu() for r in spikes_rows]) if spikes_rows else empty,
            energy_pj_per_step=torch.stack([r.cpu() for r in energy_rows]) if energy_rows else empty,
            skipped_rows=float(torch.stack(self.skipped_rows).double().sum()) if self.skipped_rows else 0.0,
            skipped_macs=float(torch.stack(self._skipped_macs).double().sum()) if self._skipped_macs else 0.0,
        )


@dataclass
class RunStats:
    """What one run cost. Per-sample tensors have one entry per input in the batch."""

    wake: int
    steps: torch.Tensor  # total steps T = wake + sleep used by each sample
    spikes: torch.Tensor  # spike events per sample, all steps
    sops: torch.Tensor  # synaptic operations per sample
    analog_macs: torch.Tensor  # dense MACs per sample (analog-input layers, islands)
    ann_macs: int  # MACs of one forward of the ANN, per sample
    island_macs: int  # the part of ann_macs inside analog islands
    spikes_per_layer: dict[str, float] = field(default_factory=dict)
    sops_per_layer: dict[str, float] = field(default_factory=dict)
    firing_rates: dict[str, float] = field(default_factory=dict)  # spikes per neuron per step
    spikes_per_step: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [steps, batch]
    energy_pj_per_step: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [steps, batch]
    skipped_rows: float = 0.0  # sleep-step layer evaluations skipped (no input event), in rows
    skipped_macs: float = 0.0  # the dense MACs those skips saved

    @property
    def sleep_steps(self) -> torch.Tensor:
        return self.steps - self.wake

    @property
    def energy_pj(self) -> torch.Tensor:
        """Estimated energy per sample: SOPs at 0.9 pJ plus dense MACs at 4.6 pJ."""
        return self.sops * PJ_PER_SOP + self.analog_macs * PJ_PER_MAC

    def energy_pj_until(self, t: int) -> torch.Tensor:
        """Energy per sample of the first ``t`` steps (all of them if the run was shorter)."""
        return self.energy_pj_per_step[:t].sum(0)

    @property
    def ann_energy_pj(self) -> float:
        return self.ann_macs * PJ_PER_MAC

    @property
    def energy_ratio(self) -> torch.Tensor:
        """SNN energy / ANN energy per sample (below 1: the spiking network is cheaper)."""
        return self.energy_pj / self.ann_energy_pj if self.ann_macs else torch.full_like(self.sops, float("nan"))

    @property
    def analog_mac_fraction(self) -> float:
        return self.island_macs / self.ann_macs if self.ann_macs else 0.0

    def as_dict(self) -> dict:
        """Plain numbers (means over the batch), for JSON and tables."""
        return {
            "wake": self.wake,
            "steps_mean": float(self.steps.double().mean()),
            "steps_max": int(self.steps.max()) if self.steps.numel() else 0,
            "spikes_per_sample": float(self.spikes.mean()),
            "sops_per_sample": float(self.sops.mean()),
            "analog_macs_per_sample": float(self.analog_macs.mean()),
            "ann_macs_per_sample": self.ann_macs,
            "energy_uj_per_sample": float(self.energy_pj.mean()) * 1e-6,
            "ann_energy_uj_per_sample": self.ann_energy_pj * 1e-6,
            "energy_ratio": float(self.energy_ratio.mean()),
            "analog_mac_fraction": self.analog_mac_fraction,
            "skipped_macs": self.skipped_macs,
        }
