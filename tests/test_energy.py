"""Spike, synaptic-operation and MAC counting, the energy estimate, event-driven skipping."""

import pytest
import torch
from torch import nn

from detector import ClipQuan, convert, count_macs
from detector.energy import PJ_PER_MAC, PJ_PER_SOP, StatsRecorder
from detector.state import SimulationState
from detector.synapses import Synapse


class Recorder:
    def __init__(self, rows=1):
        self.calls, self.rows = [], rows

    def record_synapse(self, site, macs_per_row, sops=None, sops_scale=1.0, computed_rows=None, skipped_rows=0):
        """Kept as (MACs per row, SOPs per row, dense MACs per row, rows skipped), as the real recorder sums them."""
        ops = None if sops is None else sops * sops_scale
        if sops is not None:
            dense = None
        elif computed_rows is None:
            dense = torch.full((self.rows,), float(macs_per_row), dtype=torch.float64)
        else:
            dense = computed_rows.double() * macs_per_row
        self.calls.append((macs_per_row, ops, dense, skipped_rows))

    def scratch(self, like):
        return torch.full_like(like, float("nan"))  # the counting must overwrite all of it

    fused_counter = None  # eager counts (tests/test_spike_counts.py compares the fused counter with them)


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
    analog.sim.recorder.rows = 2
    analog(torch.rand(2, 6))
    macs_per_row, ops, macs, _ = analog.sim.recorder.calls[0]
    assert ops is None and macs_per_row == 18 and macs.tolist() == [18.0, 18.0]


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
    assert syn.sim.recorder.calls[-1][3] == 1


def test_run_stats_energy_and_counts():
    torch.manual_seed(0)
    qann = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4), nn.Conv2d(4, 2, 1)).double().eval()
    snn = convert(qann)
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    res = snn.run(x, wake=4, sleep="auto")
    stats = res.stats
    steps = int(res.steps.max())
    assert torch.equal(stats.steps, res.steps) and stats.spikes_per_step.shape == (steps, 2)
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
    assert torch.equal(a.readout, b.readout) and a.stats is not None and b.stats is None
    assert torch.equal(a.steps, b.steps) and torch.equal(a.settled, b.settled)
    events = list(snn.stream(x, record=False))
    assert all(e.spikes is None and e.energy_pj is None for e in events) and events[-1].result.stats is None
    assert torch.equal(events[-1].result.readout, a.readout)


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
    stats = snn.run(torch.rand(1, 3, 5, 5, dtype=torch.float64), wake=4, sleep=0).stats
    assert set(stats.sops_per_layer) == {"lateral"}  # the only synapse whose input is spikes
    assert stats.analog_macs.item() == 4 * (4 * 25 * 27 + 2 * 25 * 36)  # stem (image) and smooth (analog sum)


def test_energy_per_step_adds_up_to_the_run_total():
    from detector.randnet import random_qann

    qann = random_qann(7, levels=4, depth=12).double()
    snn = convert(qann)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    stats = snn.run(x, wake=4, sleep=6, mode="multistep", sleep_chunk=4).stats
    assert stats.energy_pj_per_step.shape == (10, 2)
    torch.testing.assert_close(stats.energy_pj_until(10), stats.energy_pj)
    torch.testing.assert_close(stats.energy_pj_until(100), stats.energy_pj)
    assert float(stats.spikes_per_step[4:].sum()) > 0  # sleep steps fired ...
    assert bool((stats.energy_pj_until(4) < stats.energy_pj).all())  # ... and their synaptic operations count


class SharedModules(nn.Module):
    """One ClipQuan called three times and one conv applied to two inputs per forward (per time step)."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.act = ClipQuan(4)

    def forward(self, x):
        a = self.act(self.stem(x))
        b = self.act(self.mid(a))
        c = self.act(self.mid(b))
        return self.head(c) + self.head(a)


@pytest.mark.parametrize("sleep", [3, "auto"])
def test_shared_modules_give_one_row_per_time_step(sleep):
    torch.manual_seed(4)
    qann = SharedModules().double().eval()
    snn = convert(qann)
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    res = snn.run(x, wake=4, sleep=sleep)
    torch.testing.assert_close(res.readout, qann(x), rtol=0, atol=1e-9)
    stats = res.stats
    total = int(res.steps.max())  # the run lasts until its slowest sample is done
    assert total > 4 and (sleep == "auto" or total == 4 + sleep)
    assert stats.energy_pj_per_step.shape == (total, 3) and stats.spikes_per_step.shape == (total, 3)
    torch.testing.assert_close(stats.energy_pj_per_step.sum(0), stats.energy_pj)
    torch.testing.assert_close(stats.spikes_per_step.sum(0), stats.spikes)
    assert set(stats.spikes_per_layer) == {"act", "act#2", "act#3"}
    # the multistep run counts the same rows
    multi = snn.run(x, wake=4, sleep=sleep, mode="multistep", sleep_chunk=2).stats
    assert multi.energy_pj_per_step.shape == (total, 3)
    torch.testing.assert_close(multi.spikes_per_step, stats.spikes_per_step, rtol=0, atol=0)
    torch.testing.assert_close(multi.energy_pj_per_step, stats.energy_pj_per_step)

    # Streamed: one event per step; its per-sample spikes are what the neuron emitted in that step (counted
    # here from its outputs, independently of the recorder), and energy_pj_until(t) is the first t events' sum.
    (_, neuron), = snn.neurons()
    emitted = []
    hook = neuron.register_forward_hook(lambda m, i, out: emitted.append(out))  # counted outside the forward
    try:
        events = []
        for ev in snn.stream(x, wake=4, sleep=sleep):
            assert len(emitted) == 3  # three call sites in this step
            counted = sum(out.abs().flatten(1).sum(1) / neuron.threshold for out in emitted)
            torch.testing.assert_close(ev.spikes, counted.double(), rtol=0, atol=1e-9)
            emitted.clear()
            events.append(ev)
    finally:
        hook.remove()
    assert len(events) == total and all(ev.spikes.shape == ev.energy_pj.shape == (3,) for ev in events)
    final = events[-1].result.stats
    for t in range(1, total + 1):
        streamed = sum(ev.energy_pj for ev in events[:t])
        torch.testing.assert_close(stats.energy_pj_until(t), streamed)
        torch.testing.assert_close(final.energy_pj_until(t), streamed)
        torch.testing.assert_close(stats.spikes_per_step[t - 1], events[t - 1].spikes)
    torch.testing.assert_close(stats.energy_pj_until(total + 5), stats.energy_pj)


def test_per_step_energy_is_as_precise_as_the_total():
    torch.manual_seed(0)
    qann = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), ClipQuan(4), nn.Conv2d(64, 2, 1)).double().eval()
    x = torch.rand(1, 3, 97, 97, dtype=torch.float64)
    stats = convert(qann).run(x, wake=4, sleep="auto").stats
    macs = 64 * 97 * 97 * 27  # the first conv on the image, per wake step: 16 258 752 < 2**24
    assert stats.analog_macs.item() == 4 * macs
    # float64 throughout: the rows add up to the total within float64 rounding
    torch.testing.assert_close(stats.energy_pj_until(stats.energy_pj_per_step.shape[0]), stats.energy_pj,
                               rtol=1e-12, atol=0)


def test_horowitz_scaling_and_activation_bits():
    from detector.energy import HOROWITZ_45NM_PJ, activation_bits, int_mac_pj, int_mult_pj

    assert int_mult_pj(8, 8) == HOROWITZ_45NM_PJ["int8_mult"]
    # the a * b law from the 8-bit figure lands within 4 % of Horowitz's own 32-bit multiply
    assert int_mult_pj(32, 32) == pytest.approx(HOROWITZ_45NM_PJ["int32_mult"], rel=0.04)
    assert [activation_bits(L) for L in (1, 2, 4, 8, 15)] == [1, 2, 3, 4, 4]
    assert int_mac_pj(3) == pytest.approx(0.2 * 3 * 8 / 64 + 0.1)
    assert HOROWITZ_45NM_PJ["fp32_mult"] + HOROWITZ_45NM_PJ["fp32_add"] == pytest.approx(PJ_PER_MAC)
    assert HOROWITZ_45NM_PJ["fp32_add"] == PJ_PER_SOP


WORK = {"steps": 6.0, "binary_steps": 9.0, "neurons": 100.0, "neuron_updates": 600.0, "active_outputs": 150.0,
        "sops": 1000.0, "graded_sops": 200.0, "macs": 400.0, "ann_macs": 900.0, "ann_analog_macs": 100.0}


def test_integer_energy_prices_the_snn_against_its_qann():
    from detector.energy import integer_energy

    priced = integer_energy(WORK, levels=4)  # 3-bit activations: 0.175 pJ per MAC, int8 inputs 0.3 pJ
    qann = 800 * 0.175 + 100 * 0.3
    snn = 800 * 0.1 + 200 * 0.175 + 400 * 0.3
    assert priced["qann_pj"] == pytest.approx(qann) and priced["snn_pj"] == pytest.approx(snn)
    assert priced["ratio"] == pytest.approx(snn / qann) and priced["activation_bits"] == 3


def test_memory_traffic_counts_weight_reads_and_membrane_reads_and_writes():
    from detector.energy import memory_traffic

    mem = memory_traffic(WORK, levels=4)
    assert mem["weight_reads"] == 1400 and mem["membrane_reads"] == mem["membrane_writes"] == 600
    assert mem["membrane_reads_per_step"] == 100 and mem["weight_reads_per_step"] == pytest.approx(1400 / 6)
    per_bit = 10 / 64
    assert mem["snn_pj"] == pytest.approx((1400 * 8 + 2 * 600 * 32) * per_bit)
    assert mem["qann_pj"] == pytest.approx((900 * 8 + 2 * 100 * 3) * per_bit)


def test_neurobench_metrics_follow_its_definitions():
    from detector.energy import neurobench_metrics

    nb = neurobench_metrics(WORK)
    assert nb["activation_sparsity"] == pytest.approx(1 - 150 / 600)
    assert nb["Dense"] == 900 * 6  # every connection at every step
    assert nb["Effective_MACs"] == 400 + 200  # analog inputs and graded (multi-spike) steps
    assert nb["Effective_ACs"] == 1000 - 200


def test_workload_of_a_run_matches_its_counters():
    torch.manual_seed(0)
    qann = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4, threshold=1.0), nn.Conv2d(4, 2, 1)).double()
    snn = convert(qann)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    stats = snn.run(x, sleep="auto").stats
    work = stats.workload_until(100)
    assert torch.allclose(work["sops"], stats.sops) and torch.allclose(work["macs"], stats.analog_macs)
    assert (work["neurons"] == 4 * 8 * 8).all() and torch.equal(work["neuron_updates"], 256 * stats.steps.double())
    assert torch.equal(work["ann_analog_macs"], torch.full((2,), 4 * 8 * 8 * 27.0, dtype=torch.float64))
    assert (work["active_outputs"] <= stats.spikes).all() and (work["active_outputs"] > 0).all()
    first = stats.workload_until(1)
    assert (first["steps"] == 1).all() and torch.equal(first["macs"], work["ann_analog_macs"])


@pytest.mark.parametrize("mode", ["step", "multistep"])
@pytest.mark.parametrize("burst", [1, None])
def test_synapses_fed_by_a_neuron_count_the_events_it_published_exactly(mode, burst, monkeypatch):
    """A synapse that receives a neuron's output counts its SOPs, and in a sleep step skips its silent rows, from
    what the neuron published; counting from the tensor itself (as for any other input) must give the same figures,
    layer by layer and step by step, and the same run, recorded or not."""
    from detector.randnet import random_qann

    published_of, used = SimulationState.published, []
    for seed, levels in ((3, 2), (11, 4), (19, 8)):  # random nets: pools, SPPF, split / concat, up / concat, residuals
        qann = random_qann(seed, levels=levels, depth=10).double()
        snn = convert(qann)
        x = torch.rand(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2
        runs = {}
        for way, lookup in (("published", lambda self, t: used.append(published_of(self, t)) or used[-1]),
                            ("counted", lambda self, t: None)):
            monkeypatch.setattr(SimulationState, "published", lookup)
            runs[way] = [snn.run(x, wake=levels, sleep="auto", mode=mode, burst=burst, record=record)
                         for record in (True, False)]
        (published, published_off), (counted, counted_off) = runs["published"], runs["counted"]
        assert published.stats.sops_per_layer == counted.stats.sops_per_layer
        assert torch.equal(published.stats.sops_per_step, counted.stats.sops_per_step)
        assert torch.equal(published.stats.spikes_per_step, counted.stats.spikes_per_step)
        assert published.stats.skipped_rows == counted.stats.skipped_rows > 0
        for a, b in ((published, counted), (published_off, counted_off), (published, published_off)):
            assert torch.equal(a.readout[0], b.readout[0]) and torch.equal(a.steps, b.steps)
    assert any(e is not None and e.per_position is not None for e in used)  # recorded: counts published
    assert any(e is not None and e.per_position is None for e in used)  # unrecorded sleep: silent rows published
    assert any(e is None for e in used)  # and inputs no neuron made as they are (both ways were taken)


def test_published_events_are_forgotten_once_the_tensor_changes():
    from detector.state import Events

    sim = SimulationState()
    sim.begin_stack(sleeping=False, wake_counts=[1], batch=1, device="cpu")
    out = torch.ones(1, 2, 3, 3)
    events = Events(torch.full((1, 9), 2.0), torch.full((1,), 18.0, dtype=torch.float64))
    sim.publish(out, events)
    assert sim.published(out) is events
    assert sim.published(out.clone()) is None and sim.published(out.view(1, 2, 9)) is None
    out.mul_(0)  # changed in place: what was published no longer describes it
    assert sim.published(out) is None
    sim.publish(out, events)
    sim.begin_stack(sleeping=False, wake_counts=[1], batch=1, device="cpu")  # kept for one stack only
    assert sim.published(out) is None


def test_a_recorded_run_under_inference_mode_counts_the_same():
    """Inference tensors keep no version counter: their events are counted from the tensor, to the same figures."""
    from detector.randnet import random_qann

    snn = convert(random_qann(11, levels=4, depth=8).double())
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = snn.run(x, wake=4, sleep="auto").stats
    with torch.inference_mode():
        stats = snn.run(x, wake=4, sleep="auto").stats
    assert stats.sops_per_layer == expected.sops_per_layer and torch.equal(stats.sops_per_step, expected.sops_per_step)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_events_per_row_count_every_non_zero_input_exactly(dtype):
    """Summed in float32 below 2**24 elements per row (float64 for a float64 input), in float64 from there (a row of
    2**24 + 1 events is not exact in float32)."""
    x = torch.zeros(3, 4, 5, 6, dtype=dtype)
    x[0, 1, 2, 3], x[0, 3, 0, 0], x[2, :, 1] = 2.0, -1.0, 1.0
    counted = Synapse.events_per_row(x)
    assert counted.tolist() == [2.0, 0.0, 24.0]
    assert counted.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(counted.double(), Synapse.events_per_position(x).sum(1, dtype=torch.float64))
    big = torch.ones(1, 1, (1 << 24) + 1, dtype=dtype)
    counted = Synapse.events_per_row(big)
    assert counted.dtype == torch.float64 and counted.item() == (1 << 24) + 1


def test_row_totals_are_exact_on_both_sides_of_2_to_the_24():
    from detector.energy import row_totals

    small = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert row_totals(small, most=8).tolist() == [7.0, 1.0] and row_totals(small, most=8).dtype == torch.float32
    big = torch.tensor([[float(1 << 24), 1.0]])  # 2**24 + 1: float32 rounds it to 2**24
    assert big.sum(1).item() == 1 << 24
    assert row_totals(big, most=(1 << 24) + 1).item() == (1 << 24) + 1


@pytest.mark.parametrize("mode", ["step", "multistep"])
def test_silent_layers_skipped_without_counting_give_the_figures_of_counting_them(mode, monkeypatch):
    """On the CPU a sleep-step layer whose output (or input) is silent skips its counting; counting it anyway, as on a
    GPU (``StatsRecorder.may_sync`` off), must give the same figures step by step and layer by layer."""
    from detector.randnet import random_qann

    skipped = {True: 0, False: 0}  # layer calls that skipped counting: silent outputs (only with syncs), silent inputs
    zero_rows, init = StatsRecorder.zero_rows, StatsRecorder.__init__

    def counted_zero_rows(self, rows):
        skipped[self.may_sync] += 1
        return zero_rows(self, rows)

    monkeypatch.setattr(StatsRecorder, "zero_rows", counted_zero_rows)
    for seed, levels in ((5, 2), (13, 4)):
        qann = random_qann(seed, levels=levels, depth=10).double()
        snn = convert(qann)
        x = torch.rand(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2
        runs = []
        for may_sync in (True, False):
            def recorder_that_may_sync(self, *args, on=may_sync, **kwargs):
                init(self, *args, **kwargs)
                self.may_sync = on

            monkeypatch.setattr(StatsRecorder, "__init__", recorder_that_may_sync)
            runs.append(snn.run(x, wake=levels, sleep="auto", mode=mode).stats)
        skipping, counting = runs
        for name in ("spikes_per_step", "sops_per_step", "peak_spikes_per_step", "active_per_step",
                     "energy_pj_per_step", "steps"):
            assert torch.equal(getattr(skipping, name), getattr(counting, name)), name
        assert skipping.spikes_per_layer == counting.spikes_per_layer
        assert skipping.sops_per_layer == counting.sops_per_layer
        assert skipping.skipped_rows == counting.skipped_rows
    assert skipped[True] > skipped[False] > 0  # both shortcuts were taken


def test_a_stack_of_counts_in_float32_and_float64_keeps_each_layer_its_own_figures():
    """The recorder stacks each dtype apart (``StatsRecorder.end_stack``); the layers must keep their own counts and
    scales whatever order that stacks them in."""
    recorder = StatsRecorder(batch=2)
    recorder.begin_stack(1)
    f32, f64 = torch.float32, torch.float64
    recorder.record_spikes("n1", torch.tensor([1.0, 2.0], dtype=f32), 10)
    recorder.record_spikes("n2", torch.tensor([30.0, 40.0], dtype=f64), 10)
    recorder.record_spikes("n3", torch.tensor([500.0, 600.0], dtype=f32), 10)
    recorder.record_synapse("s1", 0, sops=torch.tensor([1.0, 2.0], dtype=f32), sops_scale=3.0)
    recorder.record_synapse("s2", 0, sops=torch.tensor([10.0, 20.0], dtype=f64), sops_scale=1.0)
    recorder.record_synapse("s3", 0, sops=torch.tensor([100.0, 200.0], dtype=f32), sops_scale=5.0)
    assert recorder.end_stack().tolist() == [[531.0, 642.0]]  # spikes per (step, sample)
    stats = recorder.summary(wake=1, steps_used=torch.tensor([1, 1]))
    assert stats.spikes_per_layer == {"n1": 3.0, "n2": 70.0, "n3": 1100.0}
    assert stats.sops_per_layer == {"s1": 9.0, "s2": 30.0, "s3": 1500.0}
    assert stats.sops.tolist() == [3.0 + 10.0 + 500.0, 6.0 + 20.0 + 1000.0] and stats.sops.dtype == f64
