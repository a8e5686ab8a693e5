"""The simulator: wake-sleep schedule, step and multistep execution, readouts, step events.

It knows nothing about detection: it runs a rewritten module tree (see ``convert``) and sums
whatever the tree returns (tensor, tuple, list, dict) over every wake and sleep step, divided by
the wake count. With ``wake = L`` and ``sleep="auto"`` those readouts equal the QANN's outputs.

``"step"`` mode runs the tree once per time step (and can stream). ``"multistep"`` runs it once
per stack of steps concatenated on the batch axis, so stateless layers see all steps at once
and only neurons loop over time; it needs a forward pass that treats batch rows independently.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .energy import RunStats, StatsRecorder
from .flow import ANALOG, SpikeFlowTrace
from .neurons import Neuron
from .state import CallSiteModule, SimulationState
from .synapses import Synapse

MODES = ("step", "multistep")


def tree_map(fn, tree):
    """Apply ``fn`` to every tensor of a nested tuple / list / dict, keeping the structure."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple):
        items = [tree_map(fn, t) for t in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    if isinstance(tree, list):
        return [tree_map(fn, t) for t in tree]
    if isinstance(tree, dict):
        return _same_mapping(tree, {k: tree_map(fn, v) for k, v in tree.items()})
    return tree


def _same_mapping(like: dict, values: dict) -> dict:
    """``values`` in a mapping of ``like``'s type (an OrderedDict stays one)."""
    out = copy.copy(like)
    out.update(values)
    return out


def accumulate(total, out):
    """``total + out`` for two trees of the same structure, added into ``total``'s tensors in place (a step's
    readout allocates nothing); ``total`` None: a copy of ``out``, which the run then owns."""
    if total is None:
        return tree_map(torch.clone, out)
    if isinstance(total, torch.Tensor):
        return total.add_(out)
    if isinstance(total, (tuple, list)):
        for a, b in zip(total, out):
            accumulate(a, b)
        return total
    if isinstance(total, dict):
        for k in total:
            accumulate(total[k], out[k])
    return total


class RunCancelled(RuntimeError):
    """Raised between two time steps when the run's ``cancel`` event was set (a timed-out request)."""


@dataclass
class RunResult:
    """What one run returns: its readouts and, per sample, how it went."""

    readout: Any  # readouts summed over every step, divided by the wake count (the model's structure)
    wake: int  # wake steps W
    steps: torch.Tensor  # [batch] total steps T = W + sleep steps used, per sample
    settled: torch.Tensor  # [batch] bool: a silent sleep step confirmed the fixed point
    stats: RunStats | None  # spikes, SOPs, MACs, energy (per step too); None when not recording


@dataclass
class StepEvent:
    """One time step of a streamed run."""

    t: int  # total steps so far, wake plus sleep (1-based)
    phase: str  # "wake" or "sleep"
    wake: int  # wake steps so far (k)
    readout: Any  # readouts accumulated so far divided by k: the network's current answer
    spikes: torch.Tensor | None  # [batch] spike events of each sample in this step (None when not recording)
    energy_pj: torch.Tensor | None  # [batch] estimated energy of each sample in this step (None when not recording)
    settled: torch.Tensor  # per sample: has a silent sleep step confirmed its fixed point
    result: RunResult | None = None  # the whole run's result, on the last event only


class SpikingNetwork(nn.Module):
    """A converted network and its simulator. Build it with ``detector.convert``."""

    def __init__(self, model: nn.Module, sim: SimulationState, levels: int | None, neuron: str,
                 analog: list[str], batchnorm: tuple[int, int]):
        super().__init__()
        self.model = model
        self.sim = sim
        self.levels = levels
        self.neuron = neuron
        self.analog = analog
        self.batchnorm_folded, self.batchnorm_kept = batchnorm
        self.stateful = [m for m in model.modules() if isinstance(m, CallSiteModule)]
        for m in self.stateful:
            m.sim = sim
        self._traced: set[tuple] = set()  # input signatures whose flow was traced (and passed)
        first = next((m.layer for m in model.modules() if isinstance(m, Synapse)), None)
        # (rank, channels) the first layer expects, for clear input errors; None: not a conv
        self._input_spec = (len(first.kernel_size) + 2, first.in_channels) if isinstance(first, _ConvNd) else None

    # --- public API ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every membrane, count and accumulator (``run`` and ``stream`` call it first)."""
        for m in self.stateful:
            m.reset()

    def neurons(self) -> list[tuple[str, nn.Module]]:
        """(module path, neuron) for every spiking neuron module."""
        return [(m.site_name, m) for m in self.stateful if isinstance(m, Neuron)]

    @torch.no_grad()
    def run(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", mode: str = "step",
            burst: int | None = None, max_sleep: int = 256, sleep_chunk: int = 8, record: bool = True,
            cancel: threading.Event | None = None) -> RunResult:
        """Run the full schedule on ``x`` and return a ``RunResult`` (readouts summed, divided by ``wake``).

        ``wake``: wake steps (default: the QANN's largest level count L). ``sleep``: a number of sleep
        steps, or ``"auto"`` to stop each sample at its first sleep step in which no neuron fires, at most
        ``max_sleep``. ``burst``: spikes a neuron may emit in one sleep step (default ``wake``: a whole
        residual at once; 1 is the paper's form). ``record``: count spikes, SOPs and MACs into
        ``result.stats``. ``cancel``: an event checked between steps; once set, ``RunCancelled`` is raised.
        """
        event = None
        for event in self._simulate(x, wake, sleep, mode, burst, max_sleep, sleep_chunk, record, cancel, stream=False):
            pass
        return event.result

    @torch.no_grad()
    def stream(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", burst: int | None = None,
               max_sleep: int = 256, record: bool = True, cancel: threading.Event | None = None) -> Iterator[StepEvent]:
        """Yield a ``StepEvent`` after every time step (step mode); the last one carries the ``RunResult``,
        equal to ``run``'s."""
        yield from self._simulate(x, wake, sleep, "step", burst, max_sleep, 1, record, cancel, stream=True)

    def forward(self, x: torch.Tensor, **kwargs) -> RunResult:
        return self.run(x, **kwargs)

    # --- the schedule --------------------------------------------------------------------

    def _check(self, x, wake, sleep, mode, burst, max_sleep, sleep_chunk) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if self._input_spec is not None:
            rank, channels = self._input_spec
            if x.dim() != rank:
                raise ValueError(f"input must be {rank}-D [batch, channels, *spatial] for this network, "
                                 f"got shape {tuple(x.shape)}")
            if x.shape[1] != channels:
                raise ValueError(f"input has {x.shape[1]} channels, the first layer expects {channels}")
        elif x.dim() < 2:
            raise ValueError(f"input must have a batch axis and features, got shape {tuple(x.shape)}")
        param = next(self.model.parameters(), None)
        if param is not None and (x.dtype != param.dtype or x.device != param.device):
            raise ValueError(f"input is {x.dtype} on {x.device} but the network is {param.dtype} on "
                             f"{param.device}; convert one of them (e.g. snn.to(x.dtype))")
        if wake is None:
            if self.levels is None:
                raise ValueError("wake is required: this network has no single quantization level count")
            wake = self.levels
        if isinstance(wake, bool) or not isinstance(wake, int) or wake < 1:
            raise ValueError(f"wake must be an integer >= 1, got {wake!r}")
        if sleep != "auto" and (isinstance(sleep, bool) or not isinstance(sleep, int) or sleep < 0):
            raise ValueError(f'sleep must be an integer >= 0 or "auto", got {sleep!r}')
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if burst is None:
            burst = wake
        for name, value in (("burst", burst), ("max_sleep", max_sleep), ("sleep_chunk", sleep_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return wake, burst

    def _forward_stack(self, x: torch.Tensor, sleeping: bool, wake_counts: list[int], batch: int,
                       first: bool = False):
        steps = len(wake_counts)
        self.sim.begin_stack(sleeping, wake_counts, batch, x.device)
        for m in self.stateful:
            m.begin_stack()
        recorder = self.sim.recorder
        if recorder is not None:
            recorder.begin_stack(steps)
        signature = (tuple(x.shape[1:]), x.dtype, x.device)
        if first and signature not in self._traced:
            # Learn which synapses receive spikes and refuse hidden non-linear functions and constants,
            # once per input signature (the module tree's flow does not change between runs).
            with SpikeFlowTrace(self.model) as trace:
                trace.mark(x, ANALOG)
                out = self.model(x)
            trace.raise_problems()
            self._traced.add(signature)
        else:
            out = self.model(x)
        if recorder is not None:
            recorder.end_stack()
        return out if steps == 1 else tree_map(lambda t: t.unflatten(0, (steps, -1)).sum(0), out)

    def _simulate(self, x, wake, sleep, mode, burst, max_sleep, sleep_chunk, record, cancel, stream):
        wake, burst = self._check(x, wake, sleep, mode, burst, max_sleep, sleep_chunk)
        self.reset()
        batch = x.shape[0]
        sim = self.sim
        sim.burst, sim.record = burst, record
        recorder = sim.recorder = StatsRecorder(batch) if record else None
        settled_at = torch.zeros(batch, dtype=torch.long)  # sleep steps up to the silent one; 0: not yet
        limit = max_sleep if sleep == "auto" else sleep
        total = None
        t = done = 0  # total steps, sleep steps

        def finished() -> bool:
            return done >= limit or (sleep == "auto" and bool((settled_at > 0).all()))

        def event(phase: str, k: int) -> StepEvent:
            ev = StepEvent(t=t, phase=phase, wake=k, readout=tree_map(lambda v: v / k, total),
                           spikes=recorder.spikes_per_step[-1] if record else None,
                           energy_pj=recorder.energy_pj_per_step[-1] if record else None,
                           settled=settled_at > 0)
            if k == wake and finished():
                sim.recorder = None
                used = torch.full_like(settled_at, done)
                if sleep == "auto":
                    used = torch.where(settled_at > 0, settled_at, used)
                steps_used = used + wake
                ev.result = RunResult(readout=ev.readout, wake=wake, steps=steps_used, settled=settled_at > 0,
                                      stats=recorder.summary(wake, steps_used) if record else None)
            return ev

        def check_cancel() -> None:
            if cancel is not None and cancel.is_set():
                sim.recorder = None
                raise RunCancelled(f"run cancelled after {t} time steps")

        if mode == "step":
            for k in range(1, wake + 1):
                check_cancel()
                total = accumulate(total, self._forward_stack(x, False, [k], batch, first=k == 1))
                t += 1
                if stream or (k == wake and finished()):
                    yield event("wake", k)
        else:
            stacked = x.unsqueeze(0).expand(wake, *x.shape).reshape(wake * batch, *x.shape[1:])
            total = accumulate(None, self._forward_stack(stacked, False, list(range(1, wake + 1)), batch, first=True))
            t = wake
            if finished():
                yield event("wake", wake)

        # Multistep with sleep="auto" grows its stacks 1, 2, 4, ... so that a network that settles
        # in a couple of steps does not compute a long stack of silent ones.
        chunk = 1 if mode == "step" or sleep == "auto" else sleep_chunk
        zeros = None
        while not finished():
            check_cancel()
            steps = min(chunk, limit - done)
            if mode == "multistep":
                chunk = min(2 * chunk, sleep_chunk)
            if zeros is None or zeros.shape[0] != steps * batch:
                zeros = x.new_zeros((steps * batch, *x.shape[1:]))
            total = accumulate(total, self._forward_stack(zeros, True, [wake] * steps, batch))
            silent = ~sim.activity.cpu()  # [steps, batch]
            for s in range(steps):
                newly = silent[s] & (settled_at == 0)
                settled_at[newly] = done + s + 1
            done += steps
            t += steps
            if stream or finished():
                yield event("sleep", wake)
