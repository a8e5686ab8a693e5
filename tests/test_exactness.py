"""CASC exactness: with wake = L and sleep="auto" the readouts equal the QANN's outputs (float64).

240 seeded random QANNs (conv, linear, BN with random statistics, residual add, concat, split,
nearest upsample, max-pool, avg-pool, unfoldable BN; depth 2..20; L in {2, 4, 8}; batch 3),
each in both execution modes. Ablations on the same nets show the test can tell the method
from a near miss.
"""

import functools

import pytest
import torch

from detector import CIFNeuron, convert
from detector.errors import UnsupportedModuleError
from detector.quant import SignedClipQuan, qann_levels
from detector.randnet import random_qann

LEVELS = (2, 4, 8)
NETS_PER_CHUNK = 20
CHUNKS = [(L, chunk) for L in LEVELS for chunk in range(4)]  # 3 x 4 x 20 = 240 nets


def net_and_input(L, index):
    seed = 10_000 * L + index
    qann = random_qann(seed, levels=L, depth=2 + index % 19).double()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2
    return qann, x


def max_error(readout, reference):
    return max(float((a - b).detach().abs().max()) for a, b in zip(readout, reference))


@pytest.mark.parametrize("L,chunk", CHUNKS)
def test_readouts_equal_qann_in_both_modes(L, chunk):
    for index in range(chunk * NETS_PER_CHUNK, (chunk + 1) * NETS_PER_CHUNK):
        qann, x = net_and_input(L, index)
        reference = qann(x)
        snn = convert(qann)
        for mode in ("step", "multistep"):
            # the paper's sleep, one spike per neuron per step (burst sleep: the next test)
            res = snn.run(x, wake=L, sleep="auto", mode=mode, max_sleep=300, burst=1)
            readout = res.readout
            assert isinstance(readout, tuple) and len(readout) == 2  # the model's structure
            assert max_error(readout, reference) <= 1e-6, f"net {index} L={L} mode={mode}"
            assert bool(res.settled.all()), "auto sleep ended at its cap, not at a silent step"


@pytest.mark.parametrize("L", LEVELS)
def test_burst_sleep_is_exact_and_settles_fast(L):
    for index in range(20):
        qann, x = net_and_input(L, 500 + index)
        snn = convert(qann)
        res = snn.run(x, wake=L, sleep="auto", burst=L)
        assert max_error(res.readout, qann(x)) <= 1e-6 and bool(res.settled.all())
        # one sleep step discharges every residual per layer in turn: far fewer steps than depth
        assert int(res.steps.max()) - L <= 2 + (2 + (500 + index) % 19) // 2
        # burst defaults to the wake count: the same run
        default = snn.run(x, wake=L, sleep="auto")
        assert max_error(default.readout, res.readout) == 0 and torch.equal(default.steps, res.steps)
        assert torch.equal(default.stats.spikes, res.stats.spikes)


def test_one_spike_sleep_grows_with_depth_and_burst_sleep_does_not():
    """docs/method.md §4: with one spike per neuron per sleep step (burst=1) the sleep needed grows with depth; with
    burst = L a whole residual is discharged at once: one sleep step plus the silent one that confirms it."""
    single, burst = {}, {}
    for index in range(19):
        qann, x = net_and_input(4, 19 * 210 + index)  # depth 2 + index
        snn = convert(qann)
        one = snn.run(x, wake=4, sleep="auto", burst=1)
        full = snn.run(x, wake=4, sleep="auto", burst=4)
        assert bool(one.settled.all()) and bool(full.settled.all())
        assert max_error(one.readout, full.readout) <= 1e-9  # the same fixed point
        single[2 + index], burst[2 + index] = (one.steps - 4).tolist(), (full.steps - 4).tolist()
        assert all(b <= s for b, s in zip(burst[2 + index], single[2 + index]))
    mean = lambda table, depths: sum(sum(table[d]) for d in depths) / (3 * len(depths))  # noqa: E731
    shallow, deep = range(2, 8), range(14, 21)
    assert mean(single, deep) > mean(single, shallow) + 1, single
    assert max(max(v) for v in burst.values()) <= 2, burst


@pytest.mark.parametrize("ablation", ["no negative spikes", "no cap"])
def test_ablations_break_exactness_on_the_same_nets(ablation):
    neuron = functools.partial(CIFNeuron, **({"negative_spikes": False} if ablation == "no negative spikes"
                                             else {"spike_cap": False}))
    broken = 0
    nets = 30
    for index in range(nets):
        qann, x = net_and_input(4, index)
        full = convert(qann)
        assert max_error(full.run(x, wake=4, sleep="auto").readout, qann(x)) <= 1e-6
        partial = convert(qann, neuron=neuron)
        broken += max_error(partial.run(x, wake=4, sleep="auto", max_sleep=100).readout, qann(x)) > 1e-6
    assert broken >= nets // 2, f"{ablation}: only {broken}/{nets} nets lost exactness"


def test_step_and_multistep_agree_for_fixed_sleep_counts():
    for index in range(15):
        qann, x = net_and_input(4, 700 + index)
        snn = convert(qann)
        for sleep in (0, 3, 11):
            for burst in (1, 4):
                a = snn.run(x, wake=4, sleep=sleep, mode="step", burst=burst)
                b = snn.run(x, wake=4, sleep=sleep, mode="multistep", sleep_chunk=4, burst=burst)
                assert max_error(a.readout, b.readout) <= 1e-9
                assert torch.equal(a.stats.spikes, b.stats.spikes)
                assert torch.equal(a.stats.spikes_per_step, b.stats.spikes_per_step)
                for run in (a, b):  # a fixed count: every sample takes every step
                    assert torch.equal(run.steps, torch.full((3,), 4 + sleep)) and run.wake == 4
                    assert run.stats.spikes_per_step.shape == (4 + sleep, 3)


def test_auto_sleep_terminates_per_sample_and_reports_steps():
    qann, x = net_and_input(4, 19)  # depth 20
    snn = convert(qann)
    res = snn.run(x, wake=4, sleep="auto", burst=1)  # one spike per sleep step: samples differ
    steps = res.steps
    assert steps.shape == (3,) and bool((steps > 4).all()) and bool(res.settled.all())
    assert torch.equal(res.stats.steps, steps) and torch.equal(res.stats.sleep_steps, steps - 4)
    # the run lasts as long as its slowest sample, with one row per step
    assert res.stats.spikes_per_step.shape == (int(steps.max()), 3)
    # A sample's count is its own: running it alone gives the same number of steps.
    for i in range(3):
        alone = snn.run(x[i:i + 1], wake=4, sleep="auto", burst=1)
        assert int(alone.steps[0]) == int(steps[i]) and bool(alone.settled[0])


def test_auto_sleep_cap_is_reported_when_hit():
    for index in range(19, 400, 19):  # a deep net whose samples need at least 3 sleep steps (one spike each)
        qann, x = net_and_input(4, index)
        snn = convert(qann)
        if int(snn.run(x, wake=4, sleep="auto", burst=1).steps.min()) >= 7:
            break
    else:
        pytest.fail("no net needed 3 sleep steps")
    capped = snn.run(x, wake=4, sleep="auto", max_sleep=1, burst=1)
    assert not bool(capped.settled.any())
    assert torch.equal(capped.steps, torch.full((3,), 5))


def test_stream_events_in_order_and_final_equals_run():
    qann, x = net_and_input(4, 11)
    snn = convert(qann)
    expected = snn.run(x, wake=4, sleep="auto")
    events = list(snn.stream(x, wake=4, sleep="auto"))
    assert [e.t for e in events] == list(range(1, len(events) + 1))
    assert [e.phase for e in events[:4]] == ["wake"] * 4 and all(e.phase == "sleep" for e in events[4:])
    assert [e.wake for e in events] == [1, 2, 3, 4] + [4] * (len(events) - 4)
    assert len(events) == int(expected.steps.max())
    assert max_error(events[-1].readout, expected.readout) == 0
    assert events[-1].settled.all() and all(e.spikes is not None for e in events)


def test_float32_flips_are_rare_and_bounded():
    flips = 0
    for index in range(40):
        qann, x = net_and_input(4, 900 + index)
        q32 = qann.float()
        err = max_error(convert(q32).run(x.float(), wake=4, sleep="auto").readout, q32(x.float()))
        flips += err > 1e-4
    assert flips <= 4  # about 5 of 150 random nets flip in float32; they are reported by the fidelity table


@pytest.mark.parametrize("L", LEVELS)
@pytest.mark.parametrize("rounding", ["round", "floor"])
def test_signed_quantizers_are_reproduced_exactly(L, rounding):
    """SignedClipQuan (levels -L..L, for signals with no ReLU, e.g. FPN outputs) mixed into the random nets:
    exact in both modes, with one-spike and burst sleep, and for a first layer with more levels."""
    signed_sites = 0
    for index in range(20):
        seed = 10_000 * L + 3000 + index
        qann = random_qann(seed, levels=L, depth=2 + index % 19, rounding=rounding, signed=0.5,
                           first_levels=2 * L if index % 4 == 0 else None).double()
        signed_sites += sum(1 for m in qann.modules() if isinstance(m, SignedClipQuan))
        x = (torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) - 0.5) * 4
        snn = convert(qann)
        wake = qann_levels(qann)
        for mode in ("step", "multistep"):
            for burst in (1, wake):
                res = snn.run(x, wake=wake, sleep="auto", mode=mode, max_sleep=300, burst=burst)
                assert max_error(res.readout, qann(x)) <= 1e-6, f"net {index} L={L} {mode} burst={burst}"
                assert bool(res.settled.all())
    assert signed_sites >= 20


def test_signed_quantizer_needs_negative_counts():
    """Without the signed neuron (counts kept >= 0, the unsigned CIF) the same nets are not reproduced, so the
    test above can tell the signed neuron from the plain one; the IF baseline refuses a signed quantizer."""
    broken = 0
    for index in range(20):
        qann = random_qann(4000 + index, levels=4, depth=2 + index % 19, signed=0.5).double()
        x = (torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(index)) - 0.5) * 4
        snn = convert(qann)
        for neuron in snn.modules():
            if isinstance(neuron, CIFNeuron):
                neuron.signed = False
        broken += max_error(snn.run(x, wake=4, sleep="auto").readout, qann(x)) > 1e-6
    assert broken >= 10, broken
    signed = next(p for p, m in qann.named_modules() if isinstance(m, SignedClipQuan))
    with pytest.raises(UnsupportedModuleError, match=signed.replace(".", r"\.") + r".*signed quantizer"):
        convert(qann, neuron="if", thresholds={})
