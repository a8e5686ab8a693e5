"""``eval.evaluate(config) -> EvalReport``: mAP against total time steps for the float ANN, the QANN, the CASC SNN,
the same QANN with the paper's schedule (``casc-paper``) and as QCFS neurons (``qcfs``), and the IF baseline.

One pass per method and image batch: the spiking methods record their readouts after every step
and decode detections at each requested T (``detections_at_steps``), so nothing is re-run per T.
T is always the *total* step count (wake + sleep; Faster R-CNN: both stages, T/2 each, the per-stage
split in ``results.json``), so both families share one axis. Each method's run is timed (latency).
Writes ``results.json`` (every figure, the command, versions, model sha256), ``curve.csv``,
``map_vs_t.png``, ``map_vs_energy.png``, ``energy_vs_qann.png``, ``map_vs_latency.png`` and ``firing_rates.png``
into the run folder (``eval/report.py``); finished batches are cached there, so an interrupted run resumes. Every
spiking method also gets its binary-equivalent steps at each T and, at its comparison T, its energy against the QANN
on integer hardware, its memory traffic and its NeuroBench workload figures (``eval/summary.py``), drawn with the
QANN's point in ``energy_vs_qann.png``. Under ``torchrun --nproc_per_node N -m eval ...`` the batches are sharded
over the processes and the detections gathered with ``torch.distributed`` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from detector import __version__
from detector.data import open_dataset, parse_names
from detector.devices import default_threads, resolve_device
from detector.families import get_family
from detector.predict import run_folder
from detector.weights import ModelEntry

from .config import EvalConfig, parse_timesteps, stage_budgets
from .detectors import Detectors, model_pair
from .report import estimate_cost, write_outputs
from .summary import summarise
from .video import MODES, delta_against_fresh, plot_energy_per_frame


@dataclass
class EvalReport:
    """What an evaluation found: the fields of ``results.json`` (``as_json``; what ``eval.plots`` and
    ``eval.compare`` read), the run folder ``out`` and the files written there."""

    command: str
    model: dict
    float_model: dict | None
    data: dict
    schedule: dict
    machine: dict
    versions: dict
    processes: int
    metric: str
    summary: dict
    out: Path
    written: list[str] = field(default_factory=list)
    video: dict | None = None  # CASC by delta frames against fresh runs, when the images are video frames

    def as_json(self) -> dict:
        """``results.json``: every field but the folder and the file list (the video block only when there is one)."""
        plain = {k: v for k, v in asdict(self).items() if k not in ("out", "written", "video")}
        return plain | ({"video": self.video} if self.video is not None else {})


@dataclass
class _Run:
    """An evaluation once its models and data are loaded: what the batches and the report need."""

    config: EvalConfig
    qann: ModelEntry
    float_entry: ModelEntry | None
    detectors: Detectors
    dataset: object
    count: int
    timesteps: list[int]
    device: torch.device
    wake: int


CACHE_FORMAT = 3  # 3: records are Results.to_dict; 2: total-step keys for Faster R-CNN, timed methods


def evaluate(config: EvalConfig) -> EvalReport | None:
    """Run the evaluation ``config`` asks for; writes its run folder and returns its report (None in a torchrun
    process other than the first, which gathers the batches)."""
    rank, world = _distributed()
    torch.set_num_threads(config.threads or default_threads())
    run = _load(config, rank)
    out = Path(config.out) if config.out else _run_folder(config, world)  # made only now: a refused run leaves none
    cache = out / "cache" / _config_key(config, run.timesteps, run.qann, run.float_entry, run.count)
    cache.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, run.count, config.batch))
    _run_batches(run, [s for k, s in enumerate(starts) if k % world == rank], cache,
                 tqdm_args={"desc": f"eval {run.qann.name} on {run.dataset.name}", "disable": rank != 0})
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    batches = [json.loads((cache / f"batch_{s:06d}.json").read_text()) for s in starts]
    report = _report(run, batches, out, world)
    report.written = write_outputs(out, report.as_json())
    if "casc" in config.methods and (config.video if config.video is not None else config.data == "bundled-video"):
        report.video = _video(run, out)
        (out / "results.json").write_text(json.dumps(report.as_json(), indent=1))
        report.written += ["video.json", "energy_per_frame.png"]
    return report


def _load(config: EvalConfig, rank: int) -> _Run:
    """The detectors and the dataset, checked against each other; the cost estimate printed (first process)."""
    device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
    qann, float_entry = model_pair(config.model, config.float_model)
    family = get_family(qann.family)
    timesteps = list(config.timesteps) if config.timesteps else parse_timesteps(family.default_timesteps)
    stage_budgets(qann.family, timesteps)  # an odd T for Faster R-CNN is refused before any work
    detectors = Detectors(qann, float_entry, config, device, dtype)
    classes = parse_names(config.names) or detectors.names  # what VOC xml (and a YAML without names) is read with
    dataset = open_dataset(config.data, config.split, classes=classes)
    count = min(len(dataset), config.limit) if config.limit else len(dataset)
    if count == 0:
        raise ValueError(f"{config.data} ({config.split}) has no images")
    if list(detectors.names) != list(dataset.classes):
        raise ValueError(f"the model's classes {detectors.names} are not the dataset's {dataset.classes}: evaluate "
                         f"on data with the model's classes, in its order (--names sets a VOC dataset's classes)")
    calibration_set = _calibration_dataset(config.data, dataset, classes)
    detectors.load_float([calibration_set.image_path(i)
                          for i in range(min(config.calibration_images, len(calibration_set)))])
    wake = config.wake or detectors.qann.levels
    if rank == 0:
        print(estimate_cost(detectors.probe(dataset.load_image(0)), config.methods, timesteps, count, config,
                            qann.family, wake), flush=True)
    return _Run(config, qann, float_entry, detectors, dataset, count, timesteps, device, wake)


def _report(run: _Run, batches: list[dict], out: Path, world: int) -> EvalReport:
    config, dataset, qann, float_entry = run.config, run.dataset, run.qann, run.float_entry
    summary = summarise(batches, _ground_truth(dataset, run.count), dataset.classes, list(config.methods),
                        run.timesteps, run.detectors.qann.levels)
    return EvalReport(
        command="casc eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
        model={"name": qann.name, "family": qann.family, "sha256": qann.sha256, "path": str(qann.path),
               "levels": run.detectors.qann.levels},
        float_model={"name": float_entry.name, "sha256": float_entry.sha256} if float_entry else None,
        data={"spec": config.data, "split": config.split, "name": dataset.name, "images": run.count},
        schedule={"wake": run.wake, "sleep": config.sleep, "burst": config.burst or run.wake,
                  "max_sleep": config.max_sleep, "timesteps": run.timesteps,
                  "stage_budgets": {str(t): b for t, b in stage_budgets(qann.family, run.timesteps).items()}},
        machine={"device": str(run.device), "engine": config.engine,
                 "provider": config.provider if config.engine == "onnxruntime" else None,
                 "threads": torch.get_num_threads(), "cpu": platform.processor(), "cores": os.cpu_count()},
        versions={"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                  "casc": __version__},
        processes=world, metric=config.metric, summary=summary, out=out)


def _run_folder(config: EvalConfig, world: int) -> Path:
    """``PROJECT/NAME`` (NAME: the model's), numbered when taken unless ``exist_ok``; the processes of one torchrun
    share one folder, so none of them numbers it."""
    return run_folder(config.project, config.name or Path(str(config.model)).stem, config.exist_ok or world > 1)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def _config_key(config: EvalConfig, timesteps: list[int], qann: ModelEntry, float_entry: ModelEntry | None,
                count: int) -> str:
    fields = [CACHE_FORMAT, config.data, config.split, list(config.methods), timesteps, config.wake, config.sleep,
              config.burst, config.max_sleep, config.conf, config.iou, config.max_det, config.batch, count,
              config.calibration_images, config.dtype, qann.sha256 or str(qann.path),
              float_entry.sha256 if float_entry else None, config.engine,
              config.provider if config.engine == "onnxruntime" else None]
    return hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:16]


def _run_batches(run: _Run, starts: list[int], cache: Path, tqdm_args: dict) -> None:
    """Every batch not cached yet, with a per-image progress bar (the method running shown beside it)."""
    batch, count, dataset = run.config.batch, run.count, run.dataset
    total = sum(min(batch, count - s) for s in starts)
    with tqdm(total=total, unit="img", mininterval=0.5, **tqdm_args) as bar:
        for start in starts:
            indices = range(start, min(start + batch, count))
            path = cache / f"batch_{start:06d}.json"
            if not path.is_file():  # else resumed
                images = [dataset.load_image(i) for i in indices]
                ids = [dataset.target(i)["image_id"] for i in indices]
                result = run.detectors.run(images, ids, run.timesteps, on_method=bar.set_postfix_str)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result))
                tmp.replace(path)
            bar.update(len(indices))


def _video(run: _Run, out: Path) -> dict:
    """CASC by delta frames against fresh runs on the frames (``eval.video``); writes video.json and the plot."""
    config = run.config
    options = {"conf": config.conf, "iou": config.iou, "max_det": config.max_det, "wake": config.wake,
               "burst": config.burst, "max_sleep": config.max_sleep}
    with tqdm(total=run.count, unit="frame", desc="video: fresh and delta", mininterval=0.5) as bar:
        video = delta_against_fresh(run.detectors.qann, run.dataset, run.count, config.keyframe_every or None, options,
                                    bar.update)
    (out / "video.json").write_text(json.dumps(video, indent=1))
    plot_energy_per_frame(video, out / "energy_per_frame.png", f"{Path(str(config.model)).stem} on "
                                                              f"{run.dataset.name}: energy per frame, fresh runs vs "
                                                              "delta frames")
    return {k: v for k, v in video.items() if k not in MODES} | {
        mode: {k: v for k, v in video[mode].items() if k != "frames"} for mode in MODES}


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
