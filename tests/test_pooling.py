"""LIPool: the cumulative output equals max-pool of the cumulative input, at every step."""

import pytest
import torch
from torch import nn

from detector.pooling import LIPool
from detector.state import SimulationState

POOLS = {
    "sppf k5 s1 p2": nn.MaxPool2d(5, 1, 2),
    "stem k3 s2 p1": nn.MaxPool2d(3, 2, 1),
    "k2 s2 ceil": nn.MaxPool2d(2, 2, ceil_mode=True),
    "adaptive": nn.AdaptiveMaxPool2d((2, 3)),
    "1d k3 s2": nn.MaxPool1d(3, 2),
}


def _inputs(pool, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (steps, 2, 3, 9) if isinstance(pool, nn.MaxPool1d) else (steps, 2, 3, 7, 9)
    return torch.randn(shape, generator=gen, dtype=torch.float64)  # signed, like spike sums


@pytest.mark.parametrize("name", list(POOLS))
def test_step_mode_cumulative_output_is_pool_of_cumulative_input(name):
    pool = POOLS[name]
    li = LIPool(pool)
    sim = SimulationState(record=False)
    li.sim = sim
    xs = _inputs(pool, 6, 1)
    total = 0
    for t in range(6):
        sim.begin_stack(sleeping=False, wake_counts=[t + 1], batch=2, device="cpu")
        li.begin_stack()
        total = total + li(xs[t])
        torch.testing.assert_close(total, pool(xs[: t + 1].sum(0)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(POOLS))
def test_multistep_equals_step_mode(name):
    pool = POOLS[name]
    xs = _inputs(pool, 5, 2)
    step, multi = LIPool(pool), LIPool(pool)
    sim = SimulationState(record=False)
    step.sim = multi.sim = sim
    outs = []
    for t in range(5):
        sim.begin_stack(sleeping=False, wake_counts=[t + 1], batch=2, device="cpu")
        step.begin_stack()
        outs.append(step(xs[t]))
    sim.begin_stack(sleeping=False, wake_counts=[1, 2, 3, 4, 5], batch=2, device="cpu")
    multi.begin_stack()
    stacked = multi(xs.flatten(0, 1)).unflatten(0, (5, 2))
    torch.testing.assert_close(stacked, torch.stack(outs), rtol=0, atol=1e-12)


def test_sleep_step_without_input_outputs_exact_zero():
    li = LIPool(nn.MaxPool2d(3, 2, 1))
    sim = SimulationState(record=False)
    li.sim = sim
    sim.begin_stack(sleeping=False, wake_counts=[1], batch=1, device="cpu")
    li.begin_stack()
    li(torch.randn(1, 2, 6, 6))
    sim.begin_stack(sleeping=True, wake_counts=[1], batch=1, device="cpu")
    li.begin_stack()
    assert torch.equal(li(torch.zeros(1, 2, 6, 6)), torch.zeros(1, 2, 3, 3))


def test_rejects_non_max_pool_and_indices():
    with pytest.raises(TypeError):
        LIPool(nn.AvgPool2d(2))
    with pytest.raises(ValueError, match="return_indices"):
        LIPool(nn.MaxPool2d(2, return_indices=True))
