"""LIPool: max-pooling for spikes whose cumulative output is the max-pool of the cumulative input.

Each step it outputs the increase of ``pool(X)`` where ``X`` is the cumulative input, so after
any number of steps the cumulative output equals ``pool(X)`` exactly (it telescopes).
"""

from __future__ import annotations

import torch
from torch import nn

from .state import CallSiteModule

MAX_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


class LIPool(CallSiteModule):
    """Wraps a max-pool module (any kernel, stride, padding, dilation, ceil_mode, adaptive)."""

    kind = "lipool"

    def __init__(self, pool: nn.Module):
        super().__init__()
        if not isinstance(pool, MAX_POOLS):
            raise TypeError(f"LIPool wraps a max-pool module, got {type(pool).__name__}")
        if getattr(pool, "return_indices", False):
            raise ValueError("LIPool: max-pool with return_indices=True is not supported")
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sim = self.sim
        steps = sim.steps
        rows = sim.rows_per_step(x, self.site(self._calls))
        per_step = x.unflatten(0, (steps, rows))

        def init():
            zero = torch.zeros_like(per_step[0])
            return [zero, self.pool(zero)]  # cumulative input X, cumulative output pool(X)

        _, state = self.next_state(init)
        cumulative_in, cumulative_out = state
        if steps == 1:
            if sim.sleeping and sim.event_driven and not x.any():  # nothing arrives, nothing changes
                return torch.zeros_like(cumulative_out)
            cumulative_in.add_(per_step[0])
            pooled = self.pool(cumulative_in)
            out = (pooled - cumulative_out).unsqueeze(0)
        else:
            # Prepend the carried state so the additions happen in step mode's order.
            running = torch.cumsum(torch.cat([cumulative_in.unsqueeze(0), per_step]), 0)[1:]
            pooled_all = self.pool(running.flatten(0, 1)).unflatten(0, (steps, rows))
            out = torch.diff(pooled_all, dim=0, prepend=cumulative_out.unsqueeze(0))
            cumulative_in.copy_(running[-1])
            pooled = pooled_all[-1]
        state[1] = pooled
        return out.flatten(0, 1)
