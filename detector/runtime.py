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
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .energy import RunStats, StatsRecorder
from .flow import ANALOG, SpikeFlowTrace
from .neurons import Neuron
from .options import MAX_SLEEP
from .schedule import (DeltaSession, RunCancelled, RunResult, StepEvent, check_int, check_schedule, last_result,
                       run_schedule)
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
        self.engine = TorchStepEngine(self)

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
            burst: int | None = None, max_sleep: int = MAX_SLEEP, sleep_chunk: int = 8, record: bool = True,
            cancel: threading.Event | None = None) -> RunResult:
        """Run the full schedule on ``x`` and return a ``RunResult`` (readouts summed, divided by ``wake``).

        ``wake``: wake steps (default: the QANN's largest level count L). ``sleep``: a number of sleep
        steps, or ``"auto"`` to stop each sample at its first sleep step in which no neuron fires, at most
        ``max_sleep``. ``burst``: spikes a neuron may emit in one sleep step (default ``wake``: a whole
        residual at once; 1 is the paper's form). ``record``: count spikes, SOPs and MACs into
        ``result.stats``. ``cancel``: an event checked between steps; once set, ``RunCancelled`` is raised.
        """
        return last_result(self._schedule(x, wake, sleep, mode, burst, max_sleep, sleep_chunk, record, cancel, False))

    @torch.no_grad()
    def stream(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", burst: int | None = None,
               max_sleep: int = MAX_SLEEP, record: bool = True,
               cancel: threading.Event | None = None) -> Iterator[StepEvent]:
        """Yield a ``StepEvent`` after every time step (step mode); the last one carries the ``RunResult``,
        equal to ``run``'s."""
        yield from self._schedule(x, wake, sleep, "step", burst, max_sleep, 1, record, cancel, True)

    def session(self, wake: int | None = None, burst: int | None = None, max_sleep: int = MAX_SLEEP, mode: str = "step",
                sleep_chunk: int = 8, record: bool = True, keyframe_every: int | None = None) -> "DeltaSession":
        """A delta session for the frames of a video (``schedule.DeltaSession``): ``session.run(frame)`` per frame;
        after the first, a frame feeds only its change and sleeps until quiet. Its readouts equal the QANN's
        outputs on every frame; ``keyframe_every``: run the whole schedule every that many frames (float32 drift)."""
        wake, burst = check_schedule(wake, "auto", burst, max_sleep, self.levels)
        self._check_mode(mode, sleep_chunk)
        return DeltaSession(self.engine, wake, burst, max_sleep=max_sleep, stack=mode == "multistep",
                            sleep_chunk=sleep_chunk, record=record, keyframe_every=keyframe_every)

    def forward(self, x: torch.Tensor, **kwargs) -> RunResult:
        return self.run(x, **kwargs)

    # --- checks --------------------------------------------------------------------------

    def check_input(self, x) -> None:
        """Refuse an input this network cannot take (type, rank, channels, dtype or device), naming what is wrong."""
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

    @staticmethod
    def _check_mode(mode: str, sleep_chunk: int) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_int("sleep_chunk", sleep_chunk, 1)

    def forward_stack(self, x: torch.Tensor, sleeping: bool, wake_counts: list[int], batch: int,
                      first: bool = False):
        """The module tree run once on a stack of ``len(wake_counts)`` steps (``x``: step-major rows); the readout
        increment summed over the stack's steps. ``first``: the run's first stack, whose flow is traced once per
        input signature."""
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
            spikes = recorder.end_stack()
            if sleeping:  # recording neurons leave their activity to the stack's counts: one comparison, not one each
                self.sim.note_activity(spikes > 0)
        return out if steps == 1 else tree_map(lambda t: t.unflatten(0, (steps, -1)).sum(0), out)

    def _schedule(self, x, wake, sleep, mode, burst, max_sleep, sleep_chunk, record, cancel, every_step):
        self.check_input(x)
        wake, burst = check_schedule(wake, sleep, burst, max_sleep, self.levels)
        self._check_mode(mode, sleep_chunk)
        return run_schedule(self.engine, x, wake, sleep, burst, max_sleep, stack_wake=mode == "multistep",
                            sleep_chunk=sleep_chunk if mode == "multistep" else 1, record=record, cancel=cancel,
                            every_step=every_step)


class TorchStepEngine:
    """The step engine of a ``SpikingNetwork`` (``schedule.StepEngine``): runs its module tree for one stack of
    steps; several steps stack on the batch axis (multistep), so stateless layers see them all at once."""

    max_stack = 1 << 30

    def __init__(self, net: SpikingNetwork):
        self.net = net
        self.runs = 0
        self.total = None  # readouts summed over the run's steps (the model's output structure)
        self.rows = 0
        self.device = torch.device("cpu")
        self._first = False
        self._zeros: torch.Tensor | None = None

    def _begin(self, record: bool) -> None:
        self.runs += 1
        self.net.sim.record = record
        self.net.sim.recorder = StatsRecorder(self.rows, self.device) if record else None

    def check_input(self, x) -> None:
        self.net.check_input(x)

    def start(self, x: torch.Tensor, record: bool) -> None:
        self.net.reset()
        self.total, self.rows, self.device, self._first, self._zeros = None, x.shape[0], x.device, True, None
        self._begin(record)

    def resume(self, record: bool) -> None:
        self._begin(record)

    @torch.no_grad()
    def step(self, x: torch.Tensor | None, sleeping: bool, wake_counts: list[int], burst: int) -> torch.Tensor:
        net, steps, rows = self.net, len(wake_counts), self.rows
        net.sim.burst = burst
        if x is None:
            if self._zeros is None or self._zeros.shape[0] != steps * rows or self._zeros.shape[1:] != self._shape:
                self._zeros = self._template.new_zeros((steps * rows, *self._shape))
            stacked = self._zeros
        else:
            self._template, self._shape = x, x.shape[1:]
            stacked = x if steps == 1 else x.unsqueeze(0).expand(steps, *x.shape).reshape(steps * rows, *x.shape[1:])
        out = net.forward_stack(stacked, sleeping, wake_counts, rows, first=self._first)
        self._first = False
        self.total = accumulate(self.total, out)
        return net.sim.activity.cpu() if sleeping else None

    def readout(self, k: int):
        return tree_map(lambda v: v / k, self.total)

    def step_figures(self):
        recorder = self.net.sim.recorder
        if recorder is None:
            return None, None
        return recorder.last_step()

    def finish(self, wake_steps: int, steps: torch.Tensor) -> RunStats | None:
        recorder, self.net.sim.recorder = self.net.sim.recorder, None
        return None if recorder is None else recorder.summary(wake_steps, steps)

    def save(self):
        # reset() gives every module new state lists, so these references stay as they are now
        return [m._states for m in self.net.stateful], self.total, self.rows, self._template, self._shape

    def load(self, saved) -> None:
        states, self.total, self.rows, self._template, self._shape = saved
        for m, s in zip(self.net.stateful, states):
            m._states = s
