"""Analog islands: non-linear modules kept analog inside a spiking network (opt-in hybrid).

Each step an island emits ``k * f(X / k) - Y_prev``: ``X`` its cumulative input, ``k`` the wake
count, ``Y_prev`` its cumulative output so far. Its cumulative output is then ``k * f(X / k)``,
which at the fixed point is ``k * f(a)`` for the QANN's input ``a`` (``docs/method.md`` §2).
"""

from __future__ import annotations

import torch
from torch import nn

from .energy import MacCounter
from .state import CallSiteModule


class AnalogIsland(CallSiteModule):
    """Runs ``module`` on the running mean of its tensor inputs and emits output increments."""

    kind = "island"

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def _emit(self, state, inputs: list[torch.Tensor], k: int, kwargs):
        cumulative_in, previous = state
        for acc, x in zip(cumulative_in, inputs):
            acc.add_(x)
        out = self.module(*[acc / k for acc in cumulative_in], **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"analog island {self.site_name}: only modules returning one tensor are supported")
        total = out * k
        delta = total if previous is None else total - previous
        state[1] = total
        return delta

    def forward(self, *args, **kwargs):
        sim = self.sim
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if len(tensors) != len(args):
            raise TypeError(f"analog island {self.site_name}: positional arguments must be tensors")
        steps = sim.steps
        rows = sim.rows_per_step(tensors[0], self.site(self._calls))
        per_step = [t.unflatten(0, (steps, rows)) for t in tensors]
        index, state = self.next_state(lambda: [[torch.zeros_like(p[0]) for p in per_step], None])
        with MacCounter(self.module) as counter:
            outs = [self._emit(state, [p[t] for p in per_step], sim.wake_counts[t], kwargs) for t in range(steps)]
        if sim.record:
            sim.recorder.record_island(self.site(index), counter.macs, steps)
        out = torch.stack(outs)
        sim.note_activity(out.flatten(2).ne(0).any(2).flatten())
        return out.flatten(0, 1)
