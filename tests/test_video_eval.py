"""The bundled video split and the delta-against-fresh evaluation on it."""

import json

import numpy as np
import pytest

from detector.data import open_dataset
from detector.data.coco import read_coco
from detector.data.video import ensure_video, render_sequence, sequences_of
from eval.video import delta_against_fresh, format_table, plot_energy_per_frame


def test_sequences_are_seeded_and_static_scenes_change_only_around_the_objects():
    a = list(render_sequence(3, "static", 4))
    b = list(render_sequence(3, "static", 4))
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    changed = [(a[i][0] != a[i + 1][0]).any(2).mean() for i in range(3)]
    assert all(0 < c < 0.15 for c in changed), changed  # a few moving objects over a fixed scene
    jitter = list(render_sequence(3, "jitter", 3))
    assert (jitter[0][0] != jitter[1][0]).any(2).mean() > 0.9  # a shaky, noisy camera: every pixel changes
    for img, boxes, labels, _ in a + jitter:
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8 and len(boxes) == len(labels) >= 1
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 256).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    with pytest.raises(ValueError, match="kind"):
        next(render_sequence(0, "handheld"))


def test_the_split_is_coco_with_one_folder_per_sequence(tmp_path):
    root = ensure_video(tmp_path / "v", sequences=1, frames=3)
    data = json.loads((root / "annotations" / "instances_video.json").read_text())
    assert [i["file_name"] for i in data["images"]][:3] == [f"static-00/{k:06d}.png" for k in (1, 2, 3)]
    ds = read_coco(root / "images" / "video", root / "annotations" / "instances_video.json")
    assert len(ds) == 6 and [len(s) for s in sequences_of([ds.image_path(i) for i in range(6)])] == [3, 3]
    assert ensure_video(tmp_path / "v", sequences=1, frames=3) == root  # already there: kept
    with pytest.raises(ValueError, match="one split"):
        open_dataset("bundled-video", "train")


def test_delta_against_fresh_scores_both_and_costs_less(tmp_path):
    from detector.weights import load_detector

    root = ensure_video(tmp_path / "v", sequences=1, frames=4)
    ds = read_coco(root / "images" / "video", root / "annotations" / "instances_video.json", name="tiny-video")
    det = load_detector("yolov8n-bundled")
    video = delta_against_fresh(det, ds, len(ds), None, {"conf": 0.001})
    assert video["changed_frames"] == 6  # two sequences of 4 frames, the first of each a keyframe
    assert [f["keyframe"] for f in video["delta"]["frames"]] == [True, False, False, False] * 2
    assert all(f["keyframe"] for f in video["fresh"]["frames"])
    assert abs(video["delta"]["map50_95"] - video["fresh"]["map50_95"]) < 0.01
    fresh, delta = video["fresh"]["changed"], video["delta"]["changed"]
    assert delta["steps_median"] < fresh["steps_median"] and delta["energy_uj_mean"] < fresh["energy_uj_mean"]
    table = format_table(video)
    assert "| delta / fresh |" in table and "6 changed frames" in table
    import matplotlib.image

    pixels = (matplotlib.image.imread(plot_energy_per_frame(video, tmp_path / "energy.png", "tiny"))[..., :3] * 255)
    pixels = pixels.round().astype(int).reshape(-1, 3)
    colors = {"delta": (31, 119, 180), "fresh": (127, 127, 127), "keyframe": (214, 39, 40)}  # tab: blue, gray, red
    drawn = {name: int((np.abs(pixels - rgb).sum(1) <= 6).sum()) for name, rgb in colors.items()}
    assert all(n > 50 for n in drawn.values()), drawn  # both curves and the keyframe marks are on the plot
