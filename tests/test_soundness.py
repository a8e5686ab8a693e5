"""convert either reproduces the QANN exactly or refuses, naming the module: constants on spiking paths.

Each constant below used to be injected again in every time step (sleep included) without a word:
float64 differences of 0.05 to 0.5 from the QANN. Now the first run refuses it.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector import ClipQuan, UnsupportedModuleError, convert
from detector.randnet import random_qann


def x64(*shape, seed=0):
    return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2


class Block(nn.Module):
    """conv -> ClipQuan -> (an operation under test) -> conv readout."""

    def __init__(self, op):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = ClipQuan(4, threshold=1.5)
        self.op = op
        self.head = nn.Conv2d(4, 2, 1)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.full((1, 4, 1, 1), 0.3))

    def forward(self, x):
        return self.head(self.op(self, self.act(self.conv(x))))


REFUSED = {
    "scalar addend": (lambda m, h: h + 0.5, "adds a constant"),
    "scalar subtrahend (in place)": (lambda m, h: h.sub_(0.25), "adds a constant"),
    "constant minus signal": (lambda m, h: 1.0 - h, "adds a constant"),
    "tensor addend": (lambda m, h: torch.add(h, torch.full_like(h, 2.0)), "adds a constant"),
    "own parameter addend": (lambda m, h: h + m.shift, "adds a constant"),
    "non-zero pad value": (lambda m, h: F.pad(h, (1, 1, 1, 1), value=1.0), "pads the signal with the constant 1.0"),
    "functional conv with a bias": (lambda m, h: F.conv2d(h, m.weight, m.bias, padding=1), "adds its bias"),
    "constant concatenated": (lambda m, h: torch.cat([h, torch.ones_like(h)], 1)[:, :4], "concatenates a constant"),
    "functional batch norm": (lambda m, h: F.batch_norm(h, torch.zeros(4, dtype=h.dtype),
                                                        torch.ones(4, dtype=h.dtype), m.bias.to(h.dtype)), "normalization shifts"),
}

ALLOWED = {
    "signal plus signal": lambda m, h: h + h.flip(-1),
    "scaled by a constant": lambda m, h: h * 0.5 - h / 4,
    "zero pad value": lambda m, h: F.pad(h, (1, 1, 1, 1), value=0.0)[..., 1:-1, 1:-1],
    "functional conv without bias": lambda m, h: F.conv2d(h, m.weight, None, padding=1),
    "adding zero": lambda m, h: h + 0,
    "zeros concatenated": lambda m, h: torch.cat([h, torch.zeros_like(h)], 1)[:, :4],
}


@pytest.mark.parametrize("case", sorted(REFUSED))
@pytest.mark.parametrize("mode", ["step", "multistep"])
def test_constants_on_spiking_paths_are_refused_with_the_module_named(case, mode):
    op, reason = REFUSED[case]
    qann = Block(op).double().eval()
    snn = convert(qann)
    with pytest.raises(UnsupportedModuleError) as error:
        snn.run(x64(1, 3, 6, 6), wake=4, mode=mode)
    assert "<root>" in str(error.value) and reason in str(error.value)
    assert "every time step" in str(error.value)


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_linear_operations_without_constants_stay_exact(case):
    qann = Block(ALLOWED[case]).double().eval()
    x = x64(2, 3, 6, 6)
    run = convert(qann).run(x, wake=4, sleep="auto")
    torch.testing.assert_close(run.readout, qann(x).detach(), rtol=0, atol=1e-9)


class Injected(nn.Module):
    """A random QANN with one constant-injecting operation spliced in after block ``at``."""

    def __init__(self, net, at: int, op):
        super().__init__()
        self.net, self.at, self.op = net, at, op
        self.shift = nn.Parameter(torch.full((1, 6, 1, 1), 0.2))
        self.weight = nn.Parameter(torch.randn(6, 6, 1, 1) * 0.3)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x):
        for i, block in enumerate(self.net.blocks):
            x = block(x)
            if i == self.at:
                x = self.op(self, x)
        return self.net.readout_map(x), self.net.readout_vec(self.net.pool(x).flatten(1))


INJECTIONS = [
    lambda m, h: h + 0.125,
    lambda m, h: h - m.shift,
    lambda m, h: F.pad(h, (1, 1, 1, 1), value=0.5)[..., 1:-1, 1:-1],
    lambda m, h: F.conv2d(h, m.weight, m.bias),
    lambda m, h: torch.cat([h[:, :3], torch.full_like(h[:, 3:], 0.7)], 1),
]


def test_random_nets_with_a_constant_spliced_in_are_all_refused():
    refused = 0
    for seed in range(15):
        pick = random.Random(seed)
        net = random_qann(seed, levels=4, depth=8)
        model = Injected(net, pick.randrange(len(net.blocks)), INJECTIONS[seed % len(INJECTIONS)]).double().eval()
        with pytest.raises(UnsupportedModuleError):
            convert(model).run(x64(1, 3, 8, 8, seed=seed), wake=4)
        refused += 1
    assert refused == 15
