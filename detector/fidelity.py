"""Fidelity of CASC conversion on random detector-like QANNs: the table ``casc demo`` prints.

For each level count L: max |SNN readout - QANN output| with ``wake=L, sleep="auto"`` in float64
(expected exact) and float32 (rare quantization-boundary flips, reported, not hidden), the sleep
steps ``auto`` needed with one spike per step and with bursts of L, and the spikes that cost.
"""

from __future__ import annotations

import torch

from .convert import convert
from .randnet import random_qann

__all__ = ["fidelity_table", "format_table"]  # the public API (apps import only these)


def _max_error(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@torch.no_grad()
def fidelity_table(levels=(2, 4, 8), nets: int = 20, depth: int = 12, seed: int = 0, batch: int = 2,
                   size: int = 8) -> list[dict]:
    rows = []
    for L in levels:
        err64, err32, flips32 = 0.0, 0.0, 0
        sleep1, sleep_burst, spikes1, spikes_burst = [], [], [], []
        for i in range(nets):
            qann = random_qann(seed + 1000 * L + i, levels=L, depth=depth)
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + i)) * 2
            for dtype in (torch.float64, torch.float32):
                q = qann.to(dtype)
                snn = convert(q)
                run = snn.run(x.to(dtype), wake=L, sleep="auto", burst=1)
                error = _max_error(run.readout, q(x.to(dtype)))
                if dtype == torch.float64:
                    err64 = max(err64, error)
                    sleep1.append(run.steps.double().mean() - L)
                    spikes1.append(float(run.stats.spikes.mean()))
                    burst = snn.run(x.to(dtype), wake=L, sleep="auto", burst=L)
                    sleep_burst.append(burst.steps.double().mean() - L)
                    spikes_burst.append(float(burst.stats.spikes.mean()))
                else:
                    err32 = max(err32, error)
                    flips32 += error > 1e-4
        rows.append({
            "levels": L, "nets": nets, "depth": depth,
            "max_err_float64": err64, "max_err_float32": err32, "float32_nets_with_flips": int(flips32),
            "sleep_steps_burst1": float(torch.stack(sleep1).mean()), "sleep_steps_burstL": float(torch.stack(sleep_burst).mean()),
            "spikes_burst1": sum(spikes1) / nets, "spikes_burstL": sum(spikes_burst) / nets,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| L | nets | depth | max err f64 | max err f32 | f32 nets w/ flips | sleep steps γ=1 | sleep steps γ=L "
            "| spikes/sample γ=1 | spikes/sample γ=L |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['levels']} | {r['nets']} | {r['depth']} | {r['max_err_float64']:.1e} | {r['max_err_float32']:.1e} "
            f"| {r['float32_nets_with_flips']} | {r['sleep_steps_burst1']:.2f} | {r['sleep_steps_burstL']:.2f} "
            f"| {r['spikes_burst1']:.0f} | {r['spikes_burstL']:.0f} |")
    return "\n".join(lines)
