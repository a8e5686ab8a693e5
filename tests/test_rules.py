"""Module rules are stated by each adapter and passed where they are used: nothing leaks across adapters.

What the converter is told about a module type (linear, non-linear, (conv, bn) pairs) comes from the
``rules=`` of the call (plus the built-in ones and a user's explicit ``register_*``), never from which
adapter module happens to be imported.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from detector import ClipQuan, ModuleRules, UnsupportedModuleError, convert, to_qann, validate
from detector.models import rcnn
from detector.rules import BUILTIN_RULES, resolve


def x64(*shape):
    return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2


def test_rules_merge_in_order_and_stay_frozen():
    class A(nn.Module):
        pass

    a = ModuleRules(linear=(A,), bn_pairs={A: [("c", "b")]})
    b = ModuleRules(linear=(A, nn.Identity), bn_pairs={A: (("c2", "b2"),)})
    merged = a | b
    assert merged.linear == (A, nn.Identity) and dict(merged.bn_pairs) == {A: (("c2", "b2"),)}
    assert a.bn_pairs[A] == (("c", "b"),)  # a and b unchanged
    with pytest.raises(TypeError):
        merged.bn_pairs[nn.Identity] = ()
    assert resolve(a).linear[:len(BUILTIN_RULES.linear)] == BUILTIN_RULES.linear


def test_importing_the_adapters_leaves_the_global_registries_unchanged():
    code = ("from detector.rules import BUILTIN_RULES, ModuleRules, registered_rules, resolve\n"
            "before = registered_rules()\n"
            "import detector.models.rcnn, detector.models.yolo, detector.models\n"
            "assert registered_rules() == before == ModuleRules(), registered_rules()\n"
            "assert resolve() == BUILTIN_RULES\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _se_qann() -> nn.Module:
    torch.manual_seed(0)
    return to_qann(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), SqueezeExcitation(8, 4), nn.Conv2d(8, 2, 1)),
                   levels=4).double().eval()


def test_rcnn_rules_name_squeeze_excitation_only_when_passed():
    qann = _se_qann()
    with pytest.raises(UnsupportedModuleError) as without:
        validate(qann)  # built-in rules: only the Hardsigmoid inside is known to be non-linear
    assert [p for p, _, _ in without.value.problems] == ["2.scale_activation"]
    with pytest.raises(UnsupportedModuleError) as with_rules:
        validate(qann, rules=rcnn.MODULE_RULES)
    assert ("2", "SqueezeExcitation", "non-linear module that cannot spike") in with_rules.value.problems
    assert rcnn.analog_candidates(qann) == ["2"]
    snn = convert(qann, analog=["2"], rules=rcnn.MODULE_RULES)
    x = x64(2, 3, 4, 4)
    torch.testing.assert_close(snn.run(x, wake=4).readout, qann(x), rtol=0, atol=1e-9)


def test_yolo_rules_do_not_leak_into_other_conversions():
    yolo = pytest.importorskip("detector.models.yolo")
    rules = yolo.module_rules()
    from ultralytics.nn.modules.block import Attention
    from ultralytics.nn.modules.conv import Concat, Conv

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv(3, 4, 3, act=nn.ReLU()), Conv(3, 4, 1, act=nn.ReLU())
            self.cat = Concat(1)

        def forward(self, x):
            return self.cat([self.a(x), self.b(x)])

    torch.manual_seed(0)
    qann = to_qann(TwoBranches(), levels=4).double().eval()
    for bn in (qann.a.bn, qann.b.bn):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = x64(2, 3, 6, 6)
    plain, with_yolo, with_rcnn = (convert(qann), convert(qann, rules=rules), convert(qann, rules=rcnn.MODULE_RULES))
    folded = {name: (snn.batchnorm_folded, snn.batchnorm_kept)
              for name, snn in (("plain", plain), ("yolo", with_yolo), ("rcnn", with_rcnn))}
    assert folded == {"plain": (0, 2), "yolo": (2, 0), "rcnn": (0, 2)}  # Conv's (conv, bn) pair is YOLO's rule only
    for snn in (plain, with_yolo, with_rcnn):  # exact either way: an unfolded BatchNorm is a gated ChannelAffine
        torch.testing.assert_close(snn.run(x, wake=4).readout, qann(x), rtol=0, atol=1e-9)

    attention = to_qann(nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), Attention(8, num_heads=2, attn_ratio=0.5)),
                        levels=4).eval()
    assert isinstance(attention[1], ClipQuan)
    validate(attention)  # the module tree alone: nothing known to be non-linear (the first run's trace would refuse)
    validate(attention, rules=rcnn.MODULE_RULES)
    with pytest.raises(UnsupportedModuleError, match=r"2 \(Attention\): non-linear module"):
        validate(attention, rules=rules)
