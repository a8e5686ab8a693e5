"""ClipQuan and to_qann."""

import math

import pytest
import torch
from torch import nn

from detector import ClipQuan, to_qann
from detector.quant import qann_levels, unshare_modules


def test_clipquan_is_the_clip_round_staircase_and_clip_floor_on_request():
    z = torch.tensor([-1.0, 0.0, 0.24, 0.26, 0.49, 0.5, 1.2, 1.99, 2.0, 5.0])
    # the paper's floor form: theta * floor(L * clamp(z / theta, 0, 1)) / L with theta = 2, L = 4: steps of 0.5
    floor = ClipQuan(levels=4, threshold=2.0, rounding="floor")
    assert floor(z).tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    # the default rounds (phi = 1/2): theta * clamp(floor(L * z / theta + phi), 0, L) / L
    q = ClipQuan(levels=4, threshold=2.0)
    assert q.rounding == "round"
    for quant, phi in ((q, 0.5), (floor, 0.0)):
        expected = [2.0 * min(max(math.floor(4 * v / 2.0 + phi), 0), 4) / 4 for v in z.tolist()]
        assert quant(z).tolist() == expected, quant.rounding
    assert q(z).tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert (q.levels, q.threshold, q.learnable) == (4, 2.0, False)


def test_straight_through_gradient_inside_clip_range_only():
    z = torch.tensor([-0.5, 0.3, 0.9, 1.5], requires_grad=True)
    ClipQuan(levels=2)(z).sum().backward()
    assert z.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_learnable_threshold_gets_the_clipped_part_gradient():
    q = ClipQuan(levels=4, threshold=1.0, learnable=True)
    z = torch.tensor([0.5, 3.0])
    q(z).sum().backward()
    assert q.threshold_param.grad.item() == pytest.approx(1.0)  # only the clipped element
    assert isinstance(q.threshold_param, nn.Parameter)


def test_invalid_levels_and_threshold():
    with pytest.raises(ValueError, match="levels"):
        ClipQuan(0)
    with pytest.raises(ValueError, match="threshold"):
        ClipQuan(4, threshold=-1)


class SharedAct(nn.Module):
    def __init__(self):
        super().__init__()
        act = nn.SiLU()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), act)
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), act, nn.LeakyReLU(), nn.ReLU6(), nn.ReLU())

    def forward(self, x):
        return self.b(self.a(x))


def test_to_qann_replaces_every_reference_with_its_own_module_and_copies():
    model = SharedAct()
    qann = to_qann(model, levels=8)
    quants = [m for m in qann.modules() if isinstance(m, ClipQuan)]
    assert len(quants) == 5 and len({id(m) for m in quants}) == 5
    assert qann_levels(qann) == 8
    assert isinstance(model.a[1], nn.SiLU)  # the original is untouched
    inplace = to_qann(model, levels=2, inplace=True)
    assert inplace is model and isinstance(model.a[1], ClipQuan)


def test_to_qann_without_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="no activation"):
        to_qann(nn.Sequential(nn.Conv2d(3, 3, 1)), levels=4)


def test_unshare_modules_counts_copies():
    model = SharedAct()
    assert unshare_modules(model, (nn.SiLU,)) == 1
    assert model.a[1] is not model.b[1]


def test_to_qann_calibration_starts_each_threshold_at_its_activation_percentile():
    torch.manual_seed(0)
    model = SharedAct().eval()
    batches = [torch.rand(2, 3, 5, 5) * 3 for _ in range(2)]
    qann = to_qann(model, levels=4, learnable=True, calibration=batches, percentile=100.0)
    with torch.no_grad():
        first = model.a[1](model.a[0](batches[0]))  # the shared SiLU at path a.1, batch 0
        second = model.a[1](model.a[0](batches[1]))
    # percentile 100 = the max, averaged over the calibration batches
    assert qann.a[1].threshold == pytest.approx((float(first.max()) + float(second.max())) / 2, rel=1e-5)
    assert qann.a[1].learnable and qann.a[1] is not qann.b[1]
    assert len({round(m.threshold, 6) for m in qann.modules() if isinstance(m, ClipQuan)}) > 1
