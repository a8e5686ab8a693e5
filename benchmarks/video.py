"""Video by delta frames against fresh runs: cost per frame, float32 drift, Faster R-CNN's stage 2, ONNX Runtime.

On the bundled video split's sequences (``detector.data.video``: ``static`` objects moving over a fixed scene,
``jitter`` a shaky, noisy camera where every pixel changes), float32:

1. per kind and thread count, each frame run fresh (a whole schedule) and by delta (the session's change step and
   sleep until quiet), alternating frame by frame so both see the same machine load: steps per changed frame
   (median), spikes and energy per frame (delta / fresh), wall time per frame (median, delta / fresh) and fps,
   and the frames whose readouts equal the QANN's within 1e-3;
2. drift: a long static sequence by delta with no keyframe and with keyframes every K frames: frames within 1e-3 of
   the QANN and frames whose detections equal the QANN's, against fresh runs (which flip too in float32);
3. Faster R-CNN: stage 1 by delta, stage 2 fresh or by delta on each frame's RoIs (steps, spikes, time);
4. the ONNX Runtime engine: fresh against delta fps (``--onnx``).

    python benchmarks/video.py                          # all of it (about 15 min on 2 CPU cores)
    python benchmarks/video.py --skip-rcnn --frames 30  # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from detector.data.video import render_sequence
from detector.weights import load_detector


def sequence_frames(seed: int, kind: str, n: int) -> list[np.ndarray]:
    return [img[..., ::-1].copy() for img, *_ in render_sequence(seed, kind, n)]  # BGR, as a decoder gives them


def max_error(readout, reference) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(readout, reference))


def off_fraction(readout, reference, tol: float = 1e-3) -> float:
    """The fraction of readout elements more than ``tol`` from the QANN's (where float32 flips show)."""
    off = sum(int(((a - b).abs() > tol).sum()) for a, b in zip(readout, reference))
    return off / sum(a.numel() for a in readout)


def same_detections(a, b) -> bool:
    return (len(a.boxes) == len(b.boxes) and torch.equal(a.boxes.cls, b.boxes.cls)
            and bool(torch.allclose(a.boxes.xyxy, b.boxes.xyxy, atol=0.01))
            and bool(torch.allclose(a.boxes.conf, b.boxes.conf, atol=1e-3)))


@torch.no_grad()
def fresh_vs_delta(det, frames: list[np.ndarray]) -> dict:
    """Per frame, a fresh run and the session's delta frame, alternating; figures over the changed frames."""
    xs = [det.preprocess([f])[0] for f in frames]
    session = det.snn.session()
    rows = {"fresh": [], "delta": []}
    for x in xs:
        reference = det.qann_raw(x)
        for mode in ("fresh", "delta"):
            start = time.perf_counter()
            run = det.snn.run(x) if mode == "fresh" else session.run(x)
            seconds = time.perf_counter() - start
            rows[mode].append({"steps": int(run.steps[0]), "spikes": float(run.stats.spikes[0]),
                               "energy": float(run.stats.energy_pj[0]), "seconds": seconds,
                               "exact": max_error(run.readout, reference) <= 1e-3, "keyframe": run.keyframe,
                               "off": off_fraction(run.readout, reference)})
    changed = [i for i, r in enumerate(rows["delta"]) if not r["keyframe"]]
    pick = {mode: [rows[mode][i] for i in changed] for mode in rows}
    mean = lambda mode, key: statistics.fmean(r[key] for r in pick[mode])  # noqa: E731
    median = lambda mode, key: statistics.median(r[key] for r in pick[mode])  # noqa: E731
    return {"frames": len(xs), "changed": len(changed),
            "steps": (median("fresh", "steps"), median("delta", "steps")),
            "spikes_ratio": mean("delta", "spikes") / mean("fresh", "spikes"),
            "energy_ratio": mean("delta", "energy") / mean("fresh", "energy"),
            "energy_uj": (mean("fresh", "energy") * 1e-6, mean("delta", "energy") * 1e-6),
            "time_ratio": median("delta", "seconds") / median("fresh", "seconds"),
            "fps": (1 / median("fresh", "seconds"), 1 / median("delta", "seconds")),
            "exact": (sum(r["exact"] for r in rows["fresh"]), sum(r["exact"] for r in rows["delta"])),
            "off": (statistics.fmean(r["off"] for r in rows["fresh"]), statistics.fmean(r["off"] for r in rows["delta"]))}


@torch.no_grad()
def drift(det, frames: list[np.ndarray], intervals: list[int | None]) -> list[dict]:
    """Frames within 1e-3 of the QANN and with the QANN's detections: fresh runs, and delta at each interval."""
    reference = det.qann_predict(frames, batch=1)
    xs = [det.preprocess([f])[0] for f in frames]
    raws = [det.qann_raw(x) for x in xs]
    rows = []
    for interval in ["fresh", *intervals]:
        session = None if interval == "fresh" else det.snn.session(keyframe_every=interval)
        exact, off = [], []
        for x, raw in zip(xs, raws):
            run = det.snn.run(x) if session is None else session.run(x)
            exact.append(max_error(run.readout, raw) <= 1e-3)
            off.append(off_fraction(run.readout, raw))
        kwargs = {"delta": False} if interval == "fresh" else {"keyframe_every": interval}
        found = list(det.predict_video(frames, **kwargs))
        agree = [same_detections(a, b) for a, b in zip(found, reference)]
        first_miss = next((i + 1 for i, ok in enumerate(exact) if not ok), None)
        rows.append({"interval": interval, "exact": sum(exact), "agree": sum(agree), "frames": len(frames),
                     "first_inexact_frame": first_miss, "off_mean": statistics.fmean(off), "off_last": off[-1]})
    return rows


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n-bundled")
    parser.add_argument("--frames", type=int, default=60, help="frames per sequence for the cost table")
    parser.add_argument("--drift-frames", type=int, default=300)
    parser.add_argument("--intervals", default="none,16,64", help="keyframe intervals of the drift table")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--skip-rcnn", action="store_true")
    parser.add_argument("--onnx", action="store_true", help="also the ONNX Runtime engine (exports on first use)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    det = load_detector(args.model)
    rows = []
    for kind in ("static", "jitter"):
        frames = sequence_frames(0, kind, args.frames)
        for t in threads:
            torch.set_num_threads(t)
            r = fresh_vs_delta(det, frames)
            rows.append([kind, t, r["changed"], f"{r['steps'][0]:g} / {r['steps'][1]:g}", f"{r['spikes_ratio']:.3f}",
                         f"{r['energy_uj'][0]:.0f} / {r['energy_uj'][1]:.0f} ({r['energy_ratio']:.3f})",
                         f"{r['time_ratio']:.3f}", f"{r['fps'][0]:.1f} / {r['fps'][1]:.1f}",
                         f"{r['exact'][0]} / {r['exact'][1]} of {r['frames']}",
                         f"{100 * r['off'][0]:.4f} / {100 * r['off'][1]:.4f}"])
    print_table(f"{args.model}, float32: fresh runs vs delta frames ({args.frames} frames per sequence; per changed "
                "frame)", ["video", "threads", "changed frames", "steps fresh / delta (median)",
                           "spikes delta / fresh", "energy uJ fresh / delta (ratio)", "wall time delta / fresh (median)",
                           "fps fresh / delta", "frames = QANN (1e-3) fresh / delta",
                           "% readout elements off by > 1e-3 fresh / delta"], rows)

    torch.set_num_threads(threads[0])
    intervals = [None if v == "none" else int(v) for v in args.intervals.split(",")]
    rows = [[r["interval"] if r["interval"] is not None else "never", f"{r['exact']} of {r['frames']}",
             f"{r['agree']} of {r['frames']}", r["first_inexact_frame"] or "—", f"{100 * r['off_mean']:.4f}",
             f"{100 * r['off_last']:.4f}"]
            for r in drift(det, sequence_frames(1, "static", args.drift_frames), intervals)]
    print_table(f"float32 drift over {args.drift_frames} frames (static scene, moving objects; {threads[0]} thread)",
                ["keyframe every", "frames = QANN (1e-3)", "detections = QANN's", "first frame off",
                 "% readout elements off (mean)", "% off (last frame)"], rows)

    if not args.skip_rcnn:
        rcnn_rows(threads[0])
    if args.onnx:
        onnx_rows(args.model, sequence_frames(0, "static", args.frames), threads[0])


@torch.no_grad()
def rcnn_rows(threads: int, n: int = 8) -> None:
    """Stage 1 by delta, stage 2 fresh or by delta (the adapter's video session, which ``predict_video`` builds with
    stage 2 fresh): per-stage steps and spikes, and time per frame, against fresh runs."""
    torch.set_num_threads(threads)
    det = load_detector("rcnn-r18-bundled-sfpn")
    frames = sequence_frames(0, "static", n)
    rows = []
    for name, delta, stage2_delta in (("fresh", False, False), ("stage 1 delta, stage 2 fresh", True, False),
                                      ("stage 1 delta, stage 2 delta", True, True)):
        session = det._video_session(det.schedule(), None, stage2_delta) if delta else None
        figures = []
        for frame in frames:
            start = time.perf_counter()
            batch = det._prepare([frame], det.color)
            out = det._infer(batch, det.schedule(), None, session)
            seconds = time.perf_counter() - start
            run1, run2 = out["runs"][0], out["runs"][1] if len(out["runs"]) > 1 else None
            figures.append((int(run1.steps[0]), int(run2.steps.max()) if run2 is not None else 0,
                            float(run1.stats.spikes.sum()), float(run2.stats.spikes.sum()) if run2 is not None else 0.0,
                            seconds, run2 is not None and not run2.keyframe))
        later = figures[1:]
        mean = lambda i: statistics.fmean(f[i] for f in later)  # noqa: E731
        rows.append([name, f"{mean(0):.1f} / {mean(1):.1f}", f"{mean(2):.3g} / {mean(3):.3g}",
                     f"{statistics.median(f[4] for f in later):.2f}", sum(f[5] for f in later)])
    print_table(f"rcnn-r18-bundled-sfpn, float32, {threads} thread: frames 2-{n} of a static sequence",
                ["run", "steps stage 1 / stage 2 (mean)", "spikes stage 1 / stage 2 (mean)", "s per frame (median)",
                 "stage-2 delta frames"], rows)


def onnx_rows(model: str, frames: list[np.ndarray], threads: int) -> None:
    det = load_detector(model, engine="onnxruntime", threads=threads)
    rows = []
    for name, kwargs in (("fresh", {"delta": False}), ("delta", {})):
        start = time.perf_counter()
        found = list(det.predict_video(frames, **kwargs))
        seconds = time.perf_counter() - start
        rows.append([name, f"{statistics.median(r.steps for r in found[1:]):g}", f"{len(frames) / seconds:.1f}"])
    print_table(f"{model} on the ONNX Runtime engine ({threads} thread), {len(frames)} frames",
                ["run", "steps per frame (median)", "fps (whole predict path)"], rows)


if __name__ == "__main__":
    main()
