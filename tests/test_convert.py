"""Conversion: validation errors, call-site states, BN folding, analog islands, input checks."""

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detector import ClipQuan, UnsupportedModuleError, convert, fold_batchnorm, register_bn_pairs, to_qann
from detector.neuron_kinds import NEURON_KINDS, neuron_kind
from detector.neurons import CIFNeuron, QCFSNeuron
from detector.synapses import ChannelAffine, Synapse


def small_qann(levels=4):
    torch.manual_seed(0)
    return to_qann(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 2, 1)), levels).double().eval()


def x64(*shape):
    return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2


class Gated(nn.Module):
    """A block with a sigmoid gate and an attention product: what detectors like YOLO11 contain."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.gate = nn.Sigmoid()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        return x * self.gate(self.conv(x))


def test_unsupported_modules_are_all_listed_with_paths():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ClipQuan(4), nn.Hardswish(), nn.GELU(), Gated())
    with pytest.raises(UnsupportedModuleError) as info:
        convert(model)
    message = str(info.value)
    for fragment in ("2 (Hardswish)", "3 (GELU)", "4.gate (Sigmoid)", "4.attn (MultiheadAttention)", "analog=["):
        assert fragment in message
    assert [p for p, _, _ in info.value.problems] == ["2", "3", "4.gate", "4.attn"]


def test_unquantized_activation_and_missing_activation():
    with pytest.raises(UnsupportedModuleError, match="to_qann"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    with pytest.raises(ValueError, match="no activation"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(UnsupportedModuleError, match="unknown module with weights"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 1), ClipQuan(4), nn.Bilinear(3, 3, 3)))


@pytest.mark.parametrize("kwargs,match", [
    ({"wake": 0}, "wake"), ({"wake": 2.5}, "wake"), ({"sleep": -1}, "sleep"), ({"sleep": "forever"}, "sleep"),
    ({"mode": "parallel"}, "mode"), ({"burst": 0}, "burst"), ({"max_sleep": 0}, "max_sleep"),
])
def test_bad_schedule_arguments(kwargs, match):
    snn = convert(small_qann())
    with pytest.raises(ValueError, match=match):
        snn.run(x64(1, 3, 4, 4), **kwargs)


def test_bad_inputs():
    snn = convert(small_qann())
    with pytest.raises(ValueError, match="4-D"):
        snn.run(x64(3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        snn.run(x64(1, 5, 4, 4))
    with pytest.raises(ValueError, match="float32"):
        snn.run(torch.rand(1, 3, 4, 4))
    with pytest.raises(TypeError, match="Tensor"):
        snn.run([[1.0]])


def test_wake_defaults_to_levels():
    qann = small_qann(levels=8)
    snn = convert(qann)
    x = x64(2, 3, 5, 5)
    res = snn.run(x)
    torch.testing.assert_close(res.readout, qann(x).detach(), rtol=0, atol=1e-9)
    # 8 wake steps (the levels), then at least the silent sleep step that confirms the fixed point
    assert res.wake == res.stats.wake == 8 and bool(res.settled.all())
    assert int(res.steps.min()) > 8


def test_input_model_is_left_untouched():
    qann = small_qann()
    before = {k: v.clone() for k, v in qann.state_dict().items()}
    convert(qann)
    assert all(torch.equal(before[k], v) for k, v in qann.state_dict().items())
    assert isinstance(qann[1], ClipQuan)


class SharedSite(nn.Module):
    """One activation module called at two places per forward (Bottleneck-style)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.act = ClipQuan(4)

    def forward(self, x):
        return self.head(self.act(self.c2(self.act(self.c1(x)))))


def test_shared_activation_gets_one_state_per_call_site():
    torch.manual_seed(3)
    qann = SharedSite().double().eval()
    snn = convert(qann)
    x = x64(2, 3, 6, 6)
    res = snn.run(x, wake=4)
    torch.testing.assert_close(res.readout, qann(x).detach(), rtol=0, atol=1e-9)
    (name, neuron), = snn.neurons()
    assert neuron.call_sites == 2 and name == "act"
    assert set(res.stats.spikes_per_layer) == {"act", "act#2"}


def test_batchnorm_folds_in_sequential_and_registered_pairs_and_stays_exact_elsewhere():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), FrozenBatchNorm2d(4)
            self.act = nn.ReLU()
            self.post = nn.BatchNorm2d(4)  # after an add: nothing to fold into

        def forward(self, x):
            return self.post(x + self.act(self.bn1(self.conv1(x))))

    register_bn_pairs(Block, [("conv1", "bn1")])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), Block(),
                          nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5)).double()
    for m in model.modules():
        if hasattr(m, "running_var"):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = x64(2, 3, 4, 4)
    expected = model(x)
    folded = model
    n_folded, n_kept = fold_batchnorm(folded)
    assert (n_folded, n_kept) == (3, 1)
    assert isinstance(folded[3].post, ChannelAffine)
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)
    qann = to_qann(folded, levels=4)
    snn = convert(qann)
    torch.testing.assert_close(snn.run(x, wake=4).readout, qann(x), rtol=0, atol=1e-9)
    assert (snn.batchnorm_folded, snn.batchnorm_kept) == (0, 0)  # folded above already
    assert isinstance(snn.model[3].post, Synapse) and isinstance(snn.model[3].post.layer, ChannelAffine)


def test_batchnorm_without_running_stats_is_refused():
    model = to_qann(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU()), 4)
    with pytest.raises(ValueError, match="running statistics"):
        convert(model)


def test_bias_gated_by_flag_not_by_weight_copies():
    qann = small_qann()
    snn = convert(qann)
    synapses = [m for m in snn.modules() if isinstance(m, Synapse)]
    assert synapses and all(s.layer.bias is not None for s in synapses)
    biases = [s.layer.bias.clone() for s in synapses]
    snn.run(x64(1, 3, 4, 4), wake=4, sleep=5)
    assert all(torch.equal(b, s.layer.bias) for b, s in zip(biases, synapses))


class Hybrid(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4))
        self.block = Gated()
        self.after = nn.Sequential(nn.Conv2d(4, 4, 1), ClipQuan(4), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        return self.after(self.block(self.stem(x)))


def test_analog_islands_are_opt_in_exact_and_reported():
    torch.manual_seed(2)
    qann = Hybrid().double().eval()
    del qann.block.attn  # keep only the sigmoid gate block
    with pytest.raises(UnsupportedModuleError, match="block.gate"):
        convert(qann)
    with pytest.raises(ValueError, match="do not exist"):
        convert(qann, analog=["block.nope"])
    snn = convert(qann, analog=["block"])
    x = x64(2, 3, 6, 6)
    res = snn.run(x, wake=4)
    torch.testing.assert_close(res.readout, qann(x).detach(), rtol=0, atol=1e-9)
    fraction = res.stats.analog_mac_fraction
    total = 3 * 4 * 9 * 36 + 4 * 4 * 36 + 4 * 4 * 36 + 4 * 2 * 36
    assert fraction == pytest.approx(4 * 4 * 36 / total)
    assert snn.analog == ["block"]


def test_custom_neuron_factory_is_used():
    snn = convert(small_qann(), neuron=lambda threshold: CIFNeuron(threshold, spike_cap=False))
    (_, neuron), = snn.neurons()
    assert neuron.spike_cap is False
    with pytest.raises(ValueError, match="unknown neuron"):
        convert(small_qann(), neuron="lif")


def test_input_size_change_needs_no_manual_reset():
    qann = small_qann()
    snn = convert(qann)
    for size in (4, 7):
        x = x64(1, 3, size, size)
        torch.testing.assert_close(snn.run(x, wake=4).readout, qann(x).detach(), rtol=0, atol=1e-9)


class HiddenGate(nn.Module):
    """Only linear leaves, but a functional sigmoid gate in forward (squeeze-excitation style)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class FunctionalPools(nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, x):
        return nn.functional.max_pool2d(x, self.kernel, 2)


def hidden(module):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4), module, nn.Conv2d(4, 2, 1)).double().eval()


@pytest.mark.parametrize("module,function", [(HiddenGate(), "sigmoid"), (FunctionalPools(3), "max_pool2d")])
def test_hidden_functional_nonlinearity_stops_the_first_run_naming_the_module(module, function):
    qann = hidden(module)
    snn = convert(qann)  # the module tree alone looks linear
    with pytest.raises(UnsupportedModuleError) as info:
        snn.run(x64(1, 3, 6, 6), wake=4)
    assert info.value.problems[0][:2] == ("2", function)
    island = convert(qann, analog=["2"])  # kept analog, it is exact
    x = x64(2, 3, 6, 6)
    torch.testing.assert_close(island.run(x, wake=4).readout, qann(x).detach(), rtol=0, atol=1e-9)


def test_strided_subsample_and_products_with_constants_are_linear():
    qann = hidden(FunctionalPools(1))  # kernel 1: torchvision's LastLevelMaxPool
    x = x64(2, 3, 6, 6)
    torch.testing.assert_close(convert(qann).run(x, wake=4).readout, qann(x).detach(), rtol=0, atol=1e-9)


def test_ordered_dict_readouts_stay_ordered_dicts():
    from collections import OrderedDict

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ClipQuan(4))
            self.p1, self.p2 = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.body(x)
            return OrderedDict([("p2", self.p2(y)), ("p1", self.p1(y))])

    snn = convert(Features().double().eval())
    out = snn.run(x64(1, 3, 5, 5), wake=4).readout
    assert type(out) is OrderedDict and list(out) == ["p2", "p1"]


class MergesSamples(nn.Module):
    """A forward that moves data across the batch axis before a neuron: the simulator cannot follow it."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.act = ClipQuan(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        if self.how == "reshape":  # [B, C, H, W] -> [1, B*C, H, W]: every sample in one row
            y = y.reshape(1, -1, *y.shape[2:])
            return self.act(y)
        return self.head(self.act(torch.cat([y, y], 0)))  # twice the rows


@pytest.mark.parametrize("how", ["reshape", "cat"])
@pytest.mark.parametrize("mode", ["step", "multistep"])
@pytest.mark.parametrize("record", [True, False])
def test_forward_mixing_samples_on_the_batch_axis_is_refused_naming_the_module(how, mode, record):
    torch.manual_seed(0)
    snn = convert(MergesSamples(how).double().eval())
    x = x64(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"^act: .*rows.*batch axis"):
        snn.run(x, wake=4, sleep=2, mode=mode, record=record)
    if mode == "step":
        with pytest.raises(RuntimeError, match=r"^act: .*batch axis"):
            list(snn.stream(x, wake=4, sleep=2, record=record))
    # a forward that keeps samples on their rows runs (and is exact)
    qann = small_qann()
    torch.testing.assert_close(convert(qann).run(x, wake=4, mode=mode, record=record).readout, qann(x).detach(),
                               rtol=0, atol=1e-9)


def test_neuron_kinds_state_what_each_neuron_needs():
    """Conversion, the detectors and the schedule look a neuron up instead of testing its name."""
    cif, qcfs, if_ = (neuron_kind(name) for name in ("cif", "qcfs", "if"))
    assert [k.rate_coded for k in (cif, qcfs, if_)] == [False, True, True]  # only CASC sleeps to a fixed point
    assert [k.signed for k in (cif, qcfs, if_)] == [True, False, False]
    assert cif.activations() == qcfs.activations() == (ClipQuan,) and if_.activations() == (nn.ReLU, ClipQuan)
    assert set(NEURON_KINDS) == {"cif", "qcfs", "if"}
    quantizer = ClipQuan(4, threshold=2.0)
    assert type(cif.make(quantizer, "a", {}, 4)) is CIFNeuron and type(qcfs.make(quantizer, "a", {}, 4)) is QCFSNeuron
    assert if_.make(nn.ReLU(), "a", {"a": 1.5, "a#2": 0.5}, None).site_thresholds == [1.5, 0.5]
    with pytest.raises(ValueError, match="no IF threshold for activation b"):
        if_.make(nn.ReLU(), "b", {"a": 1.5}, None)
    custom = neuron_kind(lambda threshold: CIFNeuron(threshold, spike_cap=False))
    made = custom.make(quantizer, "a", {}, 8)  # a spike is worth the threshold of 8 wake steps over 4 levels
    assert custom.name == "custom" and not custom.rate_coded and made.threshold == 4.0
    assert made.precharge == quantizer.phi and (made.levels, made.wake_levels) == (4, 8)
    with pytest.raises(ValueError, match="neuron must be one of cif, qcfs, if"):
        neuron_kind("lif")
