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
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .spike_counts import fused_counter

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


def row_totals(per_position: torch.Tensor, most: int) -> torch.Tensor:
    """Per-row totals, ``[rows]``, of counts ``[rows, positions]`` none of whose rows can total more than ``most``:
    in float32 where that is below 2**24 (exact there, and several times faster than a float64 sum of a float32 or
    half tensor), else in float64. The recorder takes them to float64 once per stack (``StatsRecorder.end_stack``),
    before any sum over layers or steps."""
    if most >= 1 << 24 or per_position.dtype == torch.float64:
        return per_position.sum(1, dtype=torch.float64)
    return per_position.sum(1, dtype=torch.float32)


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
    """Collects per-layer counts while the network runs; tensors stay on the device until `summary`.

    A layer call records its counts as they come (a few tensors, no arithmetic); each stack's records are
    combined once, in ``end_stack``, into one tensor per kind (all layers), and the per-layer totals once, in
    ``summary``: at batch 1 the cost of recording is the count of small tensor operations per layer call, not the
    passes over data (``benchmarks/runtime.py`` counts them)."""

    def __init__(self, batch: int, device: torch.device | str = "cpu"):
        self.batch = batch
        self.device = torch.device(device)  # the run's: a stack in which nothing counted gets zeros there
        self.stack_index = -1
        self.elements: dict[str, int] = defaultdict(int)  # neurons per sample, all call sites
        self.forward_macs: dict[str, int] = defaultdict(int)  # MACs per sample of one ANN forward
        self.island_macs: dict[str, int] = defaultdict(int)
        self.skipped_rows = 0  # sleep-step rows a synapse skipped (no input event), and their dense MACs
        self.skipped_macs = 0
        self.steps_recorded = 0
        # Per stack: the sites and their [sites, steps, batch] counts, for the per-layer totals.
        self._spikes_by_site: list[tuple[list[str], torch.Tensor]] = []
        self._sops_by_site: list[tuple[list[str], torch.Tensor]] = []
        # Per stack, [steps, batch] each, all layers (a layer called n times per step adds to one row).
        self._per_step: dict[str, list[torch.Tensor]] = {
            "spikes": [], "energy_pj": [], "peak": [], "active": [], "sops": [], "macs": []}
        self._scales: dict[tuple, torch.Tensor] = {}
        self._scratch: torch.Tensor | None = None
        self._scratch_views: dict[tuple, torch.Tensor] = {}
        self._zero_rows: dict[int, torch.Tensor] = {}
        # Whether a layer may read a count back to skip the rest of its counting when it is zero: cheap on the CPU,
        # a stall of the stream on a GPU, which counts everything instead (the figures are the same).
        self.may_sync = self.device.type == "cpu"
        # The fused counter (``spike_counts``) where the kernel is built: CPU float32 outputs, one pass each.
        self.fused_counter = fused_counter() if self.device.type == "cpu" else None

    def begin_stack(self, steps: int) -> None:
        self.stack_index += 1
        self.steps_recorded += steps
        self._stack_steps = steps
        self._spikes, self._spike_sites = [], []
        self._binary, self._peak, self._active = [], [], []
        self._sops, self._sop_scales, self._sop_sites = [], [], []
        self._dense_macs = 0.0  # per row, from calls that computed every row
        self._dense_masks, self._dense_masked_macs = [], []  # calls that computed some rows (a sleep step)

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

    def zero_rows(self, rows: int) -> torch.Tensor:
        """``[rows]`` zeros in float64: the counts of a layer call with no event (one tensor per size, never
        written)."""
        zeros = self._zero_rows.get(rows)
        if zeros is None:
            zeros = self._zero_rows[rows] = torch.zeros(rows, dtype=torch.float64, device=self.device)
        return zeros

    @property
    def first_stack(self) -> bool:
        return self.stack_index == 0

    def _check_rows(self, site: str, rows: int) -> None:
        """``rows`` values per stack must be the network's samples at each step."""
        if rows != self._stack_steps * self.batch:
            raise RuntimeError(f"{site}: {rows // self._stack_steps} rows per step where the network input has "
                               f"{self.batch} samples; a forward that mixes samples on the batch axis cannot be simulated")

    def record_spikes(self, site: str, counts: torch.Tensor, elements_per_row: int,
                      peak: torch.Tensor | None = None, active: torch.Tensor | None = None) -> None:
        """[steps * rows] each (or [steps, rows]), float32 or float64 (exact integers): spike events, the most spikes
        one neuron emitted, neurons with a non-zero output. Without ``peak`` and ``active`` no neuron emitted more than
        one spike: every event is one active neuron, and the peak is 1 wherever some neuron spiked (worked out once
        per stack, in end_stack)."""
        self._check_rows(site, counts.numel())
        self._spikes.append(counts)
        self._spike_sites.append(site)
        if peak is None:
            self._binary.append(counts)
        else:
            self._peak.append(peak)
            self._active.append(active)
        if self.first_stack and site not in self.elements:
            self.elements[site] = elements_per_row

    def record_synapse(self, site: str, macs_per_row: int, sops: torch.Tensor | None = None, sops_scale: float = 1.0,
                       computed_rows: torch.Tensor | None = None, skipped_rows: int = 0) -> None:
        """One synapse call. On spikes: ``sops`` ([steps * rows], float32 or float64, exact integers) times
        ``sops_scale`` are its synaptic operations per row (event counts and a uniform fan-out, or the operations
        themselves and 1). On an analog input (``sops`` None): ``macs_per_row`` dense MACs on every row, or only on
        ``computed_rows`` (a bool mask: a sleep step skipped the others)."""
        if self.first_stack:
            self.forward_macs[site] += macs_per_row
        if sops is not None:
            self._check_rows(site, sops.numel())
            self._sops.append(sops)
            self._sop_scales.append(sops_scale)
            self._sop_sites.append(site)
        elif computed_rows is None:
            self._dense_macs += macs_per_row
        else:
            self._dense_masks.append(computed_rows)
            self._dense_masked_macs.append(float(macs_per_row))
        self.skipped_rows += skipped_rows
        self.skipped_macs += skipped_rows * macs_per_row

    def record_island(self, site: str, macs: int, steps: int) -> None:
        """``macs``: everything the island computed in this stack (all steps, all rows)."""
        if self.first_stack:
            self.island_macs[site] += macs // (steps * self.batch)
        self._dense_macs += macs / (steps * self.batch)

    def _scale_vector(self, scales: list[float]) -> torch.Tensor:
        key = tuple(scales)
        vector = self._scales.get(key)
        if vector is None:
            vector = self._scales[key] = torch.tensor(scales, dtype=torch.float64, device=self.device).view(-1, 1, 1)
        return vector

    def end_stack(self) -> torch.Tensor:
        """This stack's records as one tensor per kind: per site, and one row per step (zeros for a step in which
        no layer computed anything). Returns the stack's spikes per (step, sample)."""
        shape = (self._stack_steps, self.batch)
        zeros = torch.zeros(shape, dtype=torch.float64, device=self.device)

        def stacked(parts: list[torch.Tensor], *aligned: list) -> tuple:
            """The parts as one float64 tensor ``[parts, steps, batch]`` (None if there are none), and ``aligned``
            (lists with one entry per part) in the order the parts were stacked in. Counts arrive in float32 where
            that is exact (``row_totals``) and in float64 elsewhere: each dtype is stacked and converted once (a
            conversion per part, or a stack of mixed dtypes, is several times slower)."""
            if not parts:
                return None, *aligned
            groups: dict[torch.dtype, list[int]] = defaultdict(list)
            for i, part in enumerate(parts):
                groups[part.dtype].append(i)
            if len(groups) == 1:
                return torch.stack(parts).view(len(parts), *shape).double(), *aligned
            order = [i for members in groups.values() for i in members]
            tensor = torch.cat([torch.stack([parts[i] for i in members]).double() for members in groups.values()])
            return tensor.view(len(parts), *shape), *([entries[i] for i in order] for entries in aligned)

        spikes, spike_sites = stacked(self._spikes, self._spike_sites)
        sops, sop_sites, sop_scales = stacked(self._sops, self._sop_sites, self._sop_scales)
        if sops is not None:
            sops = sops * self._scale_vector(sop_scales)
            self._sops_by_site.append((sop_sites, sops))
        if spikes is not None:
            self._spikes_by_site.append((spike_sites, spikes))
        macs = torch.full(shape, self._dense_macs, dtype=torch.float64, device=self.device)
        if self._dense_masks:
            masked = torch.tensor(self._dense_masked_macs, dtype=torch.float64, device=self.device)
            macs += (masked @ torch.stack(self._dense_masks).to(torch.float64)).view(shape)
        (binary,) = stacked(self._binary)
        # one spike at most: the peak is 1 where a neuron spiked, and every event is an active neuron
        peak = zeros if binary is None else (binary.amax(0) > 0).to(torch.float64)
        active = zeros if binary is None else binary.sum(0)
        if self._peak:
            peak = torch.maximum(peak, stacked(self._peak)[0].amax(0))
            active = active + stacked(self._active)[0].sum(0)
        spikes_step = zeros if spikes is None else spikes.sum(0)
        sops_step = zeros if sops is None else sops.sum(0)
        for name, rows in (("spikes", spikes_step), ("energy_pj", sops_step * PJ_PER_SOP + macs * PJ_PER_MAC),
                           ("peak", peak), ("active", active), ("sops", sops_step), ("macs", macs)):
            self._per_step[name].append(rows)
        return spikes_step

    def last_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Spikes and energy (pJ) per sample of the last step recorded."""
        return self._per_step["spikes"][-1][-1], self._per_step["energy_pj"][-1][-1]

    @staticmethod
    def _site_totals(by_stack: list[tuple[list[str], torch.Tensor]]) -> tuple[dict[str, float], torch.Tensor | None]:
        """Per-site totals over steps and samples, and the per-sample total over sites and steps."""
        totals: dict[str, float] = defaultdict(float)
        per_sample = None
        for sites, counts in by_stack:
            for site, value in zip(sites, counts.sum((1, 2)).tolist()):
                totals[site] += value
            stack_total = counts.sum((0, 1))
            per_sample = stack_total if per_sample is None else per_sample + stack_total
        return dict(totals), per_sample

    def summary(self, wake: int, steps_used: torch.Tensor) -> "RunStats":
        # Multistep sleep stacks may run past the step at which the last sample fell silent; those
        # steps changed nothing and are not part of the run.
        steps = int(steps_used.max()) if steps_used.numel() else self.steps_recorded
        per_step = {name: torch.cat(rows).cpu() if rows else torch.zeros(0, self.batch, dtype=torch.float64)
                    for name, rows in self._per_step.items()}
        zeros = torch.zeros(self.batch, dtype=torch.float64)
        spikes_per_layer, spikes = self._site_totals(self._spikes_by_site)
        sops_per_layer, sops = self._site_totals(self._sops_by_site)
        firing = {site: total / (self.elements[site] * self.batch * steps)
                  for site, total in spikes_per_layer.items() if self.elements[site]}
        ann = sum(self.forward_macs.values()) + sum(self.island_macs.values())
        return RunStats(
            wake=wake,
            steps=steps_used.cpu(),
            spikes=zeros if spikes is None else spikes.cpu(),
            sops=zeros if sops is None else sops.cpu(),
            analog_macs=per_step["macs"].sum(0),
            ann_macs=ann,
            island_macs=sum(self.island_macs.values()),
            spikes_per_layer=spikes_per_layer,
            sops_per_layer=sops_per_layer,
            firing_rates=firing,
            spikes_per_step=per_step["spikes"][:steps],
            energy_pj_per_step=per_step["energy_pj"][:steps],
            peak_spikes_per_step=per_step["peak"][:steps],
            active_per_step=per_step["active"][:steps],
            sops_per_step=per_step["sops"][:steps],
            macs_per_step=per_step["macs"][:steps],
            neurons=sum(self.elements.values()),
            skipped_rows=float(self.skipped_rows),
            skipped_macs=float(self.skipped_macs),
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
