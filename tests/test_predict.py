"""``casc predict``: sources (files, folders, globs, videos), run folders, annotated output, labels and JSON,
for both families."""

import json
import re
import shutil

import cv2
import numpy as np
import pytest
import torch

from casc.cli import main
from detector.devices import resolve_device
from detector.data import ensure_bundled
from detector.predict import find_sources, run_folder, saved_suffix
from detector.weights import load_detector

VAL = ensure_bundled() / "images" / "val"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """photos/000000.jpg, photos/000001.jpg, shots/000002.png (+ a text file no one should read)."""
    root = tmp_path_factory.mktemp("src")
    (root / "photos").mkdir()
    (root / "shots").mkdir()
    for name in ("000000.jpg", "000001.jpg"):
        shutil.copy(VAL / name, root / "photos" / name)
    cv2.imwrite(str(root / "shots" / "000002.png"), cv2.imread(str(VAL / "000002.jpg")))
    (root / "shots" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A three-frame MP4 of bundled val images."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (256, 256))
    for name in ("000000.jpg", "000001.jpg", "000002.jpg"):
        writer.write(cv2.imread(str(VAL / name)))
    writer.release()
    return path


def same_labels(path, result) -> bool:
    """The label file holds ``cls xc yc w h conf`` of every box of ``result`` (to the 6 digits written)."""
    written = np.array([[float(v) for v in line.split()] for line in path.read_text().splitlines()])
    expected = torch.cat([result.boxes.cls[:, None].double(), result.boxes.xywhn.double(),
                          result.boxes.conf[:, None].double()], 1).numpy()
    return written.shape == expected.shape and np.allclose(written, expected, rtol=1e-5, atol=1e-6)


def test_find_sources_files_folders_globs_in_order(sources, video):
    found = find_sources([str(video), str(sources / "photos"), str(sources / "shots" / "*.png")])
    assert found == [video, sources / "photos" / "000000.jpg", sources / "photos" / "000001.jpg",
                     sources / "shots" / "000002.png"]
    assert find_sources([str(sources / "**" / "*.jpg")]) == found[1:3]  # recursive glob
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_sources([str(sources / "missing.jpg")])
    with pytest.raises(FileNotFoundError, match="no images or videos"):
        find_sources([str(sources / "shots" / "*.bmp")])


def test_run_folders_are_numbered(tmp_path):
    assert [run_folder(tmp_path, "exp").name for _ in range(3)] == ["exp", "exp2", "exp3"]
    assert (saved_suffix(VAL / "a.JPG"), saved_suffix(VAL / "a.gif"), saved_suffix(VAL / "a.jfif")) == \
        (".jpg", ".png", ".png")


def test_yolo_folder_and_glob_annotated_with_labels_and_json(sources, tmp_path, capsys):
    args = ["predict", "--model", "yolov8n-bundled", str(sources / "photos"), str(sources / "shots" / "*.png"),
            "--conf", "0.2", "--save-txt", "--save-json", "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "exp"
    assert sorted(p.name for p in run.iterdir()) == ["000000.jpg", "000001.jpg", "000002.png", "json", "labels"]
    lines = [line for line in out.splitlines() if line.startswith("image ")]
    assert [line.split(" ")[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("T=" in line and "settled" in line and "ms inference" in line for line in lines)
    assert f"Results saved to {run}" in out and "Speed:" in out
    detector = load_detector("yolov8n-bundled")
    found = 0
    for path in find_sources([str(sources / "photos"), str(sources / "shots")]):
        expected = detector.predict([str(path)], conf=0.2)[0]
        found += len(expected)
        assert same_labels(run / "labels" / f"{path.stem}.txt", expected)
        record = json.loads((run / "json" / f"{path.stem}.json").read_text())
        assert record["detections"] == expected.to_dict()["detections"] and record["steps"] == expected.steps
        assert record["path"] == str(path) and record["settled"] is True
        drawn = cv2.imread(str(run / f"{path.stem}{path.suffix}"))
        assert drawn.shape == (256, 256, 3)
        if path.suffix == ".png":  # lossless: exactly the Results' own drawing
            assert (drawn == expected.plot()).all()
    assert found > 3  # there was something to write
    assert main(args[:-2] + ["--out", str(tmp_path), "--no-save"]) == 0  # a second run: its own folder
    assert sorted(p.name for p in (tmp_path / "exp2").iterdir()) == ["json", "labels"]


def test_rcnn_image_and_video(sources, video, tmp_path, capsys):
    assert main(["predict", "--model", "rcnn-r18-bundled", str(video), str(sources / "photos" / "000000.jpg"),
                 "--conf", "0.4", "--save-txt", "--device", "cpu", "--out", str(tmp_path), "--name", "r"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "r"
    frames = [line for line in out.splitlines() if line.startswith("video 1/2")]
    steps = [re.search(r"T=(\d+) \((\d+)\+(\d+)\) settled", line) for line in frames]
    assert len(frames) == 3 and all(m and int(m[1]) == int(m[2]) + int(m[3]) for m in steps)  # T = stage 1 + 2
    capture = cv2.VideoCapture(str(run / "clip.mp4"))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    assert count == 3
    detector = load_detector("rcnn-r18-bundled")
    first = cv2.VideoCapture(str(video))
    frame = first.read()[1]
    first.release()
    expected = detector.predict([frame], color="bgr", conf=0.4)[0]
    assert same_labels(run / "labels" / "clip_1.txt", expected)
    assert sorted(p.name for p in (run / "labels").iterdir()) == ["000000.txt", "clip_1.txt", "clip_2.txt",
                                                                   "clip_3.txt"]
    photo = detector.predict([str(sources / "photos" / "000000.jpg")], conf=0.4)[0]
    assert same_labels(run / "labels" / "000000.txt", photo)
    assert torch.all(photo.boxes.cls < len(photo.names)) and (run / "000000.jpg").is_file()


def test_yolo_on_the_onnx_runtime_engine_writes_the_pytorch_engines_detections(onnx_cache, sources, tmp_path,
                                                                                capsys):
    image = sources / "photos" / "000000.jpg"
    assert main(["predict", "--model", "yolov8n-bundled", str(image), "--engine", "onnxruntime", "--provider", "cpu",
                 "--save-json", "--out", str(tmp_path)]) == 0
    assert "T=" in capsys.readouterr().out
    record = json.loads((tmp_path / "exp" / "json" / "000000.json").read_text())
    expected = load_detector("yolov8n-bundled").predict([str(image)])[0]
    assert [d["class_id"] for d in record["detections"]] == expected.boxes.cls.tolist() and len(expected)
    assert np.allclose([d["box"] for d in record["detections"]], expected.boxes.xyxy, atol=1e-2)
    assert (record["steps"], record["settled"]) == (expected.steps, expected.settled)
    assert record["spikes"] is None and record["energy_uj"] is None  # the graphs count no spikes
    exported = next(onnx_cache.rglob("export.json")).parent  # an exported .onnx (or its folder) as --model
    assert main(["predict", "--model", str(next(exported.glob("*.onnx"))), str(image), "--save-json",
                 "--project", str(tmp_path), "--name", "onnx"]) == 0
    assert json.loads((tmp_path / "onnx" / "json" / "000000.json").read_text())["detections"] == record["detections"]
    with pytest.raises(SystemExit):
        main(["predict", "--model", "yolov8n-bundled", str(image), "--engine", "tvm"])


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["predict", "--model", "yolov8n-bundled", str(tmp_path / "nothing.jpg"), "--out", str(tmp_path)]) == 2
    assert "casc predict: error: no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.zeros(64, np.uint8).tobytes())
    assert main(["predict", "--model", "yolov8n-bundled", str(bad), "--out", str(tmp_path)]) == 2
    assert "cannot open the video" in capsys.readouterr().err


def test_devices():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_vid_stride_uses_every_nth_frame(video, tmp_path, capsys):
    assert main(["predict", "--model", "yolov8n-bundled", str(video), "--vid-stride", "2", "--no-save", "--save-txt",
                 "--project", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "(frame 1/3, keyframe" in out and "(frame 3/3, delta" in out and "(frame 2/3" not in out
    assert sorted(p.name for p in (tmp_path / "exp" / "labels").iterdir()) == ["clip_1.txt", "clip_3.txt"]


def test_videos_run_by_delta_frames_unless_told_otherwise(video, tmp_path, capsys):
    """casc predict VIDEO: the first frame runs the whole schedule, later ones only their change (each line says
    which, its energy and the fps so far); --no-delta makes every frame a fresh run with the same detections."""
    labels = {}
    for flag in ("--delta", "--no-delta"):
        assert main(["predict", "--model", "yolov8n-bundled", str(video), "--no-save", "--save-txt", "--threads", "1",
                     "--project", str(tmp_path), "--name", flag.strip("-"), flag]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("video 1/1")]
        kinds = [re.search(r"\(frame \d/3, (keyframe|delta), [\d.]+ uJ, [\d.]+ fps\)", line)[1] for line in lines]
        assert kinds == (["keyframe", "delta", "delta"] if flag == "--delta" else ["keyframe"] * 3), lines
        labels[flag] = [(tmp_path / flag.strip("-") / "labels" / f"clip_{i}.txt").read_text() for i in (1, 2, 3)]
    assert labels["--delta"][0] == labels["--no-delta"][0]  # the keyframe is a fresh run
