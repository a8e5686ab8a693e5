"""The benchmarks' own arithmetic: what they time must compute what it replaces."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector.spike_counts import DISABLE_ENV, fused_counter

ROOT = Path(__file__).resolve().parent.parent


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kernel,stride,padding,tile", [(3, 1, 1, 4), (3, 2, 1, 8), (1, 1, 0, 4), (3, 1, 0, 16)])
def test_tiled_conv_equals_the_dense_conv_and_skips_quiet_tiles(kernel, stride, padding, tile):
    tiles = _benchmark("tiles")
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride, padding).double()
    x = torch.zeros(2, 3, 21, 18, dtype=torch.float64)
    x[0, :, 2:5, 3:6] = torch.randn(3, 3, 3, dtype=torch.float64)  # one local event cluster in the first sample
    out, fraction = tiles.tiled_conv(x, conv, tile)
    dense = F.conv2d(x, conv.weight, None, stride, padding)
    assert out.shape == dense.shape
    assert torch.allclose(out, dense, atol=1e-12)
    assert 0 < fraction < 1  # the second sample and the far tiles are not computed
    assert tiles.tiled_conv(torch.zeros_like(x), conv, tile)[1] == 0


def test_the_runtime_clock_reads_wall_or_cpu_time():
    runtime = _benchmark("runtime")
    wall, cpu = runtime.Clock(torch.device("cpu")), runtime.Clock(torch.device("cpu"), cpu_time=True)
    assert wall.summary([3.0, 1.0, 2.0]) == 2.0 and cpu.summary([3.0, 1.0, 2.0]) == 1.0  # median / minimum
    busy = {"spin": lambda: sum(range(200_000))}
    assert runtime.timed_alternating(busy, 2, cpu)["spin"] > 0
    with pytest.raises(ValueError, match="--cpu-time"):
        runtime.Clock(torch.device("cuda"), cpu_time=True)


def test_the_runtime_counts_more_tensor_operations_with_recording():
    from detector import convert
    from detector.randnet import random_qann

    runtime = _benchmark("runtime")
    snn = convert(random_qann(5, levels=4, depth=6))
    counts = runtime.tensor_operations(snn, torch.rand(1, 3, 8, 8))
    assert counts["mode"] == "step" and counts["batch"] == 1
    assert 0 < counts["off"] < counts["on"]  # recording counts with tensor operations of its own


def test_the_runtime_times_recording_on_and_off_in_the_same_rounds():
    """Each mode's two rows (recording off, on) share one ANN time, and the recording cost printed is their ratio."""
    runtime = _benchmark("runtime")
    rows = runtime.measure(1, 64, runtime.Clock(torch.device("cpu"), cpu_time=True), 1, None)
    assert [(r["mode"], r["record"]) for r in rows] == [("step", False), ("step", True), ("multistep", False),
                                                        ("multistep", True)]
    for off, on in (rows[0:2], rows[2:4]):
        assert off["ann_forward_s"] == on["ann_forward_s"] > 0
        assert on["recording_cost"] == pytest.approx(on["snn_total_s"] / off["snn_total_s"] - 1)
        assert on["steps_auto_max"] == off["steps_auto_max"] >= 4  # recording changes no step of the schedule
        # the same recorded run counting with eager PyTorch, in the same rounds, where the fused counter serves
        assert (on["recording_cost_eager_counts"] is None) == (fused_counter() is None)


def test_the_runtime_times_eager_counts_with_the_fused_counter_off_and_then_restores_it(monkeypatch):
    runtime = _benchmark("runtime")
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    assert runtime.with_eager_counts(lambda: os.environ[DISABLE_ENV]) == "0"
    assert DISABLE_ENV not in os.environ
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert runtime.with_eager_counts(fused_counter) is None and os.environ[DISABLE_ENV] == "1"
