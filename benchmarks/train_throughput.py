"""Training throughput of both QAT recipes (issue 24): images per second, split into data loading and the step.

- ``yolo``: ``casc train yolo`` (Ultralytics' trainer with the recipe: mosaic and the other augmentations, AMP
  off on the CPU) from a bundled QANN, on the first ``--images`` bundled training images at ``--imgsz``;
  Ultralytics' callbacks time each batch: loading (one process, ``--workers 0``) and the step (forward,
  backward, optimizer, EMA).
- ``rcnn``: ``casc train rcnn``'s epoch loop (``train_one_epoch``) on a fresh QANN of ``--arch`` with
  ``--min-size`` / ``--max-size``, bundled training images; loading timed apart from the steps.

The first step is a warm-up and is not counted. docs/training.md turns the figures into time per epoch.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py yolo --imgsz 640 --batch 8 --steps 4
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py rcnn --arch resnet50_fpn --min-size 800 --batch 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml


def _subset_yaml(folder: Path, images: int) -> Path:
    from detector.data import ensure_bundled

    root = ensure_bundled()
    files = sorted((root / "images" / "train").iterdir())[:images]
    (folder / "train.txt").write_text("".join(f"{p}\n" for p in files))
    (folder / "val.txt").write_text(f"{files[0]}\n")
    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    data = folder / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(folder), "train": "train.txt", "val": "val.txt", "names": names}))
    return data


def yolo(args: argparse.Namespace) -> dict:
    from ultralytics.utils import callbacks

    from casc.cli import main

    marks: list[tuple[str, float]] = []
    hooks = {event: (lambda trainer, e=event: marks.append((e, time.perf_counter())))
             for event in ("on_train_epoch_start", "on_train_batch_start", "on_train_batch_end")}
    for event, hook in hooks.items():
        callbacks.default_callbacks[event].append(hook)
    with tempfile.TemporaryDirectory() as tmp:
        data = _subset_yaml(Path(tmp), args.batch * (args.steps + 1))
        code = main(["train", "yolo", "--model", args.model, "--data", str(data), "--epochs", "1", "--batch",
                     str(args.batch), "--imgsz", str(args.imgsz), "--device", args.device, "--workers", "0",
                     "--no-plots", "--calibrate-images", str(args.batch), "--out", str(Path(tmp) / "run")])
    if code:
        raise SystemExit(code)
    loading, steps = [], []
    for (event, at), (_, before) in zip(marks[1:], marks):
        if event == "on_train_batch_start":
            loading.append(at - before)
        elif event == "on_train_batch_end":
            steps.append(at - before)
    return _figures(loading[1:], steps[1:], args.batch)


def rcnn(args: argparse.Namespace) -> dict:
    from detector.data import open_dataset
    from detector.models.rcnn import build_fasterrcnn, to_qann_fasterrcnn
    from detector.train.distributed import Process
    from detector.train.rcnn import parameter_groups, train_loader, train_one_epoch

    torch.manual_seed(0)
    model = to_qann_fasterrcnn(build_fasterrcnn(args.arch, 91, min_size=args.min_size, max_size=args.max_size),
                               args.levels, inplace=True)
    optimizer = torch.optim.SGD(parameter_groups(model, "learn", 1e-4), lr=0.02 * args.batch / 16, momentum=0.9,
                                weight_decay=1e-4)
    process, device = Process(), torch.device(args.device)
    model.to(device)
    batches, loading = [], []
    loader = iter(train_loader(open_dataset("bundled", "train"), args.batch, process, seed=0, workers=0))
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        batches.append(next(loader))
        loading.append(time.perf_counter() - start)
    steps = []
    for batch in batches:
        start = time.perf_counter()
        train_one_epoch(model, [batch], optimizer, device, process)
        steps.append(time.perf_counter() - start)
    return _figures(loading[1:], steps[1:], args.batch)


def _figures(loading: list[float], steps: list[float], batch: int) -> dict:
    load, step = sum(loading) / len(loading), sum(steps) / len(steps)
    return {"batch": batch, "steps_timed": len(steps), "s_per_batch_loading": round(load, 3),
            "s_per_batch_step": round(step, 3), "images_per_s_step": round(batch / step, 3),
            "images_per_s_loading_one_process": round(batch / load, 3),
            "images_per_s_serial": round(batch / (load + step), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=("yolo", "rcnn"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps (one more runs first, as a warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    parser.add_argument("--model", default="yolov8n-bundled", help="yolo: the start (a bundled name or checkpoint)")
    parser.add_argument("--imgsz", type=int, default=640, help="yolo: training image size")
    parser.add_argument("--arch", default="resnet50_fpn", help="rcnn: the architecture")
    parser.add_argument("--min-size", type=int, default=800, help="rcnn: the input's shorter side")
    parser.add_argument("--max-size", type=int, default=1333, help="rcnn: the input's longer side at most")
    parser.add_argument("--levels", type=int, default=4, help="rcnn: quantization levels")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = {"family": args.family, "device": args.device, "threads": torch.get_num_threads(),
               **(yolo(args) if args.family == "yolo" else rcnn(args))}
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
