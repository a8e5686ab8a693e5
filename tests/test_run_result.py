"""What ``SpikingNetwork.run`` returns (``RunResult``), what ``stream`` ends with, and cancelling a run.

Nothing is left on the network between runs: every figure of a run is in its result.
"""

import threading

import pytest
import torch

from detector import convert
from detector.randnet import random_qann
from detector.runtime import RunCancelled, RunResult, SpikingNetwork


def net(seed=8, depth=12):  # with burst=1 its three samples settle after 3, 6 and 4 sleep steps
    qann = random_qann(seed, levels=4, depth=depth).double()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2
    return qann, convert(qann), x


def max_error(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a, b))


def test_run_returns_a_result_and_leaves_nothing_on_the_network():
    _, snn, x = net()
    res = snn.run(x, wake=4, sleep="auto")
    assert isinstance(res, RunResult) and res.wake == 4
    assert res.steps.shape == res.settled.shape == (3,) and res.settled.dtype == torch.bool
    assert res.stats is not None and torch.equal(res.stats.steps, res.steps) and res.stats.wake == 4
    for gone in ("last_stats", "last_steps", "last_settled"):
        assert not hasattr(snn, gone) and not hasattr(SpikingNetwork, gone)
    # a second run of other inputs does not touch the first result
    steps, spikes = res.steps.clone(), res.stats.spikes.clone()
    snn.run(x[:1] * 0.5, wake=4, sleep=2)
    assert torch.equal(res.steps, steps) and torch.equal(res.stats.spikes, spikes)


def test_fixed_sleep_and_auto_sleep_steps_and_settled():
    qann, snn, x = net()
    reference = qann(x)
    auto = snn.run(x, wake=4, sleep="auto", burst=1)
    assert bool(auto.settled.all()) and max_error(auto.readout, reference) <= 1e-6
    sleeps = auto.steps - 4  # sleep steps up to and including the silent one, per sample
    assert bool((sleeps >= 1).all()) and len(set(sleeps.tolist())) > 1, "samples should settle at different steps"

    # no sleep: wake steps only, nobody confirmed a fixed point
    awake = snn.run(x, wake=4, sleep=0, burst=1)
    assert torch.equal(awake.steps, torch.full((3,), 4)) and not bool(awake.settled.any())
    # a fixed count: every sample takes every step; settled = a silent step happened within them
    for count in sorted({0, 1, *sleeps.tolist(), int(sleeps.max()) + 3}):
        fixed = snn.run(x, wake=4, sleep=count, burst=1)
        assert torch.equal(fixed.steps, torch.full((3,), 4 + count)), count
        assert torch.equal(fixed.settled, sleeps <= count), count
        if count >= int(sleeps.max()):  # past the fixed point nothing changes: the same readouts as auto
            assert max_error(fixed.readout, auto.readout) <= 1e-12
    # auto capped below a sample's settle step: that sample is reported unsettled, at the cap
    cap = int(sleeps.min())
    capped = snn.run(x, wake=4, sleep="auto", burst=1, max_sleep=cap)
    assert torch.equal(capped.settled, sleeps <= cap)
    assert torch.equal(capped.steps, torch.minimum(auto.steps, torch.full((3,), 4 + cap)))
    # in multistep mode too (auto grows its stacks, yet counts each sample's own silent step)
    multi = snn.run(x, wake=4, sleep="auto", burst=1, mode="multistep", sleep_chunk=8)
    assert torch.equal(multi.steps, auto.steps) and torch.equal(multi.settled, auto.settled)


@pytest.mark.parametrize("sleep", [0, 5, "auto"])
@pytest.mark.parametrize("burst", [1, None])
def test_stream_last_event_carries_the_run_result(sleep, burst):
    _, snn, x = net(11, depth=12)
    run = snn.run(x, wake=4, sleep=sleep, burst=burst)
    events = list(snn.stream(x, wake=4, sleep=sleep, burst=burst))
    assert all(e.result is None for e in events[:-1])
    res = events[-1].result
    assert isinstance(res, RunResult) and len(events) == int(run.steps.max())
    assert max_error(res.readout, run.readout) == 0 and max_error(events[-1].readout, run.readout) == 0
    assert torch.equal(res.steps, run.steps) and torch.equal(res.settled, run.settled) and res.wake == run.wake
    assert torch.equal(res.settled, events[-1].settled)
    for key in ("spikes", "sops", "analog_macs", "spikes_per_step", "energy_pj_per_step"):
        assert torch.equal(getattr(res.stats, key), getattr(run.stats, key)), key
    # the per-step figures of the events are the result's rows
    torch.testing.assert_close(torch.stack([e.spikes for e in events]), res.stats.spikes_per_step, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack([e.energy_pj for e in events]), res.stats.energy_pj_per_step, rtol=0,
                               atol=0)
    torch.testing.assert_close(sum(e.spikes for e in events), run.stats.spikes, rtol=0, atol=0)


def test_cancel_from_inside_the_stream_stops_it_between_steps():
    _, snn, x = net()
    cancel = threading.Event()
    seen = []
    with pytest.raises(RunCancelled):
        for ev in snn.stream(x, wake=4, sleep="auto", cancel=cancel):
            seen.append(ev.t)
            if ev.t == 2:
                cancel.set()
    assert seen == [1, 2]  # no event after the one that set it
    assert issubclass(RunCancelled, RuntimeError)
    # in the sleep phase as well
    cancel.clear()
    seen.clear()
    with pytest.raises(RunCancelled):
        for ev in snn.stream(x, wake=4, sleep="auto", burst=1, cancel=cancel):
            seen.append(ev.t)
            if ev.t == 5:
                cancel.set()
    assert seen == [1, 2, 3, 4, 5]
    # the network is usable afterwards, and an unset event changes nothing
    full = snn.run(x, wake=4, sleep="auto", cancel=threading.Event())
    plain = snn.run(x, wake=4, sleep="auto")
    assert max_error(full.readout, plain.readout) == 0 and torch.equal(full.steps, plain.steps)
    assert torch.equal(full.stats.spikes_per_step, plain.stats.spikes_per_step)


@pytest.mark.parametrize("mode", ["step", "multistep"])
def test_cancel_set_during_a_run_raises(mode):
    _, snn, x = net()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RunCancelled):
        snn.run(x, wake=4, sleep="auto", mode=mode, cancel=cancel)
    # set while the run is under way (here: by the network's own forward during the first stack)
    cancel = threading.Event()
    calls = []
    first = next(m for m in snn.model.modules() if type(m).__name__ == "Synapse")

    def hook(module, inputs, output):
        calls.append(1)
        cancel.set()

    handle = first.register_forward_hook(hook)
    try:
        with pytest.raises(RunCancelled):
            snn.run(x, wake=4, sleep="auto", mode=mode, cancel=cancel)
    finally:
        handle.remove()
    assert len(calls) == 1  # stopped before the next stack


@pytest.mark.parametrize("burst", [1, None])
def test_multistep_auto_sleep_records_one_row_per_step_of_the_run(burst):
    _, snn, x = net()
    step = snn.run(x, wake=4, sleep="auto", burst=burst)
    multi = snn.run(x, wake=4, sleep="auto", burst=burst, mode="multistep", sleep_chunk=8)
    assert torch.equal(multi.steps, step.steps)
    total = int(step.steps.max())
    assert step.stats.spikes_per_step.shape == (total, 3)
    assert multi.stats.spikes_per_step.shape == multi.stats.energy_pj_per_step.shape == (total, 3)
    assert multi.stats.firing_rates == pytest.approx(step.stats.firing_rates)
