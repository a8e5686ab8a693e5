"""``casc eval``: mAP against total time steps for the float ANN, the QANN, the CASC SNN, the same QANN with the
paper's schedule (``casc-paper``) and as QCFS neurons (``qcfs``), and the IF baseline.

One pass per method and image batch: the spiking methods record their readouts after every step
and decode detections at each requested T (``detections_at_steps``), so nothing is re-run per T.
T is always the *total* step count (wake + sleep; Faster R-CNN: both stages, T/2 each, the per-stage
split in ``results.json``), so both families share one axis. Each method's run is timed (latency).
Writes ``results.json`` (every figure, the command, versions, model sha256), ``curve.csv``,
``map_vs_t.png``, ``map_vs_energy.png``, ``energy_vs_qann.png``, ``map_vs_latency.png`` and ``firing_rates.png``
into ``--out``; finished batches are cached there, so an interrupted run resumes. Every spiking method also gets
its binary-equivalent steps at each T and, at its comparison T, its energy against the QANN on integer hardware, its
memory traffic and its NeuroBench workload figures (``comparison``; ``detector.energy``), drawn with the QANN's
point in ``energy_vs_qann.png``. Under ``torchrun --nproc_per_node N -m eval ...`` the batches are sharded
over the processes and the detections gathered with ``torch.distributed`` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from detector.data import open_dataset, parse_names
from detector.detect import KEYFRAME_EVERY
from detector.families import FAMILIES, get_family
from detector.devices import default_threads, resolve_device
from detector.energy import integer_energy, memory_traffic, neurobench_metrics
from detector.models import as_records
from detector.options import Schedule, Selection, add_arguments as add_options
from detector.predict import run_folder
from detector.weights import ENGINES, ModelEntry, load_detector, load_manifest, resolve

from .metrics import coco_metrics, voc_metrics
from .plots import (METRIC_NAMES, plot_energy_vs_qann, plot_firing_rates, plot_map_vs_energy, plot_map_vs_latency,
                    plot_map_vs_t, schedule_text)
from .video import MODES, delta_against_fresh, plot_energy_per_frame
from .video import format_table as format_video_table

METHODS = ("ann", "qann", "casc", "casc-paper", "qcfs", "if")
SPIKING = ("casc", "casc-paper", "qcfs", "if")
DEFAULT_METHODS = ("ann", "qann", "casc", "if")  # casc-paper and qcfs on request (QCFS runs as many steps as IF)
# The reference implementation's schedule (Li et al., arXiv 2406.05371): one spike per neuron per sleep step and a
# fixed sleep window of L..L+4 steps, so T = 2L .. 2L + 4; casc-paper runs to the window's end.
PAPER_SLEEP_EXTRA = 4
# Short enough for a CPU (16 YOLO images in about a minute on 2 cores), long enough to show CASC settle
# (about L + 2 steps with burst sleep) and the IF baseline's slow climb.


def parse_timesteps(spec: str) -> list[int]:
    """``"1-16,24,32"`` -> ``[1, ..., 16, 24, 32]``."""
    steps: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                steps.update(range(lo, hi + 1))
            elif part:
                steps.add(int(part))
    except ValueError:
        raise ValueError(f"--timesteps: expected e.g. 1-16,24,32, got {spec!r}") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"--timesteps must list positive integers, got {spec!r}")
    return sorted(steps)


def stage_budgets(family: str, timesteps: list[int]) -> dict[int, int]:
    """Total T -> the step budget ``detections_at_steps`` takes per stage (T split evenly over the family's spiking
    stages: T itself for YOLO, T/2 for Faster R-CNN)."""
    fam = get_family(family)
    try:
        return {t: fam.steps_per_stage(t) for t in timesteps}
    except ValueError as error:
        raise ValueError(f"--timesteps: {error}") from None


# --- the detectors of one evaluation ------------------------------------------------------------------

def model_pair(model: str, float_model: str | None) -> tuple[ModelEntry, ModelEntry | None]:
    """The QANN entry and the float model it was fine-tuned from (the ANN and the IF baseline's source)."""
    manifest = load_manifest()
    qann = resolve(model, manifest)
    if qann.kind != "qann":
        raise ValueError(f"--model must be a QANN; {qann.name} is a {qann.kind} model: quantize it first (casc quantize "
                         f"--model {qann.name} --levels 4 --data DATA --out qann.pt), then casc eval --model qann.pt "
                         f"--float-model {qann.name}")
    source = float_model or qann.float_model
    return qann, (resolve(source, manifest) if source else None)


class Detectors:
    """Builds what each method needs and runs one batch of images through it."""

    def __init__(self, qann: ModelEntry, float_entry: ModelEntry | None, methods: list[str],
                 args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        self.family, self.args, self.methods = qann.family, args, methods
        self.float_entry, self.device, self.dtype = float_entry, device, dtype
        self.needs_float = {"ann", "if"} & set(methods)
        if "qcfs" in methods and args.engine != "pytorch":
            raise ValueError("--methods qcfs runs on the PyTorch engine only (the exported step graphs are the CASC "
                             "network's); drop qcfs or use --engine pytorch")
        engine = {"engine": args.engine, "provider": args.provider, "batch": args.batch, "threads": args.threads} \
            if args.engine != "pytorch" else {}
        # first: a float checkpoint given as --model is refused with what to do, before asking for --float-model
        self.qann = load_detector(_source(qann), device=device, dtype=dtype, **engine)
        self.names = [self.qann.names[i] for i in sorted(self.qann.names)]
        if "qcfs" in methods:  # the same QANN, QCFS neurons
            self.qcfs = load_detector(_source(qann), device=device, dtype=dtype, neuron="qcfs")
        if self.needs_float and float_entry is None:
            raise ValueError(f"methods {sorted(self.needs_float)} need the float model: pass --float-model (or "
                             "--methods qann,casc)")

    def load_float(self, calibration: list) -> None:
        """The float model for ANN and the IF baseline (thresholds from ``calibration`` images' activations, on
        the PyTorch engine), when a method needs it."""
        if self.needs_float:
            self.float = load_detector(_source(self.float_entry), device=self.device, dtype=self.dtype, neuron="if",
                                       calibration=calibration)

    def _flat(self, detector, images) -> list:
        a = self.args
        return detector.qann_predict(images, conf=a.conf, iou=a.iou, max_det=a.max_det, color="rgb")

    def _curve(self, detector, images, budgets: list[int], wake, sleep, burst=None):
        a = self.args
        results, info = detector.detections_at_steps(images, budgets, conf=a.conf, iou=a.iou, max_det=a.max_det,
                                                     wake=wake, sleep=sleep, burst=burst, max_sleep=a.max_sleep,
                                                     color="rgb")
        return results, (self._two_stage_info(info) if len(get_family(self.family).stages) > 1 else info)

    @staticmethod
    def _two_stage_info(info: dict) -> dict:
        """The YOLO adapter's info shape for a two-stage run (total steps of both stages)."""
        return {"steps": info["steps"], "settled": info["settled"], "energy_uj": info["energy_uj"],
                "energy_uj_at": info["energy_uj_at"], "steps_at": info["steps_at"],
                **({"workload_at": info["workload_at"]} if "workload_at" in info else {}),
                "stage1_steps_at": info["stage1_steps_at"], "stage2_steps_at": info["stage2_steps_at"],
                "ann_energy_uj": float(np.mean(info["ann_energy_uj"])),
                "firing_rates": info.get("firing_rates", {})}

    def run(self, images: list[np.ndarray], image_ids: list[int], timesteps: list[int], on_method=None) -> dict:
        """{method: {"records": {T or "flat" or "auto": [record per image]}, "info": ..., "seconds": ...}} for one
        batch; ``on_method(name)`` is called as each method starts (progress)."""
        out = {}
        for method in self.methods:
            if on_method:
                on_method(method)
            start = time.perf_counter()
            if method in ("ann", "qann"):
                detector = self.float if method == "ann" else self.qann
                out[method] = {"records": {"flat": self._records(self._flat(detector, images), image_ids)}}
            else:
                out[method] = self._spiking(method, images, image_ids, timesteps)
            out[method]["seconds"] = time.perf_counter() - start
        return out

    def _spiking(self, method: str, images, image_ids, timesteps: list[int]) -> dict:
        """One run serving every T; results and per-T info keyed by total T (and ``auto``)."""
        a = self.args
        budgets = {str(t): b for t, b in stage_budgets(self.family, timesteps).items()}
        if method == "casc" and a.sleep == "auto":  # past the cap every sample has settled (or hit the cap)
            budgets["auto"] = self.auto_key
        detector, wake, sleep, burst = self.schedule(method)
        results, info = self._curve(detector, images, sorted(set(budgets.values())), wake, sleep, burst)
        records = {key: self._records(results[b], image_ids) for key, b in budgets.items()}
        for name in ("energy_uj_at", "workload_at", "steps_at", "stage1_steps_at", "stage2_steps_at"):
            if name in info:
                info[name] = {key: info[name][b] for key, b in budgets.items()}
        return {"records": records, "info": _plain(info)}

    def schedule(self, method: str) -> tuple:
        """(detector, wake, sleep, burst) of a spiking method: CASC as asked; casc-paper one spike per sleep step
        and ``L + PAPER_SLEEP_EXTRA`` sleep steps; QCFS and IF rate-coded (wake = T, no sleep)."""
        a = self.args
        if method == "casc":
            return self.qann, a.wake, a.sleep, a.burst
        if method == "casc-paper":
            return self.qann, a.wake, (a.wake or self.qann.levels) + PAPER_SLEEP_EXTRA, 1
        return (self.qcfs if method == "qcfs" else self.float), None, 0, None

    @property
    def auto_key(self) -> int:
        return 10_000 + self.args.max_sleep  # a step count no run reaches

    def probe(self, image: np.ndarray) -> dict[str, float]:
        """Seconds of one QANN forward, of one spiking step and of a spiking run's fixed part (setup, decoding),
        on one image after a warm-up: what the cost estimate prices. Steps from a 1- and a 4-step run."""
        stages = len(get_family(self.family).stages)
        forward = _best_of(2, lambda: self._flat(self.qann, [image]))
        short, long = (_best_of(2, lambda k=k: self._curve(self.qann, [image], [k], k, 0)) for k in (1, 4))
        step = max(long - short, 0.0) / (3 * stages)
        return {"forward_s": forward, "step_s": step, "run_s": max(short - stages * step, 0.0)}

    def _records(self, results, image_ids) -> list[dict]:
        return [dict(as_records(r, self.names), image_id=int(i)) for r, i in zip(results, image_ids)]


def _source(entry: ModelEntry):
    """What ``load_detector`` takes for ``entry``: its manifest name (checked against the manifest's sha256), else
    its checkpoint path."""
    return entry.name if entry.sha256 else entry.path


def _best_of(runs: int, work) -> float:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def _plain(value):
    """JSON-ready: tensors to lists, keys to strings."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- metrics and reports ---------------------------------------------------------------------------------

def _metrics(ground_truth, records, classes) -> dict:
    detections = [{"image_id": r["image_id"], "boxes": np.asarray(r["boxes"], np.float64).reshape(-1, 4),
                   "scores": r["scores"], "labels": r["classes"]} for r in records]
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


# --- the run -----------------------------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


CACHE_FORMAT = 2  # 2: total-step keys for Faster R-CNN, timed methods; older caches are not reused


def _config_key(args, timesteps, methods, qann, float_entry, count) -> str:
    fields = [CACHE_FORMAT, args.data, args.split, methods, timesteps, args.wake, args.sleep, args.burst, args.max_sleep, args.conf,
              args.iou, args.max_det, args.batch, count, args.calibration_images, args.dtype,
              qann.sha256 or str(qann.path), float_entry.sha256 if float_entry else None,
              args.engine, args.provider if args.engine == "onnxruntime" else None]
    return hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:16]


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    return methods


def estimate_cost(probe: dict[str, float], methods: list[str], timesteps: list[int], images: int,
                  args: argparse.Namespace, family: str, wake: int) -> str:
    """The run's cost before it starts: network passes per image, priced with one timed forward and step."""
    forwards = sum(m in methods for m in ("ann", "qann"))
    steps = {}
    stages = len(get_family(family).stages)
    if "casc" in methods:
        if args.sleep == "auto":  # burst sleep settles in about 2 sleep steps; one spike per step needs tens
            sleep = 2 if (args.burst or wake) >= wake else 20
        else:
            sleep = args.sleep
        steps["CASC"] = stages * (wake + sleep)
    if "casc-paper" in methods:
        steps["CASC-PAPER"] = stages * (2 * wake + PAPER_SLEEP_EXTRA)
    for rate_coded in ("qcfs", "if"):
        if rate_coded in methods:
            steps[rate_coded.upper()] = max(timesteps)
    per_image = forwards * probe["forward_s"] + sum(steps.values()) * probe["step_s"] + len(steps) * probe["run_s"]
    parts = ([f"{forwards} forward{'s' * (forwards > 1)}"] if forwards else []) + \
        [f"{name} {'≈ ' * (name == 'CASC' and args.sleep == 'auto')}{n} steps" for name, n in steps.items()]
    return (f"cost estimate: {images} image{'s' * (images != 1)} × ({' + '.join(parts)}); one forward {probe['forward_s'] * 1e3:.0f} ms, "
            f"one spiking step {probe['step_s'] * 1e3:.0f} ms + {probe['run_s'] * 1e3:.0f} ms per run (timed here) -> about "
            f"{_duration(images * per_image)} for the detectors, plus loading and mAP")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def evaluate(args: argparse.Namespace) -> dict:
    rank, world = _distributed()
    methods = parse_methods(args.methods)
    torch.set_num_threads(args.threads or default_threads())
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    qann, float_entry = model_pair(args.model, args.float_model)
    timesteps = parse_timesteps(args.timesteps or get_family(qann.family).default_timesteps)
    stage_budgets(qann.family, timesteps)  # an odd T for Faster R-CNN is refused before any work
    detectors = Detectors(qann, float_entry, methods, args, device, dtype)
    classes = parse_names(args.names) or detectors.names  # what VOC xml (and a YAML without names) is read with
    dataset = open_dataset(args.data, args.split, classes=classes)
    count = min(len(dataset), args.limit) if args.limit else len(dataset)
    if count == 0:
        raise ValueError(f"{args.data} ({args.split}) has no images")
    if list(detectors.names) != list(dataset.classes):
        raise ValueError(f"the model's classes {detectors.names} are not the dataset's {dataset.classes}: evaluate "
                         f"on data with the model's classes, in its order (--names sets a VOC dataset's classes)")
    calibration_set = _calibration_dataset(args.data, dataset, classes)
    detectors.load_float([calibration_set.image_path(i)
                          for i in range(min(args.calibration_images, len(calibration_set)))])
    wake = args.wake or detectors.qann.levels
    if rank == 0:
        print(estimate_cost(detectors.probe(dataset.load_image(0)), methods, timesteps, count, args, qann.family,
                            wake), flush=True)

    out = Path(args.out) if args.out else run_folder_of(args)  # made only now: a refused run leaves none
    args.out = str(out)
    cache = out / "cache" / _config_key(args, timesteps, methods, qann, float_entry, count)
    cache.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, count, args.batch))
    _run_batches(detectors, dataset, [s for k, s in enumerate(starts) if k % world == rank], count, timesteps,
                 cache, tqdm_args={"desc": f"eval {qann.name} on {dataset.name}", "disable": rank != 0})
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return {}
    batches = [json.loads((cache / f"batch_{s:06d}.json").read_text()) for s in starts]
    summary = summarise(batches, _ground_truth(dataset, count), dataset.classes, methods, timesteps,
                        detectors.qann.levels)
    results = {
        "command": "casc eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
        "model": {"name": qann.name, "family": qann.family, "sha256": qann.sha256, "path": str(qann.path),
                  "levels": detectors.qann.levels},
        "float_model": {"name": float_entry.name, "sha256": float_entry.sha256} if float_entry else None,
        "data": {"spec": args.data, "split": args.split, "name": dataset.name, "images": count},
        "schedule": {"wake": wake, "sleep": args.sleep, "burst": args.burst or wake, "max_sleep": args.max_sleep,
                     "timesteps": timesteps,
                     "stage_budgets": {str(t): b for t, b in stage_budgets(qann.family, timesteps).items()}},
        "machine": {"device": str(device), "engine": args.engine,
                    "provider": args.provider if args.engine == "onnxruntime" else None, "threads": torch.get_num_threads(), "cpu": platform.processor(),
                    "cores": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "casc": _version()},
        "processes": world, "metric": args.metric, "summary": summary,
    }
    results["written"] = _write_outputs(out, results)
    if "casc" in methods and (args.video if args.video is not None else args.data == "bundled-video"):
        results["video"] = _video(detectors.qann, dataset, count, args, out)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        results["written"] += ["video.json", "energy_per_frame.png"]
    return results


def _video(detector, dataset, count: int, args: argparse.Namespace, out: Path) -> dict:
    """CASC by delta frames against fresh runs on the frames (``eval.video``); writes video.json and the plot."""
    options = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det, "wake": args.wake, "burst": args.burst,
               "max_sleep": args.max_sleep}
    with tqdm(total=count, unit="frame", desc="video: fresh and delta", mininterval=0.5) as bar:
        video = delta_against_fresh(detector, dataset, count, args.keyframe_every or None, options, bar.update)
    (out / "video.json").write_text(json.dumps(video, indent=1))
    plot_energy_per_frame(video, out / "energy_per_frame.png", f"{Path(str(args.model)).stem} on {dataset.name}: "
                                                              "energy per frame, fresh runs vs delta frames")
    return {k: v for k, v in video.items() if k not in MODES} | {
        mode: {k: v for k, v in video[mode].items() if k != "frames"} for mode in MODES}


def _run_batches(detectors: Detectors, dataset, starts: list[int], count: int, timesteps: list[int], cache: Path,
                 tqdm_args: dict) -> None:
    """Every batch not cached yet, with a per-image progress bar (the method running shown beside it)."""
    batch = detectors.args.batch
    total = sum(min(batch, count - s) for s in starts)
    with tqdm(total=total, unit="img", mininterval=0.5, **tqdm_args) as bar:
        for start in starts:
            indices = range(start, min(start + batch, count))
            path = cache / f"batch_{start:06d}.json"
            if not path.is_file():  # else resumed
                images = [dataset.load_image(i) for i in indices]
                ids = [dataset.target(i)["image_id"] for i in indices]
                result = detectors.run(images, ids, timesteps, on_method=bar.set_postfix_str)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result))
                tmp.replace(path)
            bar.update(len(indices))


def _ground_truth(dataset, count: int) -> list[dict]:
    ground_truth = []
    for i in range(count):
        h, w = dataset.image_size(i)
        ground_truth.append({**dataset.target(i), "height": h, "width": w})
    return ground_truth


def _calibration_dataset(spec: str, dataset, classes: list[str]):
    """IF thresholds come from the training split when the data has one (no peeking at test images)."""
    try:
        train = open_dataset(spec, "train", classes=classes)
        return train if len(train) else dataset
    except (ValueError, FileNotFoundError):
        return dataset


def _version() -> str:
    from detector import __version__

    return __version__


def _write_outputs(out: Path, results: dict) -> list[str]:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    manifest = load_manifest()
    default_model = next((n for n, e in manifest.items() if e.kind == "qann"), None)
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="QANN: a bundled name (weights/manifest.json) or a checkpoint path")
    parser.add_argument("--float-model", default=None,
                        help="the float model it was fine-tuned from, for ANN and IF (None: the manifest's)")
    parser.add_argument("--data", default="bundled", help="bundled | bundled-video | coco:DIR | voc:DIR | data.yaml")
    parser.add_argument("--split", default="val", help="dataset split to evaluate")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated: ann (float network), qann (quantized network), casc (the CASC SNN), "
                             f"casc-paper (CASC with the paper's schedule: burst 1, L+{PAPER_SLEEP_EXTRA} sleep steps), "
                             "qcfs (the same QANN as QCFS neurons, wake=T, no sleep), if (plain IF rate-coded SNN "
                             "baseline of the float model)")
    parser.add_argument("--timesteps", default=None,
                        help="total steps T to evaluate, e.g. 1-16,24,32 (Faster R-CNN: even T, T/2 per stage). "
                             "None: the family's own list (" + "; ".join(f"{f.name}: {f.default_timesteps}"
                                                                          for f in FAMILIES.values()) + ")")
    # CASC's schedule and the detections kept; conf low, for mAP
    add_options(parser, Schedule, Selection, defaults={"conf": 0.001}, skip=("classes",))
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images (None: all)")
    parser.add_argument("--batch", type=int, default=1, help="images per run (also the cache and progress unit)")
    parser.add_argument("--calibration-images", type=int, default=32,
                        help="training images for the IF baseline's thresholds")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--engine", default="pytorch", choices=ENGINES,
                        help="what runs the CASC network: pytorch (eager), or onnxruntime (its exported step graphs, "
                             "exported on first use; no spike counts, so no energy; ann, qann and the IF baseline "
                             "stay on PyTorch)")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                        help="ONNX Runtime execution provider with --engine onnxruntime")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="float64: CASC reproduces the QANN exactly; float32: rare boundary flips")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (None: half the cores, at least 1; more threads than free cores "
                             "make every step wait for a descheduled thread)")
    parser.add_argument("--names", default=None,
                        help="class names, comma-separated or a text file with one per line: how a VOC dataset's "
                             "(or a names-less data.yaml's) objects map to class ids (None: the model's names)")
    parser.add_argument("--metric", default="map50_95", choices=list(METRIC_NAMES),
                        help="what the table, the plots and T to 99%% QANN show: COCO mAP50-95 or mAP50, VOC07 "
                             "11-point or all-point AP50 (results.json and curve.csv keep them all)")
    parser.add_argument("--project", default="runs/eval", help="parent folder of the run folders")
    parser.add_argument("--name", default=None, help="run folder name (None: the model's name; numbered when "
                                                     "taken: NAME2, NAME3, ...)")
    parser.add_argument("--exist-ok", action="store_true",
                        help="write into PROJECT/NAME even if it exists (and resume its finished batches); always so "
                             "under torchrun")
    parser.add_argument("--out", default=None, help="the output folder itself, used as it is (resumes a run there); "
                                                    "None: PROJECT/NAME")
    parser.add_argument("--video", action=argparse.BooleanOptionalAction, default=None,
                        help="the images are video frames, one sequence per folder: CASC also runs them by delta "
                             "frames against fresh runs (video.json, energy_per_frame.png; default: on for "
                             "bundled-video)")
    parser.add_argument("--keyframe-every", type=int, default=KEYFRAME_EVERY,
                        help="with --video: a whole schedule every N frames (0: only the first of each sequence)")


def run_folder_of(args: argparse.Namespace) -> Path:
    """``PROJECT/NAME`` (NAME: the model's), numbered when taken unless ``--exist-ok``; the processes of one
    torchrun share one folder, so none of them numbers it."""
    shared = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return run_folder(args.project, args.name or Path(str(args.model)).stem, args.exist_ok or shared)


def main(args: argparse.Namespace) -> int:
    results = evaluate(args)
    if results:
        print(format_table(results["summary"], results["schedule"]["timesteps"],
                           len(get_family(results["model"]["family"]).stages) > 1,
                           args.metric))
        if "video" in results:
            print(format_video_table(results["video"]))
        print(f"results in {Path(args.out).resolve()}: {', '.join(results['written'])}")
    return 0
