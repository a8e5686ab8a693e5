"""A new user's first hour, repeated on the bundled data: install as documented, predict, evaluate on their own
VOC data with their own classes, plot the VOC07 metric, quantize a bare torchvision Faster R-CNN, and every
mistake on the way answered by one line that says what to do (issue 22's trial, step by step)."""

import re
import tomllib
from pathlib import Path

import pytest
import torch

from casc.cli import main as casc
from detector.data import open_dataset
from detector.models.rcnn import build_fasterrcnn
from detector.weights import load_detector
from eval.plots import plot_map_vs_t
from eval.summary import steps_to_reach

ROOT = Path(__file__).resolve().parent.parent


def _bash_lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for line in block.splitlines()]


def test_one_install_path_without_the_gui_opencv():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {re.split(r"[<>=!\[; ]", d)[0].lower() for d in every}
    assert "ultralytics" not in names and "opencv-python" not in names and "opencv-python-headless" in names
    assert {"service", "onnx"} <= set(project["optional-dependencies"])
    quickstart = [line for line in _bash_lines((ROOT / "docs" / "quickstart.md").read_text())
                  if line.startswith("pip install")]
    assert quickstart == ['pip install -e ".[service,onnx]"', 'pip install --no-deps "ultralytics==8.4.190"']
    makefile = (ROOT / "Makefile").read_text()
    for command in quickstart:  # make install runs the same commands
        assert command.replace("pip install", "$(BIN)/pip install -q", 1) in makefile, command
    assert re.search(r"--no-deps\s+\"?\$ULTRALYTICS_SPEC|--no-deps \$ULTRALYTICS_SPEC",
                     (ROOT / "docker" / "install.sh").read_text())


def write_voc(root: Path, count: int) -> Path:
    """The first ``count`` bundled val images as a VOC folder whose objects carry the bundled class names."""
    bundled = open_dataset("bundled", "val")
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    ids = []
    for i in range(count):
        target, (h, w), stem = bundled.target(i), bundled.image_size(i), f"{i:06d}"
        ids.append(stem)
        (root / "JPEGImages" / f"{stem}.jpg").write_bytes(Path(target["file"]).read_bytes())
        objects = "".join(
            f"<object><name>{bundled.classes[label]}</name><difficult>0</difficult><bndbox><xmin>{b[0] + 1:.0f}</xmin>"
            f"<ymin>{b[1] + 1:.0f}</ymin><xmax>{b[2]:.0f}</xmax><ymax>{b[3]:.0f}</ymax></bndbox></object>"
            for b, label in zip(target["boxes"], target["labels"]))
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height></size>"
            f"{objects}</annotation>")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def test_own_voc_classes_voc07_metric_and_numbered_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    voc = write_voc(tmp_path / "shapes", 2)
    run = ["val", "model=yolov8n-bundled", f"data=voc:{voc}", "methods=qann,casc", "limit=2", "timesteps=2,6",
           "metric=voc07_map50", "threads=1"]
    assert casc(run) == 0  # the VOC objects are read with the model's class names (ellipse, ring, ...)
    out = capsys.readouterr().out
    assert "(cells: VOC07 mAP50 (11-point) / mAP50;" in out
    assert casc(run) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "eval").iterdir()) == ["yolov8n-bundled", "yolov8n-bundled2"]
    assert casc(["plot", "runs/eval/yolov8n-bundled", "--metric", "voc07_map50", "--out", "plot"]) == 0
    assert (tmp_path / "plot" / "map_vs_t.png").stat().st_size > 0
    capsys.readouterr()
    assert casc([*run[:-1], "names=a,b"]) == 2  # names that are not the model's: one line that says what to give
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--names" in err


def test_every_mistake_gets_one_line_that_says_what_to_do(tmp_path, monkeypatch, capsys):
    from detector.weights import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "float.pt").write_bytes(resolve("yolov8n-bundled-float").path.read_bytes())
    mistakes = {
        ("eval", "--model", "float.pt", "--limit", "1"): "float.pt holds a float model, not a QANN: quantize it first",
        ("predict", "--model", "float.pt", open_dataset("bundled", "val").image_path(0)):
            "(casc quantize --model float.pt --levels 4",
        ("eval", "--model", "yolov8n-bundled-float", "--limit", "1"): "casc quantize --model yolov8n-bundled-float",
        ("train", "yolo", "--data", "missing.yaml"): "give the path of an Ultralytics data.yaml",
        ("predict", "--model", "yolov8n-bundled"): "no SOURCE given",
        ("predict", "--model", "yolov8n-bundled", "--classes", "cat", "x.jpg"): "expected class ids",
        ("predict", "model=yolov8n-bundled", "save=perhaps", "x.jpg"): "save=True or save=False",
    }
    for argv, advice in mistakes.items():
        assert casc(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and advice in err, (argv, err)
    assert not (tmp_path / "runs").exists()  # a refused run leaves no run folder behind


def test_a_bare_torchvision_state_dict_quantizes_with_its_size_and_names(tmp_path, capsys):
    path = tmp_path / "float.pt"
    torch.save(build_fasterrcnn("resnet18_fpn", num_classes=4, min_size=128, max_size=128).state_dict(), path)
    assert casc(["quantize", f"model={path}", "data=bundled", "images=2", "batch=2", "min_size=128", "max_size=128",
                 "names=circle,square,ring", f"out={tmp_path / 'q.pt'}"]) == 0
    out = capsys.readouterr().out
    assert "quantize: 2 calibration images from bundled (train)" in out  # progress, also into a log file
    detector = load_detector(tmp_path / "q.pt")  # resnet18 inferred from the state dict
    assert detector.names == {0: "circle", 1: "square", 2: "ring"}
    assert (detector.qann.transform.min_size, detector.qann.transform.max_size) == ((128,), 128)
    assert casc(["quantize", f"model={path}", "data=bundled", "images=2", "names=a,b", f"out={tmp_path / 'x.pt'}"]) == 2
    assert "2 names for a model with 3 classes" in capsys.readouterr().err


def test_a_qann_at_zero_reaches_nothing_and_plots_stay_above_zero(tmp_path):
    zero = {"metrics": {"1": {"map50_95": 0.0}, "2": {"map50_95": 0.0}}}
    assert steps_to_reach(zero, 0.0, [1, 2]) is None
    assert steps_to_reach({"metrics": {"1": {"map50_95": 0.2}, "2": {"map50_95": 0.5}}}, 0.5, [1, 2]) == 2
    flat = {"map50_95": 0.0, "map50": 0.0, "steps_mean": None}
    results = {"model": {"name": "zero", "family": "yolo", "levels": 4}, "data": {"name": "d", "images": 1},
               "schedule": {"wake": 4, "sleep": "auto", "burst": 4, "timesteps": [1, 2]},
               "machine": {"device": "cpu", "threads": 1, "cores": 2},
               "summary": {"qann": {"metrics": {"flat": flat}, "latency_ms": 1.0},
                           "casc": {"metrics": {"1": dict(flat, steps_mean=1), "2": dict(flat, steps_mean=2)},
                                    "energy_uj_at": {"1": 1.0, "2": 2.0}, "latency_ms_at": {"1": 1.0, "2": 2.0},
                                    "ann_energy_uj": 10.0, "latency_ms": 2.0}}}
    assert plot_map_vs_t([results], tmp_path / "t.png").axes[0].get_ylim()[0] == pytest.approx(0.0)


_WITHOUT_ULTRALYTICS = """
import importlib.abc, importlib.util, sys
class Absent(importlib.abc.MetaPathFinder):  # as if pip had not installed it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ultralytics":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
found = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "ultralytics" else found(name, *a)
from casc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_ultralytics_faster_rcnn_runs_and_yolo_says_what_to_install(tmp_path):
    import subprocess
    import sys

    image = str(open_dataset("bundled", "val").image_path(0))
    run = lambda model: subprocess.run(  # noqa: E731
        [sys.executable, "-c", _WITHOUT_ULTRALYTICS, "predict", "--model", model, image, "--no-save", "--threads", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                                       "HOME": str(Path.home())})
    yolo = run("yolov8n-bundled")
    assert yolo.returncode == 2 and yolo.stderr.strip().splitlines() == [
        "casc predict: error: needs Ultralytics, without its GUI OpenCV: pip install --no-deps 'ultralytics==8.4.190' "
        "(missing module ultralytics)"]
    rcnn = run("rcnn-r18-bundled")
    assert rcnn.returncode == 0 and "image 1/1" in rcnn.stdout, rcnn.stderr


def test_own_voc_classes_train_and_quantize_with_names(tmp_path, capsys):
    voc = write_voc(tmp_path / "shapes", 2)
    (voc / "ImageSets" / "Main" / "train.txt").write_text((voc / "ImageSets" / "Main" / "val.txt").read_text())
    names = ",".join(open_dataset("bundled", "val").classes)
    assert casc(["train", "rcnn", "--arch", "resnet18_fpn", "--data", f"voc:{voc}", "--names", names, "--float",
                 "--epochs", "1", "--batch", "2", "--min-size", "64", "--max-size", "64", "--representation-size", "32",
                 "--workers", "0", "--warmup-iters", "1", "--out", str(tmp_path / "float")]) == 0
    float_model = Path(capsys.readouterr().out.strip().splitlines()[-1].split("checkpoint: ")[-1])
    assert casc(["quantize", "--model", str(float_model), "--data", f"voc:{voc}", "--names", names, "--images", "2",
                 "--batch", "2", "--out", str(tmp_path / "q.pt")]) == 0
    assert list(load_detector(tmp_path / "q.pt").names.values()) == names.split(",")
    assert casc(["train", "rcnn", "--arch", "resnet18_fpn", "--data", f"voc:{voc}", "--epochs", "1",
                 "--out", str(tmp_path / "x")]) == 2  # without --names: the 20 VOC classes, and a hint
    assert "unknown class name" in capsys.readouterr().err
