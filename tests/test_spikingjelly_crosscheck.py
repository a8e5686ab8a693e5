"""Our IF baseline is the field's: it agrees with SpikingJelly's ann2snn rate-coding converter.

SpikingJelly (an optional test dependency) converts ReLU -> soft-reset IFNode with a per-layer
threshold from VoltageHook statistics ("Max" here; ours: percentile=100 on the same single batch).
"""

import pytest
import torch
from torch import nn

from detector import convert

ann2snn = pytest.importorskip("spikingjelly.activation_based.ann2snn", reason="SpikingJelly is an optional test dependency")
functional = pytest.importorskip("spikingjelly.activation_based.functional")


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.double().eval()


@torch.no_grad()
def test_if_baseline_matches_spikingjelly_rate_coding():
    model = small_cnn()
    calibration = torch.rand(16, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    recipe = ann2snn.recipes.RateCodingRecipe(dataloader=[calibration], mode="Max")
    reference = ann2snn.Converter(recipe=recipe, device="cpu").convert(model).double().eval()
    ours = convert(model, neuron="if", calibration=[calibration], percentile=100.0)
    for steps in (8, 32):
        functional.reset_net(reference)
        expected = sum(reference(x) for _ in range(steps)) / steps
        torch.testing.assert_close(ours.run(x, wake=steps, sleep=0).readout, expected, rtol=0, atol=1e-9)
