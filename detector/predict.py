"""``casc predict``: spiking detection on image files, folders, globs and videos, like ``yolo predict``.

    casc predict --model yolov8n-bundled bus.jpg photos/ "shots/*.png" clip.mp4
    casc predict --model rcnn-r18-bundled street.jpg --save-txt --save-json --conf 0.4
    casc predict --model yolov8n-bundled bus.jpg --engine onnxruntime --provider cuda

Each run writes into a new numbered folder under ``--out`` (``runs/predict/exp``, ``exp2``, ...): the annotated
images and videos (``--no-save``: none), with ``--save-txt`` YOLO labels in ``labels/`` (``cls xc yc w h conf``,
normalised; a video frame's as ``STEM_FRAME.txt``), with ``--save-json`` one ``Results.to_dict()`` per image
in ``json/``. Every image's detections, time steps and speed are printed. Both families, same options.
"""

from __future__ import annotations

import argparse
import glob
from collections import Counter
from pathlib import Path

from .weights import ENGINES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


def _sleep(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of steps, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="image or video files, folders, globs")
    parser.add_argument("--model", required=True, help="a bundled model name (weights/manifest.json) or a checkpoint")
    parser.add_argument("--conf", type=float, default=0.25, help="minimum score")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="detections per image at most")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="only these class ids (0-based)")
    parser.add_argument("--wake", type=int, default=None, help="wake steps (default: the model's levels L)")
    parser.add_argument("--sleep", type=_sleep, default="auto", help="sleep steps, or 'auto' (until quiet)")
    parser.add_argument("--burst", type=int, default=None, help="spikes per neuron per sleep step (default: wake)")
    parser.add_argument("--max-sleep", type=int, default=256, help="the cap of --sleep auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (with --engine onnxruntime "
                        "the host part runs on the CPU: auto means cpu)")
    parser.add_argument("--engine", default="pytorch", choices=ENGINES,
                        help="what runs the spiking networks: the PyTorch simulator, or ONNX Runtime on the exported "
                             "step graphs (exported on first use into the cache; no spike counts)")
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime's execution provider: cpu, cuda, tensorrt")
    parser.add_argument("--out", default="runs/predict", help="parent folder of the run folders")
    parser.add_argument("--name", default="exp", help="run folder name (numbered when taken: exp2, exp3, ...)")
    parser.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                        help="write the annotated images and videos")
    parser.add_argument("--save-txt", action="store_true", help="write YOLO-format labels (with scores)")
    parser.add_argument("--save-json", action="store_true", help="write one JSON per image")


def find_sources(specs: list[str]) -> list[Path]:
    """Images and videos in the order given: a file as is, a folder's images and videos (sorted), a glob's
    matches (sorted, ``**`` recursive). A spec that names nothing is an error."""
    found: list[Path] = []
    for spec in specs:
        if glob.has_magic(spec):
            paths = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
            paths = [p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
        elif Path(spec).is_dir():
            paths = sorted(p for p in Path(spec).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        elif Path(spec).is_file():
            paths = [Path(spec)]
        else:
            raise FileNotFoundError(f"no such file or folder: {spec}")
        if not paths:
            raise FileNotFoundError(f"no images or videos in {spec}")
        found.extend(paths)
    return found


def run_folder(out: str | Path, name: str) -> Path:
    """A new folder ``out/name``, or ``out/name2``, ``out/name3``, ... when taken."""
    base = Path(out)
    for n in range(1, 10_000):
        folder = base / (name if n == 1 else f"{name}{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise ValueError(f"{base}: no free run folder name {name}N")


class Outputs:
    """What one run writes into its folder: annotated images / videos, YOLO labels, JSON."""

    def __init__(self, folder: Path, save: bool, save_txt: bool, save_json: bool):
        self.folder, self.save, self.save_txt, self.save_json = folder, save, save_txt, save_json
        self.stems: set[str] = set()
        self.videos: dict[str, object] = {}  # stem -> cv2.VideoWriter
        self.labels = 0

    def stem(self, path: Path) -> str:
        """``path``'s stem, numbered when another source of this run had it (photos/a.jpg, shots/a.png)."""
        stem, n = path.stem, 2
        while stem in self.stems:
            stem, n = f"{path.stem}_{n}", n + 1
        self.stems.add(stem)
        return stem

    def image(self, result, stem: str, suffix: str) -> None:
        if self.save:
            result.save(self.folder / f"{stem}{suffix}")
        self._records(result, stem)

    def frame(self, result, stem: str, index: int, fps: float) -> None:
        import cv2

        if self.save:
            if stem not in self.videos:
                h, w = result.orig_shape
                self.videos[stem] = cv2.VideoWriter(str(self.folder / f"{stem}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                                                    fps, (w, h))
            self.videos[stem].write(result.plot())
        self._records(result, f"{stem}_{index}")

    def _records(self, result, stem: str) -> None:
        if self.save_txt:
            result.save_txt(self.folder / "labels" / f"{stem}.txt", save_conf=True)
            self.labels += 1
        if self.save_json:
            (self.folder / "json").mkdir(exist_ok=True)
            (self.folder / "json" / f"{stem}.json").write_text(result.to_json(indent=1))

    def close(self) -> None:
        for writer in self.videos.values():
            writer.release()


def summary(result) -> str:
    """``256x256 2 squares... ; T=6 settled; 1.2ms preprocess, ...``: one image's line."""
    counts = Counter(result.labels)
    found = ", ".join(f"{n} {name}" for name, n in counts.most_common()) or "no detections"
    steps = f"T={result.steps}"
    if result.stage_steps:
        steps += f" ({result.stage_steps['stage1']}+{result.stage_steps['stage2']})"
    steps += " settled" if result.settled else " not settled"
    speed = ", ".join(f"{ms:.1f}ms {phase}" for phase, ms in result.speed.items())
    h, w = result.orig_shape
    return f"{w}x{h} {found}; {steps}; {speed}"


def saved_suffix(path: Path) -> str:
    """The annotated image keeps its source's format, except where OpenCV writes none (GIF, unknown): PNG."""
    suffix = path.suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES - {".gif"} else ".png"


def video_frames(path: Path):
    """(frame index from 1, frame count, fps, BGR frame) of every frame OpenCV decodes."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"cannot open the video {path}")
    try:
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            index += 1
            yield index, total, fps, frame
    finally:
        capture.release()


def main(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .weights import load_detector

    sources = find_sources(args.sources)
    device = "cpu" if args.engine == "onnxruntime" and args.device == "auto" else str(resolve_device(args.device))
    detector = load_detector(args.model, device=device, engine=args.engine, provider=args.provider)
    outputs = Outputs(run_folder(args.out, args.name), args.save, args.save_txt, args.save_json)
    options = dict(conf=args.conf, iou=args.iou, max_det=args.max_det, classes=args.classes, wake=args.wake,
                   sleep=args.sleep, burst=args.burst, max_sleep=args.max_sleep)
    speeds = []
    try:
        for i, path in enumerate(sources, 1):
            stem = outputs.stem(path)
            if path.suffix.lower() in VIDEO_SUFFIXES:
                for index, total, fps, frame in video_frames(path):
                    result = detector.predict([frame], color="bgr", **options)[0]
                    outputs.frame(result, stem, index, fps)
                    speeds.append(result.speed)
                    print(f"video {i}/{len(sources)} (frame {index}/{total}) {path}: {summary(result)}", flush=True)
            else:
                result = detector.predict([str(path)], **options)[0]
                outputs.image(result, stem, saved_suffix(path))
                speeds.append(result.speed)
                print(f"image {i}/{len(sources)} {path}: {summary(result)}", flush=True)
    finally:
        outputs.close()
    mean = {phase: sum(s[phase] for s in speeds) / len(speeds) for phase in speeds[0]} if speeds else {}
    print("Speed: " + ", ".join(f"{ms:.1f}ms {phase}" for phase, ms in mean.items()) + " per image")
    print(f"Results saved to {outputs.folder}" + (f" ({outputs.labels} label files in labels/)" if args.save_txt else ""))
    return 0
