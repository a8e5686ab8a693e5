"""CIF and IF neurons against hand-worked sequences (threshold 1 unless stated)."""

import pytest
import torch
from torch import nn

from detector import ClipQuan, convert
from detector.errors import UnsupportedModuleError
from detector.neurons import CIFNeuron, IFNeuron, QCFSNeuron
from detector.randnet import random_qann
from detector.state import SimulationState


def drive(neuron, currents, wake, burst=1):
    """Feed one scalar current per step (wake steps first) and return the signed outputs."""
    sim = SimulationState(record=False, burst=burst)
    neuron.sim = sim
    neuron.reset()
    outputs = []
    for t, current in enumerate(currents):
        sim.begin_stack(sleeping=t >= wake, wake_counts=[min(t + 1, wake)], batch=1, device="cpu")
        neuron.begin_stack()
        outputs.append(neuron(torch.tensor([[current]], dtype=torch.float64)).item())
    return outputs


def test_negative_spike_only_while_count_is_positive():
    # m: 1.2 -> fire (C=1, m=.2); .2-.9=-.7 -> negative spike (C=0, m=.3); sleep: nothing.
    assert drive(CIFNeuron(), [1.2, -0.9, 0, 0], wake=2) == [1, -1, 0, 0]
    # With no spike emitted yet, a negative membrane never spikes.
    assert drive(CIFNeuron(), [-0.5, -2.0, 0, 0], wake=2) == [0, 0, 0, 0]


def test_spikes_capped_at_wake_count():
    # 3.0 would be three spikes, but k allows one in step 1 and two in all.
    assert drive(CIFNeuron(), [3.0, 0, 0, 0], wake=2) == [1, 1, 0, 0]


def test_wake_counter_frozen_during_sleep():
    # After 1 wake step the cap stays 1: the residual 1.5 may not fire in sleep.
    assert drive(CIFNeuron(), [2.5, 0, 0], wake=1) == [1, 0, 0]
    # An under-fired neuron catches up in sleep, up to floor(sum / theta) = 2.
    assert drive(CIFNeuron(), [0, 0, 2.5, 0, 0], wake=3) == [0, 0, 1, 1, 0]


def test_soft_reset_keeps_the_residual():
    neuron = CIFNeuron(threshold=0.5)
    assert drive(neuron, [0.8], wake=1) == [0.5]
    membrane, count = neuron._states[0]
    assert membrane.item() == pytest.approx(0.3)
    assert count.item() == 1


def test_burst_discharges_residual_in_one_sleep_step():
    currents = [0, 0, 0, 3.9, 0, 0, 0]
    assert drive(CIFNeuron(), currents, wake=4, burst=4) == [0, 0, 0, 1, 2, 0, 0]
    assert drive(CIFNeuron(), currents, wake=4, burst=1) == [0, 0, 0, 1, 1, 1, 0]


def test_fixed_point_count_is_clamped_floor_of_total_input():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        wake = int(torch.randint(1, 9, (1,), generator=gen))
        currents = (torch.randn(wake, generator=gen) * 1.5).tolist() + [0.0] * (3 * wake + 2)
        out = drive(CIFNeuron(), currents, wake=wake)
        expected = min(max(int(torch.floor(torch.tensor(sum(currents[:wake]), dtype=torch.float64))), 0), wake)
        assert sum(out) == expected


def test_if_neuron_soft_reset_sequence():
    # m: .625, 1.25 -> fire (.25), .875, 1.5 -> fire (.5), 1.125 -> fire (exact binary fractions)
    assert drive(IFNeuron([1.0]), [0.625] * 5, wake=5) == [0, 1, 0, 1, 1]


def test_if_neuron_never_spikes_negative_or_past_threshold_once_per_step():
    assert drive(IFNeuron([1.0]), [3.0, -5.0, 0.0], wake=3) == [1, 0, 0]


def test_neuron_keeps_one_state_per_call_site():
    neuron = CIFNeuron()
    sim = SimulationState(record=False)
    neuron.sim = sim
    sim.begin_stack(sleeping=False, wake_counts=[1], batch=1, device="cpu")
    neuron.begin_stack()
    a = neuron(torch.tensor([[0.7]], dtype=torch.float64))
    b = neuron(torch.tensor([[0.2]], dtype=torch.float64))
    assert neuron.call_sites == 2
    sim.begin_stack(sleeping=False, wake_counts=[2], batch=1, device="cpu")
    neuron.begin_stack()
    a = neuron(torch.tensor([[0.7]], dtype=torch.float64))  # site 1: 1.4 -> spike
    b = neuron(torch.tensor([[0.2]], dtype=torch.float64))  # site 2: 0.4 -> none
    assert (a.item(), b.item()) == (1.0, 0.0)


def test_invalid_thresholds_rejected():
    with pytest.raises(ValueError, match="threshold"):
        CIFNeuron(threshold=0)
    with pytest.raises(ValueError, match="thresholds"):
        IFNeuron([1.0, -2.0])


@pytest.mark.parametrize("rounding", ["round", "floor"])
def test_inputs_on_level_boundaries_quantize_alike_in_both_networks(rounding):
    """An input exactly on a level boundary (fp16 weights put many sums there) or within float error of one: the
    QANN computes z * L / theta, the CIF network sums it over the wake steps in another order. The shared tie
    margin makes both land on the same level."""
    levels = 3  # thirds are inexact in binary, so the two orders round differently
    quant = ClipQuan(levels, threshold=1.0, rounding=rounding).double()
    net = nn.Sequential(nn.Identity(), quant)
    shift = 0.5 if rounding == "round" else 0.0
    edges = torch.tensor([(k - shift) / levels for k in range(1, levels + 1)], dtype=torch.float64)
    z = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)]).view(-1, 1)
    snn = convert(net)
    got = snn.run(z, wake=levels, sleep="auto").readout
    assert torch.equal(got, net(z))


def one_layer_qann(levels: int) -> nn.Sequential:
    torch.manual_seed(3)
    layer = nn.Linear(5, 7).double()
    return nn.Sequential(layer, ClipQuan(levels, threshold=0.8, rounding="round").double()).eval()


def test_qcfs_is_an_if_neuron_precharged_to_half_threshold_with_no_negative_spikes_and_no_cap():
    neuron = QCFSNeuron(1.0)
    # m starts at 0.5: 0.3 -> 0.8 (no spike), 0.3 -> 1.1 (spike, 0.1 left), a negative current never spikes back
    assert drive(neuron, [0.3, 0.3, -2.0, -2.0], wake=4) == [0.0, 1.0, 0.0, 0.0]
    # no cap: m = 5.5 fires five spikes, past the wake count of 2, one per step
    assert drive(neuron, [5.0, 0.0, 0.0, 0.0, 0.0, 0.0], wake=2) == [1.0] * 5 + [0.0]
    assert drive(neuron, [0.0, 0.0, 3.0], wake=1, burst=3) == [0.0, 0.0, 1.0]  # one spike per step, even in sleep


def test_convert_qcfs_fires_the_rate_of_the_qcfs_staircase():
    """One layer with a constant current z: after T steps QCFS's readout is θ clamp(floor(T z / θ + 1/2), 0, T) / T,
    the QANN's output at T = L and a finer staircase at T = 2L, where CASC (wake = L) stays on the QANN."""
    qann = one_layer_qann(levels=4)
    x = torch.randn(64, 5, dtype=torch.float64)
    snn = convert(qann, neuron="qcfs")
    sites = [m for _, m in snn.neurons()]
    assert [type(m) for m in sites] == [QCFSNeuron] and sites[0].threshold == pytest.approx(0.8)
    z = qann[0](x)
    with torch.no_grad():
        for steps in (4, 8):
            expected = 0.8 * torch.clamp(torch.floor(steps * z / 0.8 + 0.5), 0, steps) / steps
            readout = snn.run(x, wake=steps, sleep=0).readout
            assert torch.allclose(readout, expected, atol=1e-12), steps
        assert torch.allclose(snn.run(x, wake=4, sleep=0).readout, qann(x), atol=1e-12)
        assert not torch.allclose(snn.run(x, wake=8, sleep=0).readout, qann(x), atol=1e-3)


def test_qcfs_refuses_signed_quantizers_with_the_reason():
    qann = random_qann(5, levels=4, depth=6, signed=1.0).double()
    with pytest.raises(UnsupportedModuleError, match="QCFS neurons fire positive spikes only"):
        convert(qann, neuron="qcfs")


def test_binary_equivalent_steps_count_the_largest_burst_of_each_step():
    """Burst sleep: a step in which some neuron emits k spikes counts k binary sub-steps; with one spike per
    step (the paper's schedule) binary-equivalent steps are the steps."""
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    found_burst = False
    for seed in range(4):
        snn = convert(random_qann(seed, levels=4, depth=8).double())
        burst = snn.run(x, sleep="auto")
        work = burst.stats.workload_until(64)
        peaks = burst.stats.peak_spikes_per_step
        assert torch.equal(work["steps"], burst.steps.double())
        assert torch.equal(work["binary_steps"], peaks.clamp(min=1).sum(0))
        assert (peaks[:4] <= 1).all() and (work["binary_steps"] >= work["steps"]).all()
        found_burst |= bool((work["binary_steps"] > work["steps"]).any())
        paper = snn.run(x, sleep=8, burst=1).stats.workload_until(12)
        assert torch.equal(paper["binary_steps"], paper["steps"]) and (paper["steps"] == 12).all()
    assert found_burst  # burst sleep does use multi-spike steps on these nets
