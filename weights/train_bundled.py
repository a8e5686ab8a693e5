"""Train the bundled detectors on the bundled benchmark and write them, with the manifest, into weights/.

The recipe, run where a GPU is available (a CPU works too, but takes hours):

    python weights/train_bundled.py --family yolo --device 0     # float ReLU YOLOv8n, then its QANN (L=4)
    python weights/train_bundled.py --family rcnn --device cuda  # float ResNet-18-FPN Faster R-CNN, then its QANN
    python weights/train_bundled.py --export                      # fp16 safe checkpoints + manifest.json

The CPU path (no GPU): post-training calibration and the QAT recipe, then one manifest entry per result:

    casc quantize --model rcnn-r18-bundled-float --levels 8 --data bundled --out runs/qat/rcnn-r18-l8.pt
    OMP_NUM_THREADS=1 casc train yolo --qat --model yolov8n-bundled-float --data bundled --levels 4 \
        --iterations 3000 --max-minutes 70 --out runs/qat/yolov8n-l4
    python weights/train_bundled.py --bundle yolov8n-bundled runs/qat/yolov8n-l4/last.pt "casc train yolo --qat ..."

Each step is a ``casc train`` command; the manifest records them. Metrics measured by ``casc eval``
are added to the manifest by ``weights/record_metrics.py``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from casc.cli import main as casc
from detector.data import ensure_bundled
from detector import checkpoint
from detector.weights import sha256_of

WEIGHTS = Path(__file__).resolve().parent
LEVELS = 4
IMGSZ = 256


def commands(runs: Path, data_root: Path, device: str, workers: int, scale: dict) -> dict[str, list[list[str]]]:
    yolo_common = ["--data", str(data_root / "data.yaml"), "--imgsz", str(IMGSZ), "--batch", str(scale["yolo_batch"]),
                   "--device", device, "--workers", str(workers), "--no-plots"]
    rcnn_common = ["--arch", "resnet18_fpn", "--data", f"coco:{data_root}", "--min-size", str(IMGSZ), "--max-size", str(IMGSZ),
                   "--representation-size", "256", "--fpn-channels", "128", "--batch", str(scale["rcnn_batch"]), "--device", device,
                   "--workers", str(workers)]
    return {
        "yolo": [
            ["train", "yolo", "--model", "yolov8n.yaml", "--act", "relu", "--float", *yolo_common,
             "--epochs", str(scale["yolo_epochs"]), *(["--time", str(scale["yolo_hours"])] if scale["yolo_hours"] else []),
             "--out", str(runs / "yolov8n-float")],
            ["train", "yolo", "--model", str(runs / "yolov8n-float" / "weights" / "best.pt"), "--levels", str(LEVELS),
             *yolo_common, "--epochs", str(scale["yolo_qann_epochs"]), "--out", str(runs / "yolov8n-qann")],
        ],
        "rcnn": [
            ["train", "rcnn", *rcnn_common, "--float", "--train-bn", "--trainable-layers", "5",
             "--epochs", str(scale["rcnn_epochs"]), *_minutes(scale["rcnn_minutes"]), "--out", str(runs / "rcnn-float")],
            ["train", "rcnn", *rcnn_common, "--model", str(runs / "rcnn-float" / "last.pt"), "--levels", str(LEVELS),
             "--trainable-layers", "5", "--lr", str(scale["rcnn_qann_lr"]), "--epochs", str(scale["rcnn_qann_epochs"]),
             *_minutes(scale["rcnn_qann_minutes"]), "--out", str(runs / "rcnn-qann")],
        ],
    }


def _minutes(limit: float | None) -> list[str]:
    return ["--max-minutes", str(limit)] if limit else []


# name, family, kind, source checkpoint under runs/, float counterpart
BUNDLE = [
    ("yolov8n-bundled-float", "yolo", "float", "yolov8n-float/weights/best.casc.pt", None),
    ("yolov8n-bundled", "yolo", "qann", "yolov8n-qann/weights/best.casc.pt", "yolov8n-bundled-float"),
    ("rcnn-r18-bundled-float", "rcnn", "float", "rcnn-float/last.pt", None),
    ("rcnn-r18-bundled", "rcnn", "qann", "rcnn-qann/last.pt", "rcnn-r18-bundled-float"),
]
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "epoch")
COMMANDS = "commands.json"  # under --runs: the casc commands each family was trained with


def compact(source: Path, target: Path) -> str:
    """Our safe format without training state, floating tensors in fp16 (loading casts them back)."""
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    ckpt = {k: v for k, v in ckpt.items() if k not in TRAINING_KEYS}
    ckpt["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    checkpoint.save(ckpt, target)
    return sha256_of(target)


def export(runs: Path, data_root: Path, folder: Path) -> Path:
    """Compact checkpoints and the manifest, with the commands that really trained them."""
    ran = json.loads((runs / COMMANDS).read_text())
    entries = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, family, kind, source, float_model in BUNDLE:
        target = folder / f"{name}.pt"
        digest = compact(runs / source, target)
        step = ran[family][0 if kind == "float" else 1]
        entries.append({
            "name": name, "family": family, "kind": kind, "file": target.name, "sha256": digest,
            "arch": "yolov8n" if family == "yolo" else "fasterrcnn_resnet18_fpn", "act": "relu",
            "levels": LEVELS if kind == "qann" else None, "float_model": float_model, "dataset": "bundled-v1",
            "imgsz": IMGSZ, "training_command": "casc " + shlex.join(step).replace(str(runs), "runs/bundled")
                                                                 .replace(str(data_root), "$BUNDLED"),
            "training_budget": budget_of(step, float_model or "random init"), "metrics": {},
        })
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"models": entries}, indent=1) + "\n")
    return manifest


def bundle(name: str, source: Path, command: str, budget: dict, folder: Path = WEIGHTS,
           float_model: str | None = None) -> dict:
    """Compact ``source`` into ``folder/NAME.pt`` and write its manifest entry (replacing one of that name).

    The entry's family, kind (a QANN, or a float model: no quantizers), levels, rounding and size come from the
    checkpoint itself; its metrics are reset (``weights/record_metrics.py`` fills them from a ``casc eval`` run).
    ``budget``: what its training had (``check_budget``), so that "percent of float" can be read against what the
    float model had."""
    from detector.quant import qann_levels, quantizers
    from detector.weights import checkpoint_family, load_detector, load_manifest

    check_budget(budget)

    target = folder / f"{name}.pt"
    digest = compact(source, target)
    saved = torch.load(target, map_location="cpu", weights_only=True)
    family = checkpoint_family(target)
    network = found = None
    if any(k.endswith("threshold_param") for k in saved["state_dict"]):  # ClipQuan thresholds: a QANN
        network = load_detector(str(target)).qann
        found = quantizers(network)
    old = load_manifest(folder / "manifest.json").get(name)
    entry = {
        "name": name, "family": family, "kind": "qann" if found else "float", "file": target.name, "sha256": digest,
        "arch": old.info.get("arch") if old else ("yolov8n" if family == "yolo" else "fasterrcnn_resnet18_fpn"),
        "act": "relu", "levels": qann_levels(network) if found else None,
        **({"site_levels": sorted({q.levels for _, q in found}), "rounding": sorted({q.rounding for _, q in found})}
           if found else {}),
        "float_model": (float_model or (old.float_model if old else None)) if found else None, "dataset": "bundled-v1",
        "imgsz": int(saved.get("imgsz", IMGSZ)), "training_command": command, "training_budget": budget, "metrics": {},
    }
    if family == "rcnn" and found:
        from detector.models.rcnn import has_spiking_fpn

        entry["spiking_fpn"] = has_spiking_fpn(network)
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())
    models = [m for m in data["models"] if m["name"] != name]
    position = next((i for i, m in enumerate(data["models"]) if m["name"] == name), len(models))
    models.insert(position, entry)
    manifest.write_text(json.dumps({"models": models}, indent=1) + "\n")
    return entry


BUDGET_KEYS = ("device", "from", "batch")


def check_budget(budget: dict) -> None:
    """A training budget names the device, the starting point, the batch and its length (``epochs`` or
    ``iterations``); ``minutes`` (measured) or ``max_minutes`` (the command's cap) where known."""
    missing = [k for k in BUDGET_KEYS if k not in budget]
    if missing or not {"epochs", "iterations"} & budget.keys():
        raise ValueError(f"a training budget needs {', '.join(BUDGET_KEYS)} and epochs or iterations; "
                         f"got {sorted(budget)}")


def budget_of(step: list[str], start: str) -> dict:
    """The budget a ``casc train`` command line asked for (its epochs, batch, device and time cap)."""
    def value(flag: str):
        return step[step.index(flag) + 1] if flag in step else None

    budget = {"device": value("--device") or "default", "from": start, "epochs": int(value("--epochs")),
              "batch": int(value("--batch"))}
    if value("--max-minutes"):
        budget["max_minutes"] = float(value("--max-minutes"))
    elif value("--time"):
        budget["max_minutes"] = float(value("--time")) * 60
    return budget


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["yolo", "rcnn"], help="train this family's float model, then its QANN")
    parser.add_argument("--export", action="store_true", help="write weights/*.pt and weights/manifest.json")
    parser.add_argument("--bundle", nargs=3, metavar=("NAME", "CHECKPOINT", "COMMAND"),
                        help="compact one QANN checkpoint into weights/NAME.pt with its manifest entry")
    parser.add_argument("--float-model", default=None, help="with --bundle: the float model it came from")
    parser.add_argument("--budget", type=json.loads, default=None,
                        help='with --bundle: its training budget as JSON, e.g. \'{"device": "CPU, 1 thread", "from": '
                             '"yolov8n-bundled-float", "iterations": 3000, "batch": 16, "max_minutes": 70}\'')
    parser.add_argument("--runs", default="runs/bundled", help="training outputs")
    parser.add_argument("--weights-dir", default=str(WEIGHTS), help="where --export writes (default: weights/)")
    parser.add_argument("--device", default="0")
    parser.add_argument("--images", type=int, nargs=2, default=[4000, 500], metavar=("TRAIN", "VAL"),
                        help="bundled benchmark size (the published weights use the default)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--yolo-epochs", type=int, default=60)
    parser.add_argument("--yolo-hours", type=float, default=None, help="cap the float YOLO training by time")
    parser.add_argument("--yolo-qann-epochs", type=int, default=10)
    parser.add_argument("--yolo-batch", type=int, default=64)
    parser.add_argument("--rcnn-epochs", type=int, default=16)
    parser.add_argument("--rcnn-qann-epochs", type=int, default=4)
    parser.add_argument("--rcnn-qann-lr", type=float, default=0.005)
    parser.add_argument("--rcnn-batch", type=int, default=16)
    parser.add_argument("--rcnn-minutes", type=float, default=None, help="cap the float R-CNN training by time")
    parser.add_argument("--rcnn-qann-minutes", type=float, default=None, help="cap the R-CNN QANN fine-tuning")
    args = parser.parse_args()
    if args.bundle:
        name, source, command = args.bundle
        if args.budget is None:
            parser.error("--bundle needs --budget (what its training had)")
        print(json.dumps(bundle(name, Path(source), command, args.budget, Path(args.weights_dir), args.float_model),
                         indent=1))
        return 0
    runs = Path(args.runs).resolve()
    scale = {k: getattr(args, k) for k in ("yolo_epochs", "yolo_hours", "yolo_qann_epochs", "yolo_batch",
                                            "rcnn_epochs", "rcnn_qann_epochs", "rcnn_qann_lr", "rcnn_batch", "rcnn_minutes",
                                            "rcnn_qann_minutes")}
    data_root = ensure_bundled(train=args.images[0], val=args.images[1])
    recipe = commands(runs, data_root, args.device, args.workers, scale)
    if args.family:
        for step in recipe[args.family]:
            print("casc " + shlex.join(step), flush=True)
            if casc(step) != 0:
                return 1
        record = runs / COMMANDS
        ran = json.loads(record.read_text()) if record.is_file() else {}
        ran[args.family] = recipe[args.family]
        record.write_text(json.dumps(ran, indent=1))
    if args.export:
        print(f"wrote {export(runs, data_root, Path(args.weights_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
