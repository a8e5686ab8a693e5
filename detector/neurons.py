"""Spiking neurons: the Consistent IF neuron (CASC), the QCFS neuron and the plain IF baseline.

Both keep one state per call site (see ``state.CallSiteModule``) and process a stack of time
steps: the input has ``steps * rows`` rows on its first axis, step-major. They output
``threshold * s`` where ``s`` is the signed spike count of the element in that step.
"""

from __future__ import annotations

import torch

from .energy import count_sum, row_totals
from .spike_counts import counter_for
from .state import CallSiteModule, Events


class Neuron(CallSiteModule):
    """Shared machinery: state per call site, the time loop over a stack, spike recording."""

    kind = "neuron"  # subclasses define threshold_at(index), first_update(...) and update(state, ...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sim = self.sim
        steps = sim.steps
        if x.dim() == 0 or x.shape[0] != steps * sim.batch:
            sim.rows_per_step(x, self.site(self._calls))  # raises: the layout is not step-major
        index, state = self.next_state(list)  # empty until the first step creates it
        shape = x.shape[1:]
        if state and state[0].shape[1:] != shape:
            raise RuntimeError(
                f"{self.site(index)}: input shape {(sim.batch, *shape)} differs from the state's "
                f"{tuple(state[0].shape)}; call reset() before running inputs of another size"
            )
        theta = self.threshold_at(index)
        if steps == 1:  # step mode: the stack is the step itself, no per-step views
            spikes = self._step(state, x, theta, sim.wake_counts[0], sim.sleeping)
        else:
            current = x.unflatten(0, (steps, sim.batch))
            per_step = torch.empty_like(current)
            for t in range(steps):
                per_step[t] = self._step(state, current[t], theta, sim.wake_counts[t], sim.sleeping)
            spikes = per_step.flatten(0, 1)
        events = None
        if sim.record:
            events = self._count_spikes(index, spikes, shape)
        elif sim.sleeping:  # only a silent sleep step settles: wake steps need no activity map
            magnitude = spikes.abs().sum(tuple(range(1, spikes.dim())))
            sim.note_activity(magnitude > 0)
            if sim.event_driven:  # the synapses fed by this output skip their silent rows from it
                events = Events(None, magnitude)
        out = spikes if theta == 1.0 else spikes.mul_(theta)
        if events is not None:
            sim.publish(out, events)
        return out

    def _count_spikes(self, index: int, spikes: torch.Tensor, shape: torch.Size) -> Events:
        """Records the stack's spikes (``spikes``: ``[steps * batch, channels, *positions]``); returns the events
        for the synapses this output feeds. (A recorded stack's activity map comes from these counts, once per
        stack: ``SpikingNetwork.forward_stack``.) The counts come from the fused counter (``spike_counts``) where it
        serves, else from eager PyTorch (``_eager_counts``): the same figures, bit for bit."""
        sim = self.sim
        recorder = sim.recorder
        rows = spikes.shape[0]  # (len() of a tensor goes through a slower Python wrapper)
        neurons = shape.numel()
        bursting = sim.sleeping and sim.burst > 1  # a neuron may emit several spikes in this step
        most = neurons * self.most_spikes(sim.sleeping)  # a burst of n is n events
        fused = counter_for(recorder.fused_counter, spikes, most)
        if fused is not None:
            per_position, counts, peak, fired_at, fired_per_row, any_spike = fused.count_spikes(spikes, bursting)
        else:
            per_position, counts, peak, fired_at, fired_per_row, any_spike = self._eager_counts(
                spikes, rows, neurons, most, bursting)
        if not bursting:  # at most one spike per neuron: every spiking neuron is one event
            recorder.record_spikes(self.site(index), counts, neurons)
            return Events(per_position, counts)
        if recorder.may_sync and not any_spike:
            # A silent sleep step (about half the neuron outputs of a YOLO sleep step): nothing to count, and the
            # synapses it feeds skip it whole (no events at any position: per_position None).
            silent = recorder.zero_rows(rows)
            recorder.record_spikes(self.site(index), silent, neurons, peak=peak, active=silent)
            return Events(None, silent)
        recorder.record_spikes(self.site(index), counts, neurons, peak=peak, active=fired_per_row)
        return Events(fired_at, fired_per_row)

    def _eager_counts(self, spikes: torch.Tensor, rows: int, neurons: int, most: int, bursting: bool) -> tuple:
        """What ``count_spikes`` of the fused counter returns, with eager PyTorch: ``(per_position, per_row, peak,
        fired_per_position, fired_per_row, any_spike)``; the last four only when ``bursting`` (else None, None, None,
        True). Where a silent step can be read back (``StatsRecorder.may_sync``) it stops at the peak."""
        recorder = self.sim.recorder
        magnitude = torch.abs(spikes, out=recorder.scratch(spikes))
        if bursting:
            peak = magnitude.view(rows, -1).amax(1)
            if recorder.may_sync and not peak.max():
                return None, None, peak, None, None, False
        # Spikes at each position, summed over channels: the counts per (step, sample) follow, and so do the
        # synaptic operations of a synapse fed by this output (so it need not pass over the output again).
        per_position = count_sum(magnitude, 1).view(rows, -1)
        counts = row_totals(per_position, most)
        if not bursting:
            return per_position, counts, None, None, None, True
        fired_at = count_sum(torch.ne(magnitude, 0, out=magnitude), 1).view(rows, -1)  # neurons that fired
        return per_position, counts, peak, fired_at, row_totals(fired_at, neurons), True

    def most_spikes(self, sleep: bool) -> int:
        """Spikes one neuron may emit in a step (of either sign): one, unless a subclass bursts."""
        return 1

    def _step(self, state: list, current, theta, k, sleep) -> torch.Tensor:
        if state:
            return self.update(state, current, theta, k, sleep)
        # The first step starts from the initial state, which its update folds in: no state to fill first.
        new_state, spikes = self.first_update(current, theta, k, sleep)
        state.extend(new_state)
        return spikes


class CIFNeuron(Neuron):
    """Consistent IF neuron (``docs/method.md``) with signed, capped spikes.

    Per step: ``m += I``; ``s = floor(m / theta)`` clamped so that ``0 <= C + s <= cap(k)`` and
    ``|s| <= 1`` (``<= burst`` in sleep steps); ``C += s``; ``m -= theta * s``. A ``signed`` neuron
    (the neuron of a ``SignedClipQuan``) keeps ``-cap(k) <= C + s <= cap(k)`` instead. The membrane starts
    at ``precharge * theta`` (1/2 realises a rounding ClipQuan exactly, 0 the floor form).
    ``cap(k) = k`` when the layer has as many levels as the network has wake steps; a layer with
    fewer levels ``L`` in a network of ``W`` wake steps fires at ``theta = W/L`` times the QANN's
    threshold and is capped at ``floor(k * L / W)`` spikes, which is ``L`` at the end of the wake.
    The two flags exist for ablations: without negative spikes or without the cap the network is
    no longer exact, which the tests use to tell the method from a near miss.
    """

    kind = "cif"

    def __init__(self, threshold: float = 1.0, negative_spikes: bool = True, spike_cap: bool = True,
                 precharge: float = 0.0, levels: int | None = None, wake_levels: int | None = None,
                 signed: bool = False):
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"neuron threshold must be > 0, got {threshold!r}")
        if not 0 <= precharge < 1:
            raise ValueError(f"precharge must be in [0, 1), got {precharge!r}")
        if (levels is None) != (wake_levels is None) or (levels is not None and not 1 <= levels <= wake_levels):
            raise ValueError(f"levels ({levels}) and wake_levels ({wake_levels}) go together, levels <= wake_levels")
        self.threshold = float(threshold)
        self.negative_spikes = negative_spikes
        self.spike_cap = spike_cap
        self.precharge = float(precharge)
        self.levels, self.wake_levels = levels, wake_levels
        self.signed = bool(signed)

    @classmethod
    def for_quantizer(cls, quantizer, wake_levels: int, **flags) -> "CIFNeuron":
        """The neuron that reproduces ``quantizer`` (a ClipQuan) in a network of ``wake_levels`` wake steps."""
        levels = quantizer.levels
        return cls(quantizer.threshold * wake_levels / levels, precharge=quantizer.phi,
                   levels=None if levels == wake_levels else levels,
                   wake_levels=None if levels == wake_levels else wake_levels, signed=quantizer.signed, **flags)

    def threshold_at(self, index: int) -> float:
        return self.threshold

    def most_spikes(self, sleep: bool) -> int:
        """Spikes one neuron may emit in a step: 1 in wake steps, the burst γ in sleep steps."""
        return self.sim.burst if sleep else 1

    def cap(self, k: int) -> int:
        return k if self.levels is None else k * self.levels // self.wake_levels

    def lowest_count(self, k: int) -> int | None:
        """The least total spike count allowed after wake step ``k``: 0, or ``-cap(k)`` for a signed neuron
        (None: unbounded, a signed neuron in the no-cap ablation)."""
        if not self.signed:
            return 0
        return -self.cap(k) if self.spike_cap else None

    @staticmethod
    def _floor(m: torch.Tensor, theta: float) -> torch.Tensor:
        # floor(m / theta) as a division then an in-place floor: one new tensor (torch.div's floor rounding
        # mode is several times slower on the CPU)
        return torch.floor(m) if theta == 1.0 else torch.div(m, theta).floor_()

    def first_update(self, current, theta, k, sleep):
        """``update`` from the initial state (membrane ``precharge * theta``, no spikes yet): ``([m, C], s)``."""
        m = current + self.precharge * theta if self.precharge else current.clone()
        s = self._floor(m, theta)
        gamma = self.most_spikes(sleep)
        s.clamp_(-gamma if self.signed and self.negative_spikes else 0, gamma)  # C = 0: unsigned, no spike to take back
        if self.spike_cap:
            s.clamp_(self.lowest_count(k), self.cap(k))
        m.sub_(s, alpha=theta)
        return [m, s.clone()], s

    def update(self, state, current, theta, k, sleep):
        m, count = state
        m.add_(current)
        s = self._floor(m, theta)
        gamma = self.most_spikes(sleep)
        if self.negative_spikes and self.spike_cap:
            # Clamping s to [-gamma, gamma] and then C + s to [0, cap] keeps at most gamma spikes, never below 0
            # or above the cap in total, with scalar bounds only and in place: the new count, then s from it.
            # (Taking the new count as the state instead needs s in a new tensor, or an aliased out= the ONNX
            # exporter refuses; a new large tensor each step costs more than the addition it saves.)
            s.clamp_(-gamma, gamma).add_(count).clamp_(self.lowest_count(k), self.cap(k)).sub_(count)
        else:  # the ablations: one bound dropped, so the exactness tests can tell the method from a near miss
            s.clamp_(-gamma, gamma)
            if self.spike_cap:
                s.clamp_(max=self.cap(k) - count)
            lowest = self.lowest_count(k)
            if not self.negative_spikes:
                s.clamp_(min=0)
            elif lowest is not None:
                s.clamp_(min=lowest - count)
        count.add_(s)
        m.sub_(s, alpha=theta)
        return s

    def extra_repr(self) -> str:
        flags = "" if self.negative_spikes and self.spike_cap else (
            f", negative_spikes={self.negative_spikes}, spike_cap={self.spike_cap}")
        quant = f", precharge={self.precharge:g}" if self.precharge else ""
        if self.levels is not None:
            quant += f", levels={self.levels}/{self.wake_levels}"
        if self.signed:
            quant += ", signed"
        return f"threshold={self.threshold:g}{quant}{flags}"


class QCFSNeuron(CIFNeuron):
    """The QCFS conversion of the same QANN (Bu et al., *Optimal ANN-SNN Conversion for High-accuracy and
    Ultra-low-latency Spiking Neural Networks*, ICLR 2022): an IF neuron at the quantizer's threshold θ, membrane
    pre-charged to θ/2, reset by subtraction, at most one positive spike per step, no negative spikes and no cap.
    It runs ``wake=T`` steps with no sleep; its readout after T steps is the spike rate times θ, which approaches
    the QANN's staircase as T grows. Against CASC on the same QANN it isolates what negative spikes, the cap
    and the sleep steps buy. The threshold is θ whatever the layer's level count (QCFS has no level-count cap).
    """

    kind = "qcfs"

    def __init__(self, threshold: float):
        super().__init__(threshold, negative_spikes=False, spike_cap=False, precharge=0.5)

    def most_spikes(self, sleep: bool) -> int:
        return 1

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}, precharge=0.5 (QCFS)"


class IFNeuron(Neuron):
    """Plain integrate-and-fire neuron with soft reset (the usual conversion baseline).

    One threshold per call site (from activation percentiles); one positive spike at most per
    step; no negative spikes, no cap.
    """

    kind = "if"

    def __init__(self, thresholds: list[float]):
        super().__init__()
        if not thresholds or any(not t > 0 for t in thresholds):
            raise ValueError(f"IF neuron thresholds must be positive, got {thresholds!r}")
        self.site_thresholds = [float(t) for t in thresholds]

    def threshold_at(self, index: int) -> float:
        if index >= len(self.site_thresholds):
            raise RuntimeError(
                f"{self.site(index)}: called {index + 1} times per step but calibrated for "
                f"{len(self.site_thresholds)} call site(s)")
        return self.site_thresholds[index]

    def first_update(self, current, theta, k, sleep):
        m = current.clone()
        s = (m >= theta).to(m.dtype)
        m.sub_(s, alpha=theta)
        return [m], s

    def update(self, state, current, theta, k, sleep):
        (m,) = state
        m.add_(current)
        s = (m >= theta).to(m.dtype)
        m.sub_(s, alpha=theta)
        return s

    def extra_repr(self) -> str:
        return "thresholds=[" + ", ".join(f"{t:.4g}" for t in self.site_thresholds) + "]"
