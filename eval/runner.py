"""``casc eval``: mAP against total time steps for the float ANN, the QANN, the CASC SNN and the IF baseline.

One pass per method and image batch: the spiking methods record their readouts after every step
and decode detections at each requested T (``detections_at_steps``), so nothing is re-run per T.
Writes ``results.json`` (every figure, the command, versions, model sha256), ``curve.csv``,
``map_vs_t.png`` and ``firing_rates.png`` into ``--out``; finished batches are cached there, so an
interrupted run resumes. Under ``torchrun --nproc_per_node N -m eval ...`` the batches are sharded
over the processes and the detections gathered with ``torch.distributed`` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from detector.data import open_dataset
from detector.models import as_records
from detector.weights import ModelEntry, load_manifest, resolve, verify_sha256

from .metrics import coco_metrics, voc_metrics
from .plots import plot_firing_rates, plot_map_vs_t

METHODS = ("ann", "qann", "casc", "if")
SPIKING = ("casc", "if")
TABLE_STEPS = (1, 2, 4, 8, 16, "auto", 64)


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


# --- the detectors of one evaluation ------------------------------------------------------------------

def model_pair(model: str, float_model: str | None) -> tuple[ModelEntry, ModelEntry | None]:
    """The QANN entry and the float model it was fine-tuned from (the ANN and the IF baseline's source)."""
    manifest = load_manifest()
    qann = resolve(model, manifest)
    if qann.kind != "qann":
        raise ValueError(f"--model must be a QANN; {qann.name} is a {qann.kind} model")
    source = float_model or qann.float_model
    return qann, (resolve(source, manifest) if source else None)


class Detectors:
    """Builds what each method needs and runs one batch of images through it."""

    def __init__(self, qann: ModelEntry, float_entry: ModelEntry | None, methods: list[str], calibration: list,
                 args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        self.family, self.args, self.methods = qann.family, args, methods
        needs_float = {"ann", "if"} & set(methods)
        if needs_float and float_entry is None:
            raise ValueError(f"methods {sorted(needs_float)} need the float model: pass --float-model")
        for entry in (qann, float_entry):
            if entry is not None:
                verify_sha256(entry.path, entry.sha256)
        if self.family == "yolo":
            from detector.models.yolo import SpikingYOLO, letterbox

            self.qann = SpikingYOLO.from_checkpoint(qann.path, device=device, dtype=dtype)
            self.names = [self.qann.names[i] for i in sorted(self.qann.names)]
            if needs_float:
                batches = [letterbox([im[..., ::-1] for im in calibration[i:i + 8]], self.qann.imgsz)[0]
                           for i in range(0, len(calibration), 8)]
                self.float = SpikingYOLO.from_checkpoint(float_entry.path, device=device, dtype=dtype, neuron="if",
                                                         calibration=batches, imgsz=self.qann.imgsz)
        else:
            from detector.models.rcnn import SpikingFasterRCNN

            self.qann = SpikingFasterRCNN.from_checkpoint(qann.path).to(device=device, dtype=dtype)
            self.names = list(self.qann.classes)
            if needs_float:
                self.float = SpikingFasterRCNN.from_checkpoint(float_entry.path, neuron="if",
                                                               calibration=calibration).to(device=device, dtype=dtype)

    def _flat(self, detector, images) -> list:
        a = self.args
        if self.family == "yolo":
            return detector.qann_predict(images, conf=a.conf, iou=a.iou, max_det=a.max_det, color="rgb")
        return detector.qann_predict(images, score_thresh=a.conf)

    def _curve(self, detector, images, timesteps: list[int], wake, sleep):
        a = self.args
        if self.family == "yolo":
            return detector.detections_at_steps(images, timesteps, wake=wake, sleep=sleep, conf=a.conf, iou=a.iou,
                                                max_det=a.max_det, burst=a.burst, color="rgb",
                                                max_sleep=a.max_sleep)
        results, info = detector.detections_at_steps(images, timesteps, wake=wake, sleep=sleep, burst=a.burst,
                                                     score_thresh=a.conf, max_sleep=a.max_sleep)
        return results, self._two_stage_info(info)

    @staticmethod
    def _two_stage_info(info: dict) -> dict:
        """The YOLO adapter's info shape for a two-stage run (total steps of both stages)."""
        return {"steps": info["steps"], "settled": info["settled"], "energy_uj": info["energy_uj"],
                "energy_uj_at": info["energy_uj_at"], "steps_at": info["steps_at"],
                "stage1_steps_at": info["stage1_steps_at"], "stage2_steps_at": info["stage2_steps_at"],
                "ann_energy_uj": float(np.mean(info["ann_energy_uj"])),
                "firing_rates": info.get("firing_rates", {})}

    def run(self, images: list[np.ndarray], image_ids: list[int], timesteps: list[int]) -> dict:
        """{method: {"records": {T or "flat": [record per image]}, "info": ...}} for one batch."""
        a = self.args
        out = {}
        for method in self.methods:
            if method in ("ann", "qann"):
                detector = self.float if method == "ann" else self.qann
                out[method] = {"records": {"flat": self._records(self._flat(detector, images), image_ids)}}
                continue
            detector = self.qann if method == "casc" else self.float
            steps = list(timesteps)
            auto = method == "casc" and a.sleep == "auto"
            if auto:  # past the cap every sample has settled (or hit the cap): its final answer
                steps.append(self.auto_key)
            results, info = self._curve(detector, images, steps, a.wake if method == "casc" else None,
                                        a.sleep if method == "casc" else 0)
            records = {str(t): self._records(results[t], image_ids) for t in timesteps}
            if auto:
                records["auto"] = self._records(results[self.auto_key], image_ids)
            out[method] = {"records": records, "info": _plain(info)}
        return out

    @property
    def auto_key(self) -> int:
        return 10_000 + self.args.max_sleep  # a step count no run reaches

    def _records(self, results, image_ids) -> list[dict]:
        return [dict(as_records(r, self.names), image_id=int(i)) for r, i in zip(results, image_ids)]


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
              timesteps: list[int]) -> dict:
    summary = {}
    for method in methods:
        parts = [b[method] for b in batches]
        keys = list(parts[0]["records"])
        entry = {"metrics": {}}
        for key in keys:
            records = [r for p in parts for r in p["records"][key]]
            entry["metrics"][key] = _metrics(ground_truth, records, classes)
            if method in SPIKING:
                entry["metrics"][key]["steps_mean"] = _mean(r["steps"] for r in records)
        if method in SPIKING:
            infos = [p["info"] for p in parts]
            energy_at = {str(t): _mean(e for i in infos for e in i.get("energy_uj_at", {}).get(str(t), [])) for t in timesteps}
            entry["energy_uj_at"] = energy_at
            entry["ann_energy_uj"] = _mean(i.get("ann_energy_uj") for i in infos)
            entry["steps_used_mean"] = _mean(s for i in infos for s in i.get("steps", []))
            entry["steps_used_max"] = max((s for i in infos for s in i.get("steps", [])), default=None)
            rates = [i.get("firing_rates", {}) for i in infos]
            entry["firing_rates"] = {k: _mean(r.get(k) for r in rates) for k in rates[0]} if rates else {}
        summary[method] = entry
    qann = summary.get("qann", {}).get("metrics", {}).get("flat", {}).get("map50_95")
    for method in SPIKING:
        if method in summary and qann is not None:
            curve = summary[method]["metrics"]
            reach = next((t for t in timesteps if curve[str(t)]["map50_95"] >= 0.99 * qann), None)
            summary[method]["steps_to_99pct_qann"] = reach
            if reach is not None and summary[method]["ann_energy_uj"]:
                energy = summary[method]["energy_uj_at"].get(str(reach))
                summary[method]["energy_uj_at_99pct"] = energy
                summary[method]["energy_ratio_at_99pct"] = energy / summary[method]["ann_energy_uj"] if energy else None
    return summary


def format_table(summary: dict, timesteps: list[int], two_stage: bool = False) -> str:
    columns = [t for t in TABLE_STEPS if t == "auto" or t in timesteps]
    head = ["method"] + [f"T={t}" for t in columns] + ["T to 99% QANN", "energy ratio (SNN/ANN)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, entry in summary.items():
        metrics = entry["metrics"]
        if "flat" in metrics:
            m = metrics["flat"]
            cells = [f"{m['map50_95']:.3f} / {m['map50']:.3f}"] * len(columns)
            extra = ["—", "1 (ANN)" if method == "ann" else "—"]
        else:
            cells = []
            for t in columns:
                m = metrics.get(str(t))
                if m is None:
                    cells.append("—")
                elif t == "auto":
                    cells.append(f"{m['map50_95']:.3f} / {m['map50']:.3f} (T≈{m['steps_mean']:.1f})")
                else:
                    cells.append(f"{m['map50_95']:.3f} / {m['map50']:.3f}")
            reach = entry.get("steps_to_99pct_qann")
            ratio = entry.get("energy_ratio_at_99pct")
            extra = [str(reach) if reach else f"> {max(timesteps)}", f"{ratio:.2f}" if ratio else "—"]
        lines.append("| " + " | ".join([method.upper()] + cells + extra) + " |")
    return "\n".join(lines) + "\n(cells: mAP50-95 / mAP50; " + (
        "T = steps per stage, each stage wake + sleep; totals in results.json)" if two_stage
        else "T = total steps, wake + sleep)")


# --- the run -----------------------------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def _config_key(args, timesteps, methods, qann, float_entry, count) -> str:
    fields = [args.data, args.split, methods, timesteps, args.wake, args.sleep, args.burst, args.max_sleep, args.conf,
              args.iou, args.max_det, args.batch, count, args.calibration_images, args.dtype,
              qann.sha256 or str(qann.path), float_entry.sha256 if float_entry else None]
    return hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:16]


def evaluate(args: argparse.Namespace) -> dict:
    rank, world = _distributed()
    timesteps = parse_timesteps(args.timesteps)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.sleep != "auto":
        args.sleep = int(args.sleep)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    qann, float_entry = model_pair(args.model, args.float_model)
    dataset = open_dataset(args.data, args.split)
    count = min(len(dataset), args.limit) if args.limit else len(dataset)
    if count == 0:
        raise ValueError(f"{args.data} ({args.split}) has no images")
    calibration_set = _calibration_dataset(args.data, dataset)
    calibration = [calibration_set.load_image(i) for i in range(min(args.calibration_images, len(calibration_set)))]
    detectors = Detectors(qann, float_entry, methods, calibration, args, device, dtype)
    if list(detectors.names) != list(dataset.classes):
        raise ValueError(f"the model's classes {detectors.names} are not the dataset's {dataset.classes}")

    out = Path(args.out)
    key = _config_key(args, timesteps, methods, qann, float_entry, count)
    cache = out / "cache" / key
    cache.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, count, args.batch))
    mine = [s for k, s in enumerate(starts) if k % world == rank]
    for start in tqdm(mine, desc=f"eval {qann.name} on {dataset.name}", unit="batch", disable=rank != 0):
        path = cache / f"batch_{start:06d}.json"
        if path.is_file():
            continue  # resumed
        indices = range(start, min(start + args.batch, count))
        images = [dataset.load_image(i) for i in indices]
        ids = [dataset.target(i)["image_id"] for i in indices]
        result = detectors.run(images, ids, timesteps)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return {}
    batches = [json.loads((cache / f"batch_{s:06d}.json").read_text()) for s in starts]
    ground_truth = []
    for i in range(count):
        target = dataset.target(i)
        h, w = dataset.image_size(i)
        ground_truth.append({**target, "height": h, "width": w})
    summary = summarise(batches, ground_truth, dataset.classes, methods, timesteps)
    results = {
        "command": "casc eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
        "model": {"name": qann.name, "family": qann.family, "sha256": qann.sha256, "path": str(qann.path)},
        "float_model": {"name": float_entry.name, "sha256": float_entry.sha256} if float_entry else None,
        "data": {"spec": args.data, "split": args.split, "name": dataset.name, "images": count},
        "schedule": {"wake": args.wake or getattr(detectors.qann, "levels", None), "sleep": args.sleep,
                     "burst": args.burst, "max_sleep": args.max_sleep, "timesteps": timesteps},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "casc": _version()},
        "processes": world, "summary": summary,
    }
    _write_outputs(out, results, summary, timesteps, qann.name, dataset.name)
    return results


def _calibration_dataset(spec: str, dataset):
    """IF thresholds come from the training split when the data has one (no peeking at test images)."""
    try:
        train = open_dataset(spec, "train")
        return train if len(train) else dataset
    except (ValueError, FileNotFoundError):
        return dataset


def _version() -> str:
    from detector import __version__

    return __version__


def _write_outputs(out: Path, results: dict, summary: dict, timesteps: list[int], model: str, data: str) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    rows = ["method,T,map50_95,map50,voc07_map50,steps_mean,energy_uj"]
    for method, entry in summary.items():
        for key, m in entry["metrics"].items():
            t = "" if key == "flat" else key
            energy = entry.get("energy_uj_at", {}).get(key, "")
            rows.append(f"{method},{t},{m['map50_95']:.5f},{m['map50']:.5f},{m['voc07_map50']:.5f},"
                        f"{m.get('steps_mean') or ''},{energy or ''}")
    (out / "curve.csv").write_text("\n".join(rows) + "\n")
    curves = {m: {t: summary[m]["metrics"][str(t)]["map50_95"] for t in timesteps} for m in SPIKING if m in summary}
    flat = {m: summary[m]["metrics"]["flat"]["map50_95"] for m in ("ann", "qann") if m in summary}
    two_stage = results["model"]["family"] == "rcnn"
    plot_map_vs_t(curves, flat, results["schedule"]["wake"] or 1, out / "map_vs_t.png",
                  title=f"{model} on {data}: mAP50-95 vs time steps",
                  xlabel="time steps per stage (total = stage 1 + stage 2)" if two_stage else
                  "total time steps T = wake + sleep")
    if "casc" in summary and summary["casc"].get("firing_rates"):
        plot_firing_rates(summary["casc"]["firing_rates"], out / "firing_rates.png",
                          title=f"{model}: CASC firing rate per layer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    manifest = load_manifest()
    default_model = next((n for n, e in manifest.items() if e.kind == "qann"), None)
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="QANN: a bundled name (weights/manifest.json) or a checkpoint path")
    parser.add_argument("--float-model", default=None, help="its float model (default: the manifest's float_model)")
    parser.add_argument("--data", default="bundled", help="bundled | coco:DIR | voc:DIR | data.yaml")
    parser.add_argument("--split", default="val")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--timesteps", default="1-16,24,32,64,128", help="total steps T to evaluate, e.g. 1-16,24,32")
    parser.add_argument("--wake", type=int, default=None, help="CASC wake steps (default: the QANN's levels)")
    parser.add_argument("--sleep", default="auto", help='CASC sleep steps: a number or "auto"')
    parser.add_argument("--burst", type=int, default=1, help="spikes a neuron may emit per sleep step")
    parser.add_argument("--max-sleep", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--conf", type=float, default=0.001, help="score threshold (low, for mAP)")
    parser.add_argument("--iou", type=float, default=0.7)
    parser.add_argument("--max-det", type=int, default=300)
    parser.add_argument("--calibration-images", type=int, default=32, help="images for the IF thresholds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="output folder (default runs/eval/MODEL)")


def main(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = str(Path("runs") / "eval" / Path(str(args.model)).stem)
    results = evaluate(args)
    if results:
        print(format_table(results["summary"], results["schedule"]["timesteps"], results["model"]["family"] == "rcnn"))
        print(f"results: {Path(args.out).resolve()}/results.json, curve.csv, map_vs_t.png, firing_rates.png")
    return 0
