"""The plain IF baseline through the same runtime: percentile thresholds, soft reset, no sleep."""

import pytest
import torch
from torch import nn

from detector import calibrate_thresholds, convert
from detector.neurons import IFNeuron


def test_hand_computed_two_layer_case():
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0), model[0].bias.zero_()
        model[2].weight.fill_(2.0), model[2].bias.fill_(0.5)
    snn = convert(model, neuron="if", thresholds={"1": 1.0})
    x = torch.tensor([[0.625]], dtype=torch.float64)
    # membrane .625, 1.25 (fire), .875, 1.5 (fire): 2 spikes in 4 steps -> (2 * 2 + 0.5 * 4) / 4
    assert snn.run(x, wake=4, sleep=0).readout.item() == pytest.approx(1.5)
    # 5 steps: a third spike at 1.125 -> (2 * 3 + 0.5 * 5) / 5 = 1.7, near the ANN's 1.75
    assert snn.run(x, wake=5, sleep=0).readout.item() == pytest.approx((2 * 3 + 0.5 * 5) / 5)


def random_relu_net(seed):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        model[4].running_var.uniform_(0.5, 1.5, generator=gen)
    return model.double().eval()


def test_error_falls_as_time_grows():
    for seed in range(3):
        model = random_relu_net(seed)
        data = [torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
        snn = convert(model, neuron="if", calibration=data)
        x = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
        target = model(x).detach()
        errors = [float((snn.run(x, wake=t, sleep=0).readout - target).abs().mean()) for t in (4, 32, 256)]
        assert errors[0] > errors[1] > errors[2], errors


def test_thresholds_are_activation_percentiles_per_call_site():
    model = nn.Sequential(nn.Linear(1, 100, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 101, dtype=torch.float32).view(100, 1))
    thresholds = calibrate_thresholds(model, [torch.ones(1, 1)], percentile=99.0)
    assert thresholds == {"1": 99.0}  # the 99th of 1..100
    snn = convert(model, neuron="if", calibration=[torch.ones(1, 1)])
    (_, neuron), = snn.neurons()
    # convert's default is the 99.9th percentile of the same activations 1..100: nearest rank (100) and
    # linear interpolation (99.901) differ by less than 0.1
    expected = float(torch.quantile(torch.arange(1, 101, dtype=torch.float64), 0.999))
    assert isinstance(neuron, IFNeuron) and neuron.site_thresholds == [pytest.approx(expected, abs=0.1)]
    assert neuron.site_thresholds == [calibrate_thresholds(model, [torch.ones(1, 1)])["1"]]


def test_baseline_needs_calibration_and_relu():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match="calibration"):
        convert(model, neuron="if")
    with pytest.raises(ValueError, match="no calibration batches"):
        convert(model, neuron="if", calibration=[])
    with pytest.raises(ValueError, match="IF baseline converts ReLU"):
        convert(nn.Sequential(nn.Linear(2, 2), nn.SiLU()), neuron="if", calibration=[torch.ones(1, 2)])
