"""The fused spike counter (detector/spike_counts.py): built here, it must give the eager counts bit for bit, in the
kernel and in whole recorded runs; where it cannot be built or is turned off, recording falls back to the eager
counts with a warning."""

import logging
import shutil

import pytest
import torch

from detector import convert, energy, spike_counts
from detector.randnet import random_qann

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")


@pytest.fixture(scope="module")
def counter():
    module = spike_counts.fused_counter()
    assert module is not None, "a C++ compiler is here, but the fused spike counter did not build (see the log)"
    return module


def eager_counts(spikes: torch.Tensor):
    """What the recorder's eager path computes (detector/neurons.py, Synapse.events_per_position)."""
    rows = spikes.shape[0]
    magnitude = spikes.abs()
    per_position = magnitude.sum(1).view(rows, -1)
    fired = (spikes != 0).to(spikes.dtype).sum(1).view(rows, -1)
    return per_position, per_position.sum(1), magnitude.view(rows, -1).amax(1), fired, fired.sum(1)


def spike_tensor(shape, seed, cap=4, density=0.3):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(-cap, cap + 1, shape, generator=generator).float()
    return counts * (torch.rand(shape, generator=generator) < density)


@needs_compiler
@pytest.mark.parametrize("shape", [(1, 16, 64, 64), (3, 5, 7, 9), (6, 32, 8, 8), (4, 100), (2, 3, 5000), (2, 4, 3, 3, 3)])
@pytest.mark.parametrize("bursting", [False, True])
def test_the_kernel_gives_the_eager_counts_bit_for_bit(counter, shape, bursting):
    spikes = spike_tensor(shape, seed=sum(shape))
    spikes[-1] = 0.0  # a silent row (the only one at batch 1)
    spikes.view(-1)[0] = -0.0
    per_position, per_row, peak, fired_at, fired_per_row, any_spike = counter.count_spikes(spikes, bursting)
    want_position, want_row, want_peak, want_fired_at, want_fired_row = eager_counts(spikes)
    assert per_position.dtype == per_row.dtype == torch.float32
    assert torch.equal(per_position, want_position) and torch.equal(per_row, want_row) and per_row[-1] == 0
    if bursting:
        assert torch.equal(peak, want_peak) and peak[-1] == 0
        assert torch.equal(fired_at, want_fired_at) and torch.equal(fired_per_row, want_fired_row)
        assert any_spike is (shape[0] > 1)
    else:  # one spike at most: no peak or fired counts to keep (the magnitudes are both)
        assert peak is None and fired_at is None and fired_per_row is None and any_spike is True
    events_at, events_per_row = counter.count_events(spikes)
    assert torch.equal(events_at, want_fired_at) and torch.equal(events_per_row, want_fired_row)


@needs_compiler
def test_the_kernel_sees_silence_and_passes_nan_on_as_eager_pytorch_does(counter):
    silent = torch.zeros(2, 8, 4, 4)
    *_, any_spike = counter.count_spikes(silent, True)
    assert any_spike is False
    broken = spike_tensor((2, 8, 4, 4), seed=1)
    broken[1, 3, 2, 2] = float("nan")
    _, per_row, peak, _, _, any_spike = counter.count_spikes(broken, True)
    assert any_spike is True and per_row[1].isnan() and peak[1].isnan() and not peak[0].isnan()
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensor"):
        counter.count_spikes(torch.zeros(2, 8, 4, 4, dtype=torch.float64), False)
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensor"):
        counter.count_spikes(torch.zeros(2, 8, 4, 4).transpose(2, 3), False)


@needs_compiler
def test_weighted_totals_give_the_eager_product_bit_for_bit(counter):
    events = spike_tensor((3, 4, 50, 50), seed=7, cap=8).abs().sum(1).view(3, -1)  # up to 32 per position
    targets = torch.randint(1, 9 * 512, (2500,), generator=torch.Generator().manual_seed(7)).double()
    totals = counter.weighted_totals(events, targets)
    assert totals.dtype == torch.float64 and torch.equal(totals, events.double() @ targets)
    with pytest.raises(RuntimeError, match="float64 CPU targets"):
        counter.weighted_totals(events, targets[:-1])


def run_stats(snn, x, levels, mode, burst):
    return snn.run(x, wake=levels, sleep="auto", mode=mode, burst=burst).stats


@needs_compiler
@pytest.mark.parametrize("mode", ["step", "multistep"])
@pytest.mark.parametrize("burst", [1, None])
def test_a_recorded_run_counts_the_same_with_the_kernel_and_without(counter, mode, burst, monkeypatch):
    """Random float32 nets with every block kind (pools, SPPF, split / concat, up / concat, residuals): every figure
    of a recorded run, layer by layer and step by step, is the same with the fused counter and with eager counts."""
    calls = []

    class Counting:
        def count_spikes(self, spikes, fired):
            calls.append(fired)
            return counter.count_spikes(spikes, fired)

        def count_events(self, x):
            calls.append("events")
            return counter.count_events(x)

        def weighted_totals(self, events, targets):
            calls.append("weighted")
            return counter.weighted_totals(events, targets)

    for seed, levels in ((3, 2), (11, 4), (19, 8)):
        snn = convert(random_qann(seed, levels=levels, depth=10))
        x = torch.rand(2, 3, 13, 13, generator=torch.Generator().manual_seed(seed)) * 2
        monkeypatch.setattr(energy, "fused_counter", lambda: Counting())
        fused = run_stats(snn, x, levels, mode, burst)
        monkeypatch.setattr(energy, "fused_counter", lambda: None)
        eager = run_stats(snn, x, levels, mode, burst)
        for name in ("spikes", "sops", "steps", "spikes_per_step", "sops_per_step", "peak_spikes_per_step",
                     "active_per_step", "energy_pj_per_step"):
            assert torch.equal(getattr(fused, name), getattr(eager, name)), name
        assert fused.spikes_per_layer == eager.spikes_per_layer and fused.sops_per_layer == eager.sops_per_layer
        assert fused.skipped_rows == eager.skipped_rows
    # neurons, inputs no neuron made (a concatenation), and fan-outs that differ by position
    assert False in calls and "events" in calls and "weighted" in calls and (burst == 1 or True in calls)


def test_the_kernel_serves_only_contiguous_float32_counts_below_2_to_the_24():
    """Other dtypes, layouts and sizes count with eager PyTorch (float32 sums are exact below 2**24 only)."""
    counter = object()
    assert spike_counts.counter_for(counter, torch.zeros(1, 2, dtype=torch.float64), 2) is None
    assert spike_counts.counter_for(counter, torch.zeros(1, 2, dtype=torch.float16), 2) is None
    assert spike_counts.counter_for(counter, torch.zeros(2, 2).t(), 2) is None
    assert spike_counts.counter_for(counter, torch.zeros(1, 2), 1 << 24) is None  # float32 would not be exact
    assert spike_counts.counter_for(counter, torch.zeros(1, 2), (1 << 24) - 1) is counter
    assert spike_counts.counter_for(None, torch.zeros(1, 2), 2) is None  # no counter (a GPU run, or not built)
    assert energy.StatsRecorder(batch=1, device="meta").fused_counter is None  # recorders off the CPU have none


def test_without_the_kernel_recording_falls_back_to_eager_counts_and_says_why(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    spike_counts.built_counter.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="casc.detector"):
            assert spike_counts.fused_counter() is None
        assert "could not be built (RuntimeError: Ninja is required" in caplog.text
        monkeypatch.setenv(spike_counts.DISABLE_ENV, "0")
        spike_counts.built_counter.cache_clear()
        assert spike_counts.fused_counter() is None and spike_counts.built_counter.cache_info().currsize == 0
        monkeypatch.setenv(spike_counts.DISABLE_ENV, "1")
        monkeypatch.setenv("CXX", "/nonexistent/c++")
        with caplog.at_level(logging.WARNING, logger="casc.detector"):
            assert spike_counts.fused_counter() is None
        assert "no C++ compiler (/nonexistent/c++) on PATH" in caplog.text
        monkeypatch.setenv(spike_counts.DISABLE_ENV, "0")
        snn = convert(random_qann(5, levels=4, depth=6))
        stats = snn.run(torch.rand(1, 3, 9, 9) * 2, wake=4).stats
        assert stats.spikes.item() > 0 and stats.sops.item() > 0
    finally:
        spike_counts.built_counter.cache_clear()


@needs_compiler
def test_counting_silent_steps_anyway_gives_the_same_figures_with_the_kernel(counter, monkeypatch):
    """A recorder that may not read counts back (``may_sync`` off, as on a GPU) counts silent sleep steps instead of
    skipping them; with the kernel too, the figures are those of skipping them."""
    init = energy.StatsRecorder.__init__
    snn = convert(random_qann(13, levels=4, depth=10))
    x = torch.rand(2, 3, 13, 13, generator=torch.Generator().manual_seed(13)) * 2
    runs = []
    for may_sync in (True, False):
        def recorder(self, *args, on=may_sync, **kwargs):
            init(self, *args, **kwargs)
            self.may_sync = on
            assert self.fused_counter is counter

        monkeypatch.setattr(energy.StatsRecorder, "__init__", recorder)
        runs.append(snn.run(x, wake=4, sleep="auto").stats)
    skipping, counting = runs
    for name in ("spikes_per_step", "sops_per_step", "peak_spikes_per_step", "active_per_step", "steps"):
        assert torch.equal(getattr(skipping, name), getattr(counting, name)), name
    assert skipping.sops_per_layer == counting.sops_per_layer and skipping.spikes_per_layer == counting.spikes_per_layer
