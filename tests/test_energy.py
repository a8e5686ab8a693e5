"""Spike, synaptic-operation and MAC counting, the energy estimate, event-driven skipping."""

import pytest
import torch
from torch import nn

from detector import ClipQuan, convert, count_macs
from detector.energy import PJ_PER_MAC, PJ_PER_SOP
from detector.state import SimulationState
from detector.synapses import Synapse


class Recorder:
    def __init__(self):
        self.calls = []

    def record_synapse(self, site, macs_per_row, ops, analog, skipped_rows):
        self.calls.append((macs_per_row, ops, analog, skipped_rows))


def synapse_with(layer, analog_input=False, sleeping=False):
    syn = Synapse(layer)
    syn.sim = SimulationState(record=True, recorder=Recorder())
    syn.sim.begin_stack(sleeping=sleeping, wake_counts=[1], batch=1, device="cpu")
    syn.note_input_kind(spikes=not analog_input)  # what the run's flow trace tells it
    return syn


def test_conv_synaptic_ops_use_the_real_fan_out():
    conv = nn.Conv2d(2, 5, 3, padding=1, bias=False)
    syn = synapse_with(conv)
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0] = 1.0  # corner: read by 2x2 output positions
    x[0, 1, 1, 1] = -1.0  # inside: read by 3x3 output positions (a negative spike is an event too)
    syn(x)
    _, ops, analog, _ = syn.sim.recorder.calls[0]
    assert analog is None
    assert ops.item() == (4 + 9) * 5


def test_strided_conv_fan_out():
    syn = synapse_with(nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False))
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0  # taps of output (0,0),(0,1),(1,0),(1,1)
    x[0, 0, 2, 2] = 1.0  # taps of output (1,1) only
    syn(x)
    assert syn.sim.recorder.calls[0][1].item() == 4 + 1


def test_linear_ops_and_analog_macs():
    syn = synapse_with(nn.Linear(6, 3))
    syn(torch.tensor([[0.0, 1.0, 0.0, -1.0, 0.0, 1.0]]))
    assert syn.sim.recorder.calls[0][1].item() == 3 * 3
    analog = synapse_with(nn.Linear(6, 3), analog_input=True)
    analog(torch.rand(2, 6))
    macs_per_row, ops, macs, _ = analog.sim.recorder.calls[0]
    assert ops is None and macs_per_row == 18 and macs.tolist() == [[18.0, 18.0]]


def test_sleep_rows_without_events_are_skipped_and_exactly_zero():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    syn = synapse_with(conv)
    syn(torch.rand(2, 2, 5, 5))  # wake: learns the output shape
    syn.sim.begin_stack(sleeping=True, wake_counts=[1], batch=2, device="cpu")
    x = torch.zeros(2, 2, 5, 5)
    x[1, 0, 2, 2] = 1.0
    y = syn(x)
    assert torch.equal(y[0], torch.zeros(3, 5, 5))  # skipped row: zero, no bias
    torch.testing.assert_close(y[1:], nn.functional.conv2d(x[1:], conv.weight, padding=1))  # bias off
    assert syn.sim.recorder.calls[-1][3].item() == 1


def test_run_stats_energy_and_counts():
    torch.manual_seed(0)
    qann = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4), nn.Conv2d(4, 2, 1)).double().eval()
    snn = convert(qann)
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    snn.run(x, wake=4, sleep="auto")
    stats = snn.last_stats
    steps = int(snn.last_steps.max())
    # analog MACs: the first conv on the image in each of the 4 wake steps (sleep input is zero: skipped)
    assert stats.analog_macs.tolist() == [4 * 4 * 25 * 27] * 2
    assert stats.ann_macs == 4 * 25 * 27 + 2 * 25 * 4
    assert stats.spikes.sum().item() == sum(stats.spikes_per_layer.values()) == stats.spikes_per_step.sum().item()
    assert stats.sops.sum().item() == pytest.approx(stats.spikes.sum().item() * 2)  # 1x1 conv, fan-out 2
    torch.testing.assert_close(stats.energy_pj, stats.sops * PJ_PER_SOP + stats.analog_macs * PJ_PER_MAC)
    assert stats.ann_energy_pj == stats.ann_macs * PJ_PER_MAC
    rate = stats.firing_rates["1"]
    assert rate == pytest.approx(stats.spikes_per_layer["1"] / (4 * 25 * 2 * steps))
    summary = stats.as_dict()
    assert summary["energy_ratio"] == pytest.approx(float(stats.energy_ratio.mean()))
    assert stats.skipped_rows > 0  # the first conv in every sleep step


def test_recording_can_be_switched_off_without_changing_results():
    torch.manual_seed(0)
    qann = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4), nn.Conv2d(4, 2, 1)).double().eval()
    snn = convert(qann)
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    a = snn.run(x, record=True)
    b = snn.run(x, record=False)
    assert torch.equal(a, b) and snn.last_stats is None


def test_count_macs_of_an_ann():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    assert count_macs(model, torch.rand(2, 3, 8, 8)) == 2 * (8 * 16 * 27 + 128 * 10)


def test_synapse_fed_by_a_synapse_does_macs_not_synaptic_ops():
    """FPN-style: spikes -> 1x1 conv -> (analog sum) -> 3x3 conv: the second conv sees no spikes."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.act = nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4)
            self.lateral, self.smooth = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x):
            spikes = self.act(self.stem(x))
            return self.smooth(self.lateral(spikes) + nn.functional.interpolate(self.lateral(spikes), scale_factor=1.0))

    torch.manual_seed(0)
    snn = convert(Chain().double().eval())
    snn.run(torch.rand(1, 3, 5, 5, dtype=torch.float64), wake=4, sleep=0)
    stats = snn.last_stats
    assert set(stats.sops_per_layer) == {"lateral"}  # the only synapse whose input is spikes
    assert stats.analog_macs.item() == 4 * (4 * 25 * 27 + 2 * 25 * 36)  # stem (image) and smooth (analog sum)


def test_energy_per_step_adds_up_to_the_run_total():
    from detector.randnet import random_qann

    qann = random_qann(7, levels=4, depth=12).double()
    snn = convert(qann)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    snn.run(x, wake=4, sleep=6, mode="multistep", sleep_chunk=4)
    stats = snn.last_stats
    assert stats.energy_pj_per_step.shape == (10, 2)
    torch.testing.assert_close(stats.energy_pj_until(10), stats.energy_pj)
    torch.testing.assert_close(stats.energy_pj_until(100), stats.energy_pj)
    assert float(stats.spikes_per_step[4:].sum()) > 0  # sleep steps fired ...
    assert bool((stats.energy_pj_until(4) < stats.energy_pj).all())  # ... and their synaptic operations count
