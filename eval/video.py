"""Evaluation on video: CASC by delta frames against fresh runs, sequence by sequence.

Each sequence's frames go through ``predict_video`` twice, fresh (every frame a whole schedule) and by delta
(after the first frame or a keyframe, each frame feeds only its change). Both are scored with the same COCO
metrics on every frame; per frame we keep steps, spikes, energy, wall time and whether it was a keyframe, so the
cost of the two can be compared frame by frame and drawn over time (``plot_energy_per_frame``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from detector.data.video import sequences_of

from .metrics import coco_metrics

MODES = ("fresh", "delta")


def _frames_run(detector, frames: list[np.ndarray], delta: bool, keyframe_every: int | None, options: dict):
    """(Results per frame, seconds per frame) of one sequence; frames are RGB arrays."""
    results, seconds = [], []
    start = time.perf_counter()
    for r in detector.predict_video(frames, delta=delta, keyframe_every=keyframe_every, color="rgb", **options):
        now = time.perf_counter()
        results.append(r)
        seconds.append(now - start)
        start = now
    return results, seconds


def delta_against_fresh(detector, dataset, count: int, keyframe_every: int | None, options: dict,
                        progress=None) -> dict:
    """Both modes on the first ``count`` frames of ``dataset``, grouped into sequences by folder. Returns per mode
    its COCO metrics and per-frame figures, and per-mode means over changed frames (every frame that is not a
    keyframe; fresh runs are measured on the same frames)."""
    files = [dataset.image_path(i) for i in range(count)]
    ground_truth, per_mode = [], {mode: {"detections": [], "frames": []} for mode in MODES}
    for sequence in sequences_of(files):
        frames = [dataset.load_image(i) for i in sequence]
        for i in sequence:
            h, w = dataset.image_size(i)
            ground_truth.append({**dataset.target(i), "height": h, "width": w})
        for mode in MODES:
            results, seconds = _frames_run(detector, frames, mode == "delta", keyframe_every, options)
            for i, r, s in zip(sequence, results, seconds):
                per_mode[mode]["detections"].append({"image_id": dataset.target(i)["image_id"], "boxes": r.boxes.xyxy,
                                                     "scores": r.boxes.conf, "labels": r.boxes.cls})
                per_mode[mode]["frames"].append({"sequence": str(Path(files[i]).parent.name), "steps": r.steps,
                                                 "spikes": r.spikes, "energy_uj": r.energy_uj, "seconds": s,
                                                 "keyframe": r.keyframe})
        if progress is not None:
            progress(len(sequence))
    changed = [i for i, f in enumerate(per_mode["delta"]["frames"]) if not f["keyframe"]]
    out = {}
    for mode in MODES:
        frames = per_mode[mode]["frames"]
        metrics = coco_metrics(ground_truth, per_mode[mode]["detections"], dataset.classes)
        out[mode] = {"map50_95": metrics["map50_95"], "map50": metrics["map50"], "frames": frames,
                     "changed": _means([frames[i] for i in changed])}
    out["keyframe_every"] = keyframe_every
    out["changed_frames"] = len(changed)
    return out


def _means(frames: list[dict]) -> dict:
    """Median steps, mean spikes / energy, and fps (from the mean wall time) over ``frames``."""
    if not frames:
        return {}
    values = {k: [f[k] for f in frames if f[k] is not None] for k in ("steps", "spikes", "energy_uj", "seconds")}
    mean_s = float(np.mean(values["seconds"]))
    return {"steps_median": float(np.median(values["steps"])),
            "spikes_mean": float(np.mean(values["spikes"])) if values["spikes"] else None,
            "energy_uj_mean": float(np.mean(values["energy_uj"])) if values["energy_uj"] else None,
            "ms_mean": mean_s * 1000, "fps": 1.0 / mean_s}


def format_table(video: dict) -> str:
    """A Markdown table: mAP and per-changed-frame costs of both modes, with delta / fresh ratios."""
    fresh, delta = video["fresh"]["changed"], video["delta"]["changed"]
    rows = ["| mode | mAP50-95 / mAP50 | steps per changed frame (median) | spikes per frame | energy per frame (uJ) "
            "| fps |", "|---|---|---|---|---|---|"]
    for mode in MODES:
        m, c = video[mode], video[mode]["changed"]
        rows.append(f"| {mode} | {m['map50_95']:.3f} / {m['map50']:.3f} | {c['steps_median']:g} | "
                    f"{_num(c['spikes_mean'], '.3g')} | {_num(c['energy_uj_mean'], '.1f')} | {c['fps']:.1f} |")

    def ratio(key):
        return "—" if fresh.get(key) in (None, 0) or delta.get(key) is None else f"{delta[key] / fresh[key]:.2f}"

    rows.append(f"| delta / fresh | {video['delta']['map50_95'] - video['fresh']['map50_95']:+.4f} (difference) | "
                f"{ratio('steps_median')} | {ratio('spikes_mean')} | {ratio('energy_uj_mean')} | "
                f"{1 / float(ratio('ms_mean')):.2f}x |")
    return "\n".join(rows) + (f"\n({video['changed_frames']} changed frames; keyframe every "
                              f"{video['keyframe_every'] or 'never'} frames)")


def _num(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def plot_energy_per_frame(video: dict, path: Path, title: str):
    """Energy per frame over the frames of the evaluation, fresh and delta, keyframes marked; sequences follow each
    other, a thin line and its name mark where each starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.0), dpi=120)
    for mode, color in (("fresh", "tab:gray"), ("delta", "tab:blue")):
        frames = video[mode]["frames"]
        ax.plot(range(1, len(frames) + 1), [f["energy_uj"] or 0 for f in frames], color=color, lw=1.2, label=mode)
    delta = video["delta"]["frames"]
    keys = [i + 1 for i, f in enumerate(delta) if f["keyframe"]]
    ax.scatter(keys, [delta[i - 1]["energy_uj"] or 0 for i in keys], color="tab:red", s=18, zorder=3,
               label="keyframe (whole schedule)")
    starts = [i + 1 for i, f in enumerate(delta) if i == 0 or f["sequence"] != delta[i - 1]["sequence"]]
    top = max(f["energy_uj"] or 0 for mode in MODES for f in video[mode]["frames"])
    for s in starts:
        if s > 1:
            ax.axvline(s - 0.5, color="black", lw=0.5, alpha=0.3)
        ax.text(s + 1, top * 1.04, delta[s - 1]["sequence"], fontsize=7, va="bottom")
    ax.set_xlabel("frame (sequences one after another)")
    ax.set_ylabel("energy per frame (uJ)")
    ax.set_ylim(0, top * 1.15)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
