"""``casc predict``: spiking detection on image files, folders, globs, videos, webcams and streams, like
``yolo predict``.

    casc predict --model yolov8n-bundled bus.jpg photos/ "shots/*.png" clip.mp4
    casc predict --model rcnn-r18-bundled street.jpg --save-txt --save-json --conf 0.4 --classes 1 5
    casc predict --model yolov8n-bundled 0                      # webcam 0 (or rtsp://, http://... streams)
    casc predict model=yolov8n-bundled source=bus.jpg imgsz=320 # Ultralytics' key=value form
    casc predict --model yolov8n-bundled bus.jpg --engine onnxruntime --provider cuda
    casc predict --model runs/export/yolo/snn.wake.onnx bus.jpg  # a casc export folder (or one of its graphs)

Each run writes into a new numbered folder under ``--project`` (``runs/predict/exp``, ``exp2``, ...; with
``--exist-ok`` into ``exp`` itself): the annotated images and videos (``--no-save``: none, and no folder unless
labels or JSON are asked for), with ``--save-txt`` YOLO labels in ``labels/`` (``cls xc yc w h conf``,
normalised; a video frame's as ``STEM_FRAME.txt``), with ``--save-json`` one ``Results.to_dict()`` per image
in ``json/``. Every image's detections, time steps and speed are printed. A source that cannot be read is
reported with its name and skipped; the others still run (exit status 1). Both families, same options.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from collections import Counter
from pathlib import Path

from .options import Schedule, Selection, add_arguments as add_options, values_of
from .video import KEYFRAME_EVERY, VIDEO_SUFFIXES, UnreadableVideo, video_frames
from .weights import ENGINES

__all__ = [  # the public API (apps import only these)
    "add_arguments", "main", "run_folder", "predict_frames", "find_sources",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="image or video files, folders, globs, a webcam index (0) or a stream URL (rtsp://...)")
    parser.add_argument("--model", required=True,
                        help="a bundled model name (weights/manifest.json), a checkpoint, or a casc export folder (or "
                             "one of its .onnx files: runs on ONNX Runtime)")
    add_options(parser, Schedule, Selection)
    parser.add_argument("--imgsz", type=int, default=None,
                        help="input size (YOLO: the letterbox side; Faster R-CNN: the resize's sides); "
                             "default: the model's own")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (with --engine onnxruntime "
                        "the host part runs on the CPU: auto means cpu)")
    parser.add_argument("--engine", default="pytorch", choices=ENGINES,
                        help="what runs the spiking networks: the PyTorch simulator, or ONNX Runtime on the exported "
                             "step graphs (exported on first use into the cache; no spike counts)")
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime's execution provider: cpu, cuda, tensorrt")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (None: half the cores, at least 1; more threads than free cores "
                             "make every step wait for a descheduled thread)")
    parser.add_argument("--vid-stride", type=int, default=1, help="use every Nth frame of a video or stream")
    parser.add_argument("--delta", action=argparse.BooleanOptionalAction, default=True,
                        help="videos by delta frames: after the first frame each frame feeds only its change "
                             "(exact; --no-delta: every frame a fresh run)")
    parser.add_argument("--keyframe-every", type=int, default=KEYFRAME_EVERY,
                        help="with delta frames, a whole schedule every N frames (0: only the first)")
    parser.add_argument("--project", "--out", dest="project", default="runs/predict",
                        help="parent folder of the run folders")
    parser.add_argument("--name", default="exp", help="run folder name (numbered when taken: exp2, exp3, ...)")
    parser.add_argument("--exist-ok", action="store_true", help="write into PROJECT/NAME even if it exists")
    parser.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                        help="write the annotated images and videos")
    parser.add_argument("--save-txt", action="store_true", help="write YOLO-format labels (with scores)")
    parser.add_argument("--save-json", action="store_true", help="write one JSON per image")


STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://", "tcp://", "udp://")


def split_classes(tokens: list[str] | None) -> tuple[list[int] | None, list[str]]:
    """``--classes`` tokens -> (class ids, the tokens after them that are sources). ``--classes 1 5 img.jpg``
    takes 1 and 5 and leaves ``img.jpg`` a source; ``1,5`` is the same as ``1 5``."""
    if tokens is None:
        return None, []
    ids = []
    for k, token in enumerate(tokens):
        parts = [p for p in token.split(",") if p.strip()]
        if not parts or not all(p.strip().isdigit() for p in parts):
            if not ids:
                raise ValueError(f"--classes: expected class ids (0-based integers), got {token!r}")
            return ids, tokens[k:]
        ids += [int(p) for p in parts]
    return ids, []


def is_stream(spec: str) -> bool:
    """A webcam index (``0``) that is no file here, or a stream URL."""
    return (spec.isdigit() and not Path(spec).exists()) or spec.lower().startswith(STREAM_SCHEMES)


def find_sources(specs: list[str]) -> list[Path | str]:
    """Sources in the order given: a file as is, a folder's images and videos (sorted), a glob's matches (sorted,
    ``**`` recursive), a webcam index or stream URL as its string. A spec that names nothing is an error."""
    if not specs:
        raise ValueError("no SOURCE given: name image or video files, folders, globs, a webcam index or a stream URL")
    found: list[Path | str] = []
    for spec in specs:
        if is_stream(spec):
            paths = [spec]
        elif glob.has_magic(spec):
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


def run_folder(out: str | Path, name: str, exist_ok: bool = False) -> Path:
    """A new folder ``out/name``, or ``out/name2``, ``out/name3``, ... when taken; ``exist_ok``: ``out/name``."""
    base = Path(out)
    if exist_ok:
        (base / name).mkdir(parents=True, exist_ok=True)
        return base / name
    for n in range(1, 10_000):
        folder = base / (name if n == 1 else f"{name}{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise ValueError(f"{base}: no free run folder name {name}N")


class Outputs:
    """What one run writes into its folder: annotated images / videos, YOLO labels, JSON. The folder is made when
    the first file is written, so a run that writes nothing leaves none behind."""

    def __init__(self, project: str | Path, name: str, exist_ok: bool, save: bool, save_txt: bool, save_json: bool):
        self.project, self.name, self.exist_ok = project, name, exist_ok
        self.save, self.save_txt, self.save_json = save, save_txt, save_json
        self._folder: Path | None = None
        self.stems: set[str] = set()
        self.videos: dict[str, object] = {}  # stem -> cv2.VideoWriter
        self.labels = 0

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = run_folder(self.project, self.name, self.exist_ok)
        return self._folder

    @property
    def written(self) -> bool:
        return self._folder is not None

    def stem(self, source: Path | str) -> str:
        """``source``'s stem (a stream's: ``stream``), numbered when another source of this run had it."""
        base = source.stem if isinstance(source, Path) else "stream"
        stem, n = base, 2
        while stem in self.stems:
            stem, n = f"{base}_{n}", n + 1
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


def frame_kind(result) -> str:
    """How a video frame ran: a keyframe (the whole schedule) or a delta frame, with its energy."""
    kind = "keyframe" if result.keyframe else "delta"
    return kind if result.energy_uj is None else f"{kind}, {result.energy_uj:.1f} uJ"


def predict_frames(detector, source: Path | str, stride: int, options: dict, delta: bool = True,
                   keyframe_every: int | None = None):
    """(frame index, frame count, fps, Results) for every used frame of a video, webcam or stream: the one place
    that runs a detector over a video's frames, through ``SpikingDetector.video`` (delta frames unless ``delta`` is
    False or the network is rate-coded; the sleep option does not apply to delta frames, which sleep until quiet)."""
    options = {k: v for k, v in options.items() if k != "sleep"}
    predictor = detector.video(delta=delta and not detector.neuron_kind.rate_coded, keyframe_every=keyframe_every,
                               color="bgr", **options)
    for index, total, fps, frame in video_frames(source, stride):
        yield index, total, fps, predictor(frame)


def load_options(args: argparse.Namespace) -> dict:
    """``load_detector``'s keyword arguments for ``--imgsz`` (the family decides what a size means)."""
    from .families import get_family
    from .weights import resolve

    if args.imgsz is None:
        return {}
    if args.imgsz < 32:
        raise ValueError(f"--imgsz {args.imgsz}: give an input side of at least 32 pixels")
    sized = args.engine == "onnxruntime" or get_family(resolve(args.model).family).sized
    return {"imgsz": args.imgsz} if sized else {"min_size": args.imgsz, "max_size": args.imgsz}


def exported_model(model: str) -> tuple[str, dict]:
    """``--model`` as (what ``load_detector`` takes, its engine options): a ``casc export`` folder, or one of its
    ``.onnx`` files, runs those graphs on ONNX Runtime with the model they were exported from."""
    path = Path(model)
    if path.suffix.lower() != ".onnx" and not path.is_dir():
        return model, {}
    from .export.bundle import read_manifest  # needs the onnx extra

    folder = path.parent if path.suffix.lower() == ".onnx" else path
    manifest = read_manifest(folder)  # none: "no exported graphs here (run `casc export` first)"
    return manifest["model"], {"engine": "onnxruntime", "export_dir": folder}


def main(args: argparse.Namespace) -> int:
    import torch

    from .devices import default_threads, resolve_device
    from .images import ImageError
    from .weights import load_detector

    args.classes, extra = split_classes(args.classes)
    if args.vid_stride < 1:
        raise ValueError(f"--vid-stride {args.vid_stride}: give 1 (every frame) or more")
    model, exported = exported_model(args.model)
    args.engine = exported.pop("engine", args.engine)
    sources = find_sources(args.sources + extra)
    torch.set_num_threads(args.threads or default_threads())
    device = "cpu" if args.engine == "onnxruntime" and args.device == "auto" else str(resolve_device(args.device))
    detector = load_detector(model, device=device, engine=args.engine, provider=args.provider,
                             **load_options(args), **exported)
    outputs = Outputs(args.project, args.name, args.exist_ok, args.save, args.save_txt, args.save_json)
    options = values_of(args, Schedule, Selection)
    speeds, failed = [], []
    try:
        for i, source in enumerate(sources, 1):
            stem = outputs.stem(source)
            try:
                if isinstance(source, str) or source.suffix.lower() in VIDEO_SUFFIXES:
                    started = time.perf_counter()
                    for n, (index, total, fps, result) in enumerate(
                            predict_frames(detector, source, args.vid_stride, options, args.delta,
                                           args.keyframe_every or None), 1):
                        outputs.frame(result, stem, index, fps)
                        speeds.append(result.speed)
                        frames = f"{index}/{total}" if total else str(index)
                        rate = n / (time.perf_counter() - started)
                        print(f"video {i}/{len(sources)} (frame {frames}, {frame_kind(result)}, {rate:.1f} fps) "
                              f"{source}: {summary(result)}", flush=True)
                else:
                    result = detector.predict([str(source)], **options)[0]
                    outputs.image(result, stem, saved_suffix(source))
                    speeds.append(result.speed)
                    print(f"image {i}/{len(sources)} {source}: {summary(result)}", flush=True)
            except (ImageError, UnreadableVideo, FileNotFoundError) as error:  # named and skipped; the rest run
                if len(sources) == 1:
                    raise ValueError(f"{source}: {error}") from None
                failed.append(source)
                print(f"casc predict: skipped {source}: {error}", file=sys.stderr, flush=True)
    finally:
        outputs.close()
    mean = {phase: sum(s[phase] for s in speeds) / len(speeds) for phase in speeds[0]} if speeds else {}
    if mean:
        print("Speed: " + ", ".join(f"{ms:.1f}ms {phase}" for phase, ms in mean.items()) + " per image")
    if outputs.written:
        print(f"Results saved to {outputs.folder}" +
              (f" ({outputs.labels} label files in labels/)" if args.save_txt else ""))
    if failed:
        print(f"casc predict: {len(failed)} of {len(sources)} sources could not be read: "
              + ", ".join(map(str, failed)), file=sys.stderr)
        return 1
    return 0
