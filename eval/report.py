"""What an evaluation shows: the Markdown table, the files of its run folder (results.json, curve.csv, the plots)
and the cost estimate printed before it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from detector.families import get_family
from detector.neuron_kinds import neuron_kind

from .config import METHOD_NEURONS, PAPER_SLEEP_EXTRA, SPIKING, EvalConfig
from .summary import steps_to_reach
from .plots import (METRIC_NAMES, plot_energy_vs_qann, plot_firing_rates, plot_map_vs_energy, plot_map_vs_latency,
                    plot_map_vs_t, schedule_text)
from .video import format_table as format_video_table


def report_text(report) -> str:
    """What ``casc eval`` prints of an ``EvalReport``: the table, the video table when there is one, and where the
    files are."""
    parts = [format_table(report.summary, report.schedule["timesteps"],
                          len(get_family(report.model["family"]).stages) > 1, report.metric)]
    if report.video is not None:
        parts.append(format_video_table(report.video))
    parts.append(f"results in {Path(report.out).resolve()}: {', '.join(report.written)}")
    return "\n".join(parts)


def format_table(summary: dict, timesteps: list[int], two_stage: bool = False, metric: str = "map50_95") -> str:
    """Markdown: one column per requested T (and CASC's ``auto``), cells ``metric`` / mAP50 (mAP50-95 when the
    metric is mAP50); "T to 99% QANN" on ``metric``."""
    second = "map50_95" if metric == "map50" else "map50"
    columns = list(timesteps) + (["auto"] if any("auto" in e["metrics"] for e in summary.values()) else [])
    head = ["method"] + [f"T={t}" for t in columns] + ["T to 99% QANN", "binary-eq. steps", "energy ratio (SNN/ANN)",
                                                        "energy vs QANN (int8)", "ms/image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    qann = summary.get("qann", {}).get("metrics", {}).get("flat", {}).get(metric)
    for method, entry in summary.items():
        metrics = entry["metrics"]
        if "flat" in metrics:
            m = metrics["flat"]
            cells = [f"{m[metric]:.3f} / {m[second]:.3f}"] * len(columns)
            extra = ["—", "—", "1 (ANN)" if method == "ann" else "—", "1 (QANN)" if method == "qann" else "—"]
        else:
            cells = [_cell(metrics.get(str(t)), t == "auto", metric, second) for t in columns]
            reach = steps_to_reach(entry, qann, timesteps, metric)
            energy, ann_energy = entry.get("energy_uj_at", {}).get(str(reach)), entry.get("ann_energy_uj")
            ratio = energy / ann_energy if reach and energy and ann_energy else None
            binary = {key: m.get("binary_steps_mean") for key, m in metrics.items()}
            extra = [str(reach) if reach else "—" if not qann else f"> {max(timesteps)}",
                     _at_comparison(entry, binary, ".1f"), f"{ratio:.2f}" if ratio else "—",
                     _at_comparison(entry, entry.get("energy_ratio_vs_qann_at", {}), ".2f")]
        extra.append(f"{entry['latency_ms']:.0f}")
        lines.append("| " + " | ".join([method.upper()] + cells + extra) + " |")
    return "\n".join(lines) + f"\n(cells: {METRIC_NAMES[metric]} / {METRIC_NAMES[second]}; T = total steps, wake + sleep" + (
        ", both stages (T/2 each; the per-stage split in results.json)" if two_stage else "") + \
        "; binary-eq. steps and energy vs QANN at the T to 99 % of the QANN, else at the T named; binary-eq.: a step " \
        "in which a neuron emits k spikes counts k; energy vs QANN: integer hardware, docs/method.md; " \
        "ms/image: the whole run of that method on this machine)"


def _at_comparison(entry: dict, values: dict, spec: str) -> str:
    """``values[T]`` at the method's comparison T, with that T named when it is not the T to 99 % of the QANN."""
    at = entry.get("comparison_at")
    value = values.get(at) if at is not None else None
    if value is None:
        return "—"
    named = "" if at == str(entry.get("steps_to_99pct_qann")) else f" (T={at})"
    return f"{value:{spec}}{named}"


def _cell(m: dict | None, auto: bool, metric: str = "map50_95", second: str = "map50") -> str:
    if m is None:
        return "—"
    cell = f"{m[metric]:.3f} / {m[second]:.3f}"
    return cell + f" (T≈{m['steps_mean']:.1f})" if auto else cell


def write_outputs(out: Path, results: dict) -> list[str]:
    """results.json, curve.csv and the plots; returns the names written."""
    summary = results["summary"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    rows = ["method,T,map50_95,map50,voc07_map50,steps_mean,energy_uj,latency_ms"]
    for method, entry in summary.items():
        for key, m in entry["metrics"].items():
            t = "" if key == "flat" else key
            energy = entry.get("energy_uj_at", {}).get(key, "")
            latency = entry.get("latency_ms_at", {}).get(key, entry["latency_ms"])
            rows.append(f"{method},{t},{m['map50_95']:.5f},{m['map50']:.5f},{m['voc07_map50']:.5f},"
                        f"{m.get('steps_mean') or ''},{energy or ''},{latency:.2f}")
    (out / "curve.csv").write_text("\n".join(rows) + "\n")
    written = ["results.json", "curve.csv", "map_vs_t.png", "map_vs_latency.png"]
    metric = results["metric"]
    plot_map_vs_t([results], out / "map_vs_t.png", metric)
    plot_map_vs_latency([results], out / "map_vs_latency.png", metric)
    if any(m in summary for m in SPIKING):
        plot_map_vs_energy([results], out / "map_vs_energy.png", metric)
        written.append("map_vs_energy.png")
    if "qann" in summary and any(summary.get(m, {}).get("qann_integer_energy_uj") for m in SPIKING):
        plot_energy_vs_qann([results], out / "energy_vs_qann.png")
        written.append("energy_vs_qann.png")
    if summary.get("casc", {}).get("firing_rates"):
        plot_firing_rates(summary["casc"]["firing_rates"], out / "firing_rates.png", results["model"]["family"],
                          title=f"{results['model']['name']}: CASC firing rate per layer\n"
                                f"{results['data']['name']}, {results['data']['images']} images; "
                                f"{schedule_text(results)}")
        written.append("firing_rates.png")
    return written


def estimate_cost(probe: dict[str, float], methods: tuple[str, ...], timesteps: list[int], images: int,
                  config: EvalConfig, family: str, wake: int) -> str:
    """The run's cost before it starts: network passes per image, priced with one timed forward and step."""
    forwards = sum(m in methods for m in ("ann", "qann"))
    steps = {}
    stages = len(get_family(family).stages)
    if "casc" in methods:
        if config.sleep == "auto":  # burst sleep settles in about 2 sleep steps; one spike per step needs tens
            sleep = 2 if (config.burst or wake) >= wake else 20
        else:
            sleep = config.sleep
        steps["CASC"] = stages * (wake + sleep)
    if "casc-paper" in methods:
        steps["CASC-PAPER"] = stages * (2 * wake + PAPER_SLEEP_EXTRA)
    for method in SPIKING:
        if method in methods and neuron_kind(METHOD_NEURONS[method]).rate_coded:  # wake = T, no sleep
            steps[method.upper()] = max(timesteps)
    per_image = forwards * probe["forward_s"] + sum(steps.values()) * probe["step_s"] + len(steps) * probe["run_s"]
    parts = ([f"{forwards} forward{'s' * (forwards > 1)}"] if forwards else []) + \
        [f"{name} {'≈ ' * (name == 'CASC' and config.sleep == 'auto')}{n} steps" for name, n in steps.items()]
    return (f"cost estimate: {images} image{'s' * (images != 1)} × ({' + '.join(parts)}); one forward {probe['forward_s'] * 1e3:.0f} ms, "
            f"one spiking step {probe['step_s'] * 1e3:.0f} ms + {probe['run_s'] * 1e3:.0f} ms per run (timed here) -> about "
            f"{_duration(images * per_image)} for the detectors, plus loading and mAP")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
