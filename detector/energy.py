"""Counting spikes, synaptic operations and MACs, and the energy estimate built on them.

Conventions (``docs/method.md`` §6): a spike is an event whatever its sign, a burst of n spikes is n
events; a synaptic operation (SOP) is one input event reaching one target through a weight,
counted with the layer's real fan-out (borders and stride included); a layer whose input is
analog (the image, or an analog island's output) does dense MACs instead. Energy uses 45 nm
figures: 0.9 pJ per SOP and 4.6 pJ per MAC. Sleep steps are counted like any other step.

The recorder also keeps, per step and sample, the most spikes any neuron emitted (binary-equivalent steps:
a step in which some neuron emits k spikes costs k sub-steps on hardware with binary spikes only), the
neurons with a non-zero output, and the SOPs and MACs, so that ``RunStats.workload_until(t)`` can price a
run on integer hardware against its QANN (``integer_energy``, ``memory_traffic``) and under NeuroBench's
definitions (``neurobench_metrics``).
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = [  # the public API (apps import only these)
    "PJ_PER_SOP", "PJ_PER_MAC", "RunStats", "count_macs", "integer_energy", "memory_traffic", "neurobench_metrics",
]

PJ_PER_SOP = 0.9
PJ_PER_MAC = 4.6

# 45 nm, 0.9 V: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014 (its energy table).
# 4.6 pJ per float MAC above is fp32 mult + fp32 add, 0.9 pJ per SOP an fp32 add.
HOROWITZ_45NM_PJ = {
    "int8_add": 0.03, "int32_add": 0.1, "int8_mult": 0.2, "int32_mult": 3.1,
    "fp32_add": 0.9, "fp32_mult": 3.7,
    "sram_8kb_read_64bit": 10.0,  # a 64-bit access to an 8 KB SRAM (32 KB: 20 pJ, 1 MB: 100 pJ)
}
WEIGHT_BITS = 8  # integer hardware: int8 weights, a 32-bit accumulator / membrane
STATE_BITS = 32
INPUT_BITS = 8  # an analog input (image pixels, an analog island's output) as int8


def activation_bits(levels: int) -> int:
    """Bits of an activation with ``levels`` non-zero levels (the values 0..L): ceil(log2(L + 1))."""
    return max(1, math.ceil(math.log2(levels + 1)))


def int_mult_pj(bits_a: int, bits_b: int) -> float:
    """An a-bit by b-bit integer multiply, scaled from Horowitz's 8 x 8-bit figure by a * b / 64: an array
    multiplier has a * b partial-product cells (his 32-bit multiply, 3.1 pJ, is 15.5 times the 8-bit one)."""
    return HOROWITZ_45NM_PJ["int8_mult"] * bits_a * bits_b / 64


def int_mac_pj(activation_bits_: int) -> float:
    """An activation (``activation_bits_``) times an int8 weight, accumulated in 32 bits."""
    return int_mult_pj(activation_bits_, WEIGHT_BITS) + HOROWITZ_45NM_PJ["int32_add"]


def sram_pj_per_bit() -> float:
    """Reads and writes alike, from the 8 KB SRAM figure (a local buffer): 10 pJ / 64 bits."""
    return HOROWITZ_45NM_PJ["sram_8kb_read_64bit"] / 64


def count_sum(counts: torch.Tensor, dim: int) -> torch.Tensor:
    """``counts.sum(dim)`` of spike or event counts, taken in float32 for a half-precision tensor (which holds
    integers exactly only up to 2048, bfloat16 up to 256); float32 and float64 sum in their own dtype."""
    return counts.sum(dim) if counts.dtype in (torch.float32, torch.float64) else counts.sum(dim, dtype=torch.float32)


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

    def __init__(self, batch: int, device: torch.device | str = "cpu"):
        self.batch = batch
        self.device = torch.device(device)  # the run's: a stack in which nothing counted gets zeros there
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
        self.peak_per_step: list[torch.Tensor] = []  # most spikes any one neuron emitted in the step
        self.active_per_step: list[torch.Tensor] = []  # neurons with a non-zero output
        self.sops_per_step: list[torch.Tensor] = []
        self.macs_per_step: list[torch.Tensor] = []  # dense MACs (analog inputs, islands)
        self._scratch: torch.Tensor | None = None
        self._scratch_views: dict[tuple, torch.Tensor] = {}
        self._events: dict[int, tuple] = {}  # see publish_events

    def begin_stack(self, steps: int) -> None:
        self.stack_index += 1
        self.steps_recorded += steps
        # What each call recorded in this stack, each [steps, batch]; summed once in end_stack, because a
        # handful of small tensor ops per layer call cost more than the counting itself.
        self._stack = {"spikes": [], "binary": [], "peak": [], "active": [], "sops": [], "macs": []}
        self._stack_steps = steps
        self._events = {}

    def publish_events(self, output: torch.Tensor, events: torch.Tensor) -> None:
        """A neuron's output and its events at each position, summed over channels (``[rows, positions]``, what
        ``Synapse.events_per_position`` would count): a synapse that receives this very tensor, unchanged since,
        counts its synaptic operations from them instead of passing over the tensor again. Kept for one stack; not
        for a tensor made under ``torch.inference_mode``, which keeps no version counter."""
        if output.is_inference():  # no version counter to tell an in-place change by: counted from the tensor
            return
        self._events[id(output)] = (weakref.ref(output), output._version, events)

    def events_of(self, x: torch.Tensor) -> torch.Tensor | None:
        """What ``publish_events`` published for ``x``; None for any other tensor, or once ``x`` was changed in
        place (its version counter moved), or when the published tensor is gone and its id reused."""
        entry = self._events.get(id(x))
        if entry is None or entry[0]() is not x or entry[1] != x._version:
            return None
        return entry[2]

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped and typed as ``like``, shared by every call (one allocation per run, not per layer);
        its views are kept by shape, since slicing one anew costs about as much as the counting it serves."""
        key = (like.shape, like.dtype, like.device)
        view = self._scratch_views.get(key)
        if view is None:
            if self._scratch is None or self._scratch.numel() < like.numel() or self._scratch.dtype != like.dtype \
                    or self._scratch.device != like.device:
                self._scratch = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
                self._scratch_views = {}
            view = self._scratch_views[key] = self._scratch[:like.numel()].view(like.shape)
        return view

    @property
    def first_stack(self) -> bool:
        return self.stack_index == 0

    def _per_sample(self, site: str, values: torch.Tensor) -> torch.Tensor:
        """[steps, rows] as [steps, batch]: rows must be the network's samples."""
        if values.shape[1] != self.batch:
            raise RuntimeError(f"{site}: {values.shape[1]} rows per step where the network input has {self.batch} "
                               "samples; a forward that mixes samples on the batch axis cannot be simulated")
        return values

    def record_spikes(self, site: str, counts: torch.Tensor, elements_per_row: int,
                      peak: torch.Tensor | None = None, active: torch.Tensor | None = None) -> None:
        """[steps, rows] each: spike events, the most spikes one neuron emitted, neurons with a non-zero output.
        Without ``peak`` and ``active`` no neuron emitted more than one spike: every event is one active
        neuron, and the peak is 1 wherever some neuron spiked (worked out once per stack, in end_stack)."""
        counts = self._per_sample(site, counts)
        self.spikes[site].append(counts)
        self._stack["spikes"].append(counts)
        if peak is None:
            self._stack["binary"].append(counts)
        else:
            self._stack["peak"].append(peak)
            self._stack["active"].append(active)
        if self.first_stack and len(self.spikes[site]) == 1:
            self.elements[site] += elements_per_row

    def record_synapse(self, site, macs_per_row, ops, analog_macs, skipped_rows) -> None:
        """``ops`` (SOPs) or ``analog_macs`` (dense MACs), [steps, rows] in float64: counts above 2**24 are not
        exact in float32."""
        if self.first_stack:
            self.forward_macs[site] += macs_per_row
        if ops is not None:
            ops = self._per_sample(site, ops)
            self.sops[site].append(ops)
            self._stack["sops"].append(ops)
        if analog_macs is not None:
            analog_macs = self._per_sample(site, analog_macs)
            self.analog_macs[site].append(analog_macs)
            self._stack["macs"].append(analog_macs)
        if not isinstance(skipped_rows, int):  # a tensor: this was a sleep stack
            self.skipped_rows.append(skipped_rows)
            self._skipped_macs.append(skipped_rows * macs_per_row)

    def record_island(self, site: str, macs: int, steps: int) -> None:
        """``macs``: everything the island computed in this stack (all steps, all rows)."""
        if self.first_stack:
            self.island_macs[site] += macs // (steps * self.batch)
        macs_per_row = torch.full((steps, self.batch), macs / (steps * self.batch), dtype=torch.float64,
                                  device=self.device)
        self.analog_macs[site].append(macs_per_row)
        self._stack["macs"].append(macs_per_row)

    def end_stack(self) -> None:
        """One row per step of this stack (zeros for a step in which no layer computed anything)."""
        def combined(name: str, reduce=torch.sum) -> torch.Tensor:
            parts = self._stack[name]
            if not parts:
                return torch.zeros(self._stack_steps, self.batch, dtype=torch.float64, device=self.device)
            return reduce(torch.stack(parts), 0).double()  # stack promotes mixed dtypes (all on one device)

        sops, macs = combined("sops"), combined("macs")
        binary = combined("binary", torch.amax)  # one spike at most: the peak is 1 where a neuron spiked
        peak = torch.maximum(combined("peak", torch.amax), (binary > 0).to(binary.dtype))
        active = combined("active") + combined("binary")
        for acc, rows in ((combined("spikes"), self.spikes_per_step), (sops * PJ_PER_SOP + macs * PJ_PER_MAC,
                          self.energy_pj_per_step), (peak, self.peak_per_step), (active, self.active_per_step),
                          (sops, self.sops_per_step), (macs, self.macs_per_step)):
            rows.extend(acc.unbind(0))

    def summary(self, wake: int, steps_used: torch.Tensor) -> "RunStats":
        def total(parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
            return {k: torch.cat(v).double().sum(0).cpu() for k, v in parts.items()}

        # Multistep sleep stacks may run past the step at which the last sample fell silent; those
        # steps changed nothing and are not part of the run.
        steps = int(steps_used.max()) if steps_used.numel() else self.steps_recorded

        def rows(per_step: list[torch.Tensor]) -> torch.Tensor:
            kept = per_step[:steps]
            return torch.stack([r.cpu() for r in kept]) if kept else empty

        spikes = total(self.spikes)
        sops = total(self.sops)
        analog = total(self.analog_macs)
        zeros = torch.zeros(self.batch, dtype=torch.float64)
        empty = torch.zeros(0, self.batch, dtype=torch.float64)
        firing = {
            site: float(s.sum()) / (self.elements[site] * self.batch * steps)
            for site, s in spikes.items() if self.elements[site]
        }
        ann = sum(self.forward_macs.values()) + sum(self.island_macs.values())
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
            spikes_per_step=rows(self.spikes_per_step),
            energy_pj_per_step=rows(self.energy_pj_per_step),
            peak_spikes_per_step=rows(self.peak_per_step),
            active_per_step=rows(self.active_per_step),
            sops_per_step=rows(self.sops_per_step),
            macs_per_step=rows(self.macs_per_step),
            neurons=sum(self.elements.values()),
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
    peak_spikes_per_step: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [steps, batch]
    active_per_step: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # non-zero neuron outputs
    sops_per_step: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    macs_per_step: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # dense (analog) MACs
    neurons: int = 0  # neuron outputs per sample in one step, all call sites

    def workload_until(self, t: int) -> dict[str, torch.Tensor]:
        """Per sample ([batch] tensors), the first ``t`` steps of the run (each sample's own steps, if fewer):
        ``steps``; ``binary_steps`` (a step counts k when some neuron emitted k spikes in it, else 1);
        ``neurons`` (outputs per step); ``neuron_updates`` (neurons x steps); ``active_outputs`` (non-zero neuron
        outputs); ``sops``; ``graded_sops`` (those of steps in which some neuron emitted more than one spike); ``macs`` (dense,
        analog inputs); ``ann_macs`` and ``ann_analog_macs`` (one forward of the network converted from, and its
        part on analog inputs: the first wake step's dense MACs)."""
        rows = self.peak_spikes_per_step.shape[0]
        used = self.steps.clamp(max=min(t, rows)).double()
        mask = (torch.arange(rows).unsqueeze(1) < used.unsqueeze(0)).double()[:t]  # [t, batch]: step in the run
        peak = self.peak_spikes_per_step[:t]
        sops = self.sops_per_step[:t] * mask
        batch = self.steps.shape[0]
        return {
            "steps": used,
            "binary_steps": (peak.clamp(min=1) * mask).sum(0),
            "neuron_updates": used * self.neurons,
            "active_outputs": (self.active_per_step[:t] * mask).sum(0),
            "sops": sops.sum(0),
            "graded_sops": (sops * (peak > 1)).sum(0),
            "macs": (self.macs_per_step[:t] * mask).sum(0),
            "neurons": torch.full((batch,), float(self.neurons), dtype=torch.float64),
            "ann_macs": torch.full((batch,), float(self.ann_macs), dtype=torch.float64),
            "ann_analog_macs": self.macs_per_step[0] if rows else torch.zeros(batch, dtype=torch.float64),
        }

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


# --- pricing a workload (``RunStats.workload_until``; plain numbers, e.g. means over images) ---------------------

def integer_energy(work: dict[str, float], levels: int) -> dict[str, float]:
    """Compute energy (pJ per sample) on integer hardware, SNN against the QANN it reproduces, from Horowitz's
    45 nm table (``HOROWITZ_45NM_PJ``). QANN: each MAC on a quantized input is an L-level activation
    (``activation_bits(L)`` bits) times an int8 weight into a 32-bit accumulator, each MAC on an analog input
    int8 x int8. SNN: a synaptic operation of a single spike is one 32-bit add; one of a step in which some neuron
    emitted several spikes (a burst) is priced as the QANN's MAC (a small multiply), NeuroBench's convention for
    non-binary spikes; its dense MACs (analog inputs, every wake step) int8 x int8."""
    bits = activation_bits(levels)
    add = HOROWITZ_45NM_PJ["int32_add"]
    mac_q, mac_in = int_mac_pj(bits), int_mac_pj(INPUT_BITS)
    qann = (work["ann_macs"] - work["ann_analog_macs"]) * mac_q + work["ann_analog_macs"] * mac_in
    snn = (work["sops"] - work["graded_sops"]) * add + work["graded_sops"] * mac_q + work["macs"] * mac_in
    return {"snn_pj": snn, "qann_pj": qann, "ratio": snn / qann if qann else float("nan"),
            "activation_bits": bits, "pj_per_mac": mac_q, "pj_per_input_mac": mac_in, "pj_per_sop": add}


def memory_traffic(work: dict[str, float], levels: int) -> dict[str, float]:
    """SRAM traffic (``sram_pj_per_bit``) per sample and per step. SNN: an int8 weight read per synaptic operation
    and per dense MAC, a 32-bit membrane read and write per neuron per step. QANN: an int8 weight read per MAC, and
    per neuron one activation written and read once (``activation_bits(L)`` bits). Weight reuse in a buffer is
    not modelled: both networks read a weight per operation."""
    per_bit = sram_pj_per_bit()
    weight_reads = work["sops"] + work["macs"]
    membrane = work["neuron_updates"]
    snn = (weight_reads * WEIGHT_BITS + 2 * membrane * STATE_BITS) * per_bit
    qann = (work["ann_macs"] * WEIGHT_BITS + 2 * work["neurons"] * activation_bits(levels)) * per_bit
    steps = work["steps"] or 1.0
    return {"weight_reads": weight_reads, "membrane_reads": membrane, "membrane_writes": membrane,
            "weight_reads_per_step": weight_reads / steps, "membrane_reads_per_step": membrane / steps,
            "membrane_writes_per_step": membrane / steps, "snn_pj": snn, "qann_pj": qann,
            "ratio": snn / qann if qann else float("nan"), "pj_per_bit": per_bit}


def neurobench_metrics(work: dict[str, float]) -> dict[str, float]:
    """The workload under NeuroBench's definitions (Yik et al., *The neurobench framework for benchmarking
    neuromorphic computing algorithms and systems*, Nature Communications 2025; the ``neurobench`` package's
    ``ActivationSparsity`` and ``SynapticOperations``): activation sparsity = zero neuron outputs / all neuron
    outputs over layers, steps and samples; synaptic operations per sample as ``Dense`` (every connection at
    every step, zeros included), ``Effective_ACs`` (non-zero inputs of a layer whose input is binary: spikes
    in {-1, 0, 1}) and ``Effective_MACs`` (non-zero inputs otherwise: analog inputs and graded spikes). Spikes
    are counted in units of the threshold (it folds into the weights). NeuroBench classifies each layer call;
    here a step in which any neuron emitted several spikes makes all its synaptic operations MACs, an upper
    bound on its MACs."""
    outputs = work["neuron_updates"]
    return {"activation_sparsity": 1 - work["active_outputs"] / outputs if outputs else float("nan"),
            "Dense": work["ann_macs"] * work["steps"],
            "Effective_MACs": work["macs"] + work["graded_sops"],
            "Effective_ACs": work["sops"] - work["graded_sops"]}
