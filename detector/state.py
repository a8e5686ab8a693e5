"""State shared by the spiking modules of one network, and per-call-site state storage.

The runtime runs the rewritten module tree once per *stack* of time steps: one step in
``"step"`` mode, several steps concatenated on the batch axis in ``"multistep"`` mode. Every
spiking module reads the schedule of the current stack from one ``SimulationState``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn


class Events(NamedTuple):
    """What a neuron tells the layers its output feeds (``SimulationState.publish``): its events per row
    (``[rows]``: a recorded count, exact in float32 or float64, or, unrecorded in a sleep step, any non-negative
    value that is zero exactly where the row is silent), and, when recording, at each position summed over channels
    (``[rows, positions]``, ``Synapse.events_per_position``'s count; None where every row is silent)."""

    per_position: torch.Tensor | None
    per_row: torch.Tensor


@dataclass
class SimulationState:
    """The schedule of the stack being run, and what the modules report back."""

    steps: int = 1  # time steps stacked on the batch axis (1 in step mode)
    sleeping: bool = False  # a stack is all wake steps or all sleep steps
    wake_counts: list[int] = field(default_factory=lambda: [1])  # wake count k at each stacked step
    burst: int = 1  # most spikes a neuron may emit in one sleep step
    # Sleep steps skip rows that carry no spike (synapses, LIPool). Off, every row is computed (the
    # result is the same): a step then does not depend on the data, so it can be traced (ONNX export).
    event_driven: bool = True
    batch: int = 1  # samples per step (rows of the network input / steps)
    record: bool = True  # collect spike / synaptic-op statistics
    recorder: object | None = None  # energy.StatsRecorder when record is on
    # Per stack: which (step, sample) saw any neuron or island output; drives sleep="auto".
    activity: torch.Tensor | None = None
    _published: dict = field(default_factory=dict)  # see publish

    def begin_stack(self, sleeping: bool, wake_counts: list[int], batch: int, device) -> None:
        self.steps, self.sleeping, self.wake_counts, self.batch = len(wake_counts), sleeping, wake_counts, batch
        self.activity = torch.zeros(self.steps, batch, dtype=torch.bool, device=device)
        self._published = {}

    def publish(self, output: torch.Tensor, events: Events) -> None:
        """A neuron's output and its events: a layer that receives this very tensor, unchanged since, takes them
        instead of passing over the tensor again (a synapse's skipped rows and synaptic operations). Kept for one
        stack; not for a tensor made under ``torch.inference_mode``, which keeps no version counter."""
        if output.is_inference():  # no version counter to tell an in-place change by: counted from the tensor
            return
        self._published[id(output)] = (weakref.ref(output), output._version, events)

    def published(self, x: torch.Tensor) -> Events | None:
        """What ``publish`` published for ``x``; None for any other tensor, or once ``x`` was changed in place (its
        version counter moved), or when the published tensor is gone and its id reused."""
        entry = self._published.get(id(x))
        if entry is None or entry[0]() is not x or entry[1] != x._version:
            return None
        return entry[2]

    def rows_per_step(self, x: torch.Tensor, site: str) -> int:
        """Rows of one step in a stacked input; refuses a layout that is not step-major by sample.

        Every spiking module sees ``steps * batch`` rows, step-major: anything else means the
        forward pass mixed samples or steps on the batch axis, which would silently merge states."""
        if x.dim() == 0 or x.shape[0] != self.steps * self.batch:
            rows = x.shape[0] if x.dim() else 0
            raise RuntimeError(
                f"{site}: input has {rows} rows where the network runs {self.steps} step(s) x {self.batch} "
                "sample(s); its forward moves data across the batch axis, which the simulator cannot follow")
        return self.batch

    def note_activity(self, per_row: torch.Tensor) -> None:
        """OR an activity flag per row ([steps * batch] or [steps, batch]) into the per-(step, sample) map."""
        self.activity |= per_row.view(self.steps, self.batch)


class CallSiteModule(nn.Module):
    """A spiking module that keeps one state per call within a time step.

    Detectors call one module several times per forward pass (a shared activation, a head
    applied to each pyramid level). Calls are numbered in order within each stack; the n-th
    call always gets the n-th state, because the forward pass is the same every step.
    """

    def __init__(self):
        super().__init__()
        self.sim: SimulationState | None = None
        self.site_name = ""
        self._states: list = []
        self._calls = 0

    # The call counter changes on every call of every step: written straight into the instance dict, since
    # nn.Module.__setattr__ first checks parameters, buffers and submodules (a few microseconds, ~300 times a step).
    def begin_stack(self) -> None:
        self.__dict__["_calls"] = 0

    def reset(self) -> None:
        self._states = []
        self.__dict__["_calls"] = 0

    @property
    def call_sites(self) -> int:
        return len(self._states)

    def site(self, index: int) -> str:
        return self.site_name if index == 0 else f"{self.site_name}#{index + 1}"

    def next_state(self, init):
        """(index, state) of this call; ``init()`` creates the state on the first step."""
        index = self._calls
        self.__dict__["_calls"] = index + 1
        if index == len(self._states):
            self._states.append(init())
        return index, self._states[index]
