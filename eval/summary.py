"""An evaluation's figures from its batches' records: metrics per method and T, and for the spiking methods steps,
energy, latency, the T at 99 % of the QANN and the comparison with the QANN on integer hardware.
"""

from __future__ import annotations

import numpy as np

from detector.energy import integer_energy, memory_traffic, neurobench_metrics

from .config import SPIKING
from .metrics import coco_metrics, detection_columns, voc_metrics


def _metrics(ground_truth, records, classes) -> dict:
    detections = [{"image_id": r["image_id"], **detection_columns(r)} for r in records]
    coco = coco_metrics(ground_truth, detections, classes)
    voc = voc_metrics(ground_truth, detections, classes)
    return {**{k: v for k, v in coco.items() if k != "per_class"}, "voc07_map50": voc["voc07_map50"],
            "voc_map50": voc["voc_map50"], "per_class": coco["per_class"], "per_class_voc": voc["per_class"]}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(batches: list[dict], ground_truth: list[dict], classes: list[str], methods: list[str],
              timesteps: list[int], levels: int | None = None) -> dict:
    """Metrics per method and T; for spiking methods steps, energy, latency, reach and, with the QANN's ``levels``,
    the comparison with the QANN on integer hardware (``_comparison``)."""
    summary = {}
    for method in methods:
        parts = [b[method] for b in batches]
        entry = {"metrics": {key: _metrics(ground_truth, [r for p in parts for r in p["records"][key]], classes)
                             for key in parts[0]["records"]}}
        entry["latency_ms"] = 1000 * sum(p["seconds"] for p in parts) / _images(parts)
        if method in SPIKING:
            entry.update(_spiking_summary(parts, entry["metrics"]))
        summary[method] = entry
    qann = summary.get("qann", {}).get("metrics", {}).get("flat", {}).get("map50_95")
    for method in SPIKING:
        if method in summary and qann is not None:
            summary[method].update(_reach(summary[method], qann, timesteps))
        if method in summary and levels and "workload_at" in summary[method]:
            summary[method].update(_comparison(summary[method], levels))
    return summary


def _comparison(entry: dict, levels: int) -> dict:
    """Energy against the QANN on integer hardware at every T, and at the reported T (the first at 99 % of the
    QANN's mAP, else the last evaluated) its ``energy_ratio_vs_qann``, ``memory`` and ``neurobench`` blocks
    (``detector.energy``: Horowitz's 45 nm figures, NeuroBench's definitions; means over the images)."""
    workloads = entry.pop("workload_at")
    keys = list(workloads)
    priced = {key: integer_energy(workloads[key], levels) for key in keys}
    reach = entry.get("steps_to_99pct_qann")
    at = str(reach) if reach is not None else keys[-1]
    work = workloads[at]
    memory = memory_traffic(work, levels)
    return {
        "integer_energy_uj_at": {key: priced[key]["snn_pj"] * 1e-6 for key in keys},
        "energy_ratio_vs_qann_at": {key: priced[key]["ratio"] for key in keys},
        "qann_integer_energy_uj": priced[at]["qann_pj"] * 1e-6,
        "comparison_at": at,
        "energy_ratio_vs_qann": priced[at]["ratio"],
        "integer_energy": priced[at],
        "memory": memory,
        # compute and SRAM traffic together: where the memory term dominates, the verdict can flip
        "energy_with_memory_ratio_vs_qann": (priced[at]["snn_pj"] + memory["snn_pj"])
                                            / (priced[at]["qann_pj"] + memory["qann_pj"]),
        "neurobench": neurobench_metrics(work),
        "workload": work,
    }


def _images(parts: list[dict]) -> int:
    return sum(len(next(iter(p["records"].values()))) for p in parts)


def _spiking_summary(parts: list[dict], metrics: dict) -> dict:
    """Steps (and each stage's, two-stage), energy and latency at every T, firing rates of one method."""
    infos = [p["info"] for p in parts]
    keys = list(metrics)
    for key in keys:
        metrics[key]["steps_mean"] = _mean(r["steps"] for p in parts for r in p["records"][key])
        for stage in ("stage1", "stage2"):
            if f"{stage}_steps_at" in infos[0]:
                metrics[key][f"{stage}_steps_mean"] = _mean(s for i in infos for s in i[f"{stage}_steps_at"][key])
    rates = [i.get("firing_rates", {}) for i in infos]
    workload = {}
    if all("workload_at" in i for i in infos):  # PyTorch engine (ONNX Runtime counts no spikes)
        workload = {"workload_at": {key: {name: _mean(v for i in infos for v in i["workload_at"][key][name])
                                          for name in infos[0]["workload_at"][key]} for key in keys}}
        for key in keys:
            metrics[key]["binary_steps_mean"] = workload["workload_at"][key]["binary_steps"]
    return {
        **workload,
        "energy_uj_at": {key: _mean(e for i in infos for e in i.get("energy_uj_at", {}).get(key, [])) for key in keys},
        "latency_ms_at": {key: _latency_ms(parts, key) for key in keys},
        "ann_energy_uj": _mean(i.get("ann_energy_uj") for i in infos),
        "steps_used_mean": _mean(s for i in infos for s in i.get("steps", [])),
        "steps_used_max": max((s for i in infos for s in i.get("steps", [])), default=None),
        "firing_rates": {k: _mean(r.get(k) for r in rates) for k in rates[0]} if rates else {},
    }


def _latency_ms(parts: list[dict], key: str) -> float:
    """Milliseconds per image to reach T: each batch's measured run time shared out per simulated step (one run
    serves every T, so the time to T itself is not a separate measurement)."""
    seconds = 0.0
    for p in parts:
        run_steps = max(p["info"]["steps"]) or 1
        reached = max(r["steps"] or 0 for r in p["records"][key])
        seconds += p["seconds"] * min(1.0, reached / run_steps)
    return 1000 * seconds / _images(parts)


def steps_to_reach(entry: dict, qann_value: float | None, timesteps: list[int], metric: str = "map50_95") -> int | None:
    """The first T at which a spiking method reaches 99 % of the QANN's ``metric``; None when it never does, or
    when the QANN scores 0 (then every T would "reach" it)."""
    if not qann_value or qann_value <= 0:
        return None
    return next((t for t in timesteps if entry["metrics"][str(t)][metric] >= 0.99 * qann_value), None)


def _reach(entry: dict, qann_map: float, timesteps: list[int]) -> dict:
    """The first T at 99 % of the QANN's mAP50-95, and the energy there against the ANN's."""
    reach = steps_to_reach(entry, qann_map, timesteps)
    out = {"steps_to_99pct_qann": reach}
    if reach is not None and entry["ann_energy_uj"]:
        energy = entry["energy_uj_at"].get(str(reach))
        out["energy_uj_at_99pct"] = energy
        out["energy_ratio_at_99pct"] = energy / entry["ann_energy_uj"] if energy else None
    return out
