"""The YOLO QAT recipe inside Ultralytics' trainer: groups, start, a tiny run on the bundled data, the DDP entry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detector.data import ensure_bundled
from detector.models.yolo import build_qann, load_checkpoint, prepare_ultralytics, ultralytics_start_checkpoint
from detector.quant import ClipQuan

ROOT = Path(__file__).resolve().parents[1]


def _bundled_subset(folder: Path, train: int = 4, val: int = 2) -> Path:
    """A data YAML over the first images of the bundled benchmark (lists of files: Ultralytics reads them)."""
    root = ensure_bundled()
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        images = sorted((root / "images" / split).iterdir())[:count]
        (folder / f"{split}.txt").write_text("".join(f"{p}\n" for p in images))
    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    data = folder / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(folder), "train": "train.txt", "val": "val.txt", "names": names}))
    return data


def _trainer(tmp_path: Path, theta: str = "learn", nc: int = 3):
    """A QATDetectionTrainer over a start checkpoint of a small QANN (thresholds 0.5 + i / 100)."""
    prepare_ultralytics()
    from detector.train.yolo_trainer import QATDetectionTrainer

    model = build_qann("yolov8n.yaml", levels=4, act="relu", nc=nc)
    for i, quantizer in enumerate(m for m in model.modules() if isinstance(m, ClipQuan)):
        quantizer.threshold_param.fill_(0.5 + i / 100)
    model.yaml["casc"]["qat"] = {"theta": theta, "theta_lr": 0.05, "distill": 0.0, "teacher": None}
    start = ultralytics_start_checkpoint(model, tmp_path / "start.pt")
    trainer = QATDetectionTrainer(overrides=dict(model=str(start), data=str(_bundled_subset(tmp_path / "data")),
                                                 device="cpu", imgsz=64, batch=2, workers=0, epochs=1, plots=False,
                                                 project=str(tmp_path), name="run", exist_ok=True))
    return trainer, model


@pytest.mark.parametrize("theta", ["learn", "freeze"])
def test_thresholds_get_their_own_group_without_decay(theta, tmp_path):
    trainer, start = _trainer(tmp_path, theta, nc=3)
    model = trainer.get_model(cfg=start.yaml, weights=start, verbose=False)
    assert model.yaml["nc"] == 8 and model.yaml["casc"]["qat"]["theta"] == theta  # the data's 8 classes: new head
    quantizers = [m for m in model.modules() if isinstance(m, ClipQuan)]
    assert [q.threshold for q in quantizers] == pytest.approx([0.5 + i / 100 for i in range(len(quantizers))])
    assert all(q.learnable == (theta == "learn") for q in quantizers)
    optimizer = trainer.build_optimizer(model, name="AdamW", lr=0.01, momentum=0.9, decay=5e-4)
    groups = {g["param_group"]: g for g in optimizer.param_groups}
    thresholds = {id(q.threshold_param) for q in quantizers}
    others = {id(p) for name, g in groups.items() if name != "theta" for p in g["params"]}
    assert not thresholds & others and groups["weight"]["weight_decay"] == 5e-4
    if theta == "learn":
        assert {id(p) for p in groups["theta"]["params"]} == thresholds
        assert groups["theta"]["lr"] == 0.05 and groups["theta"]["weight_decay"] == 0.0
    else:
        assert "theta" not in groups
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(1 for p in model.parameters())


def _parsed(argv: list[str]):
    import argparse

    from detector.train.yolo import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_a_bundled_qann_continues_and_a_float_model_starts_calibrated():
    from detector.train.yolo import start_model, teacher_spec
    from detector.weights import resolve

    args = _parsed(["--model", "yolov8n-bundled", "--data", "bundled", "--levels", "8"])
    model, meta, float_start, _ = start_model(args)
    bundled, _ = load_checkpoint(resolve("yolov8n-bundled").path)
    assert float_start is None and meta["levels"] == 4 and meta["imgsz"] == 256  # its own levels, not --levels
    assert torch.equal(model.state_dict()["model.0.act.threshold_param"],
                       bundled.state_dict()["model.0.act.threshold_param"])
    with pytest.raises(ValueError, match="--distill needs the float model"):
        teacher_spec(_parsed(["--model", "yolov8n-bundled", "--data", "bundled", "--distill", "1"]), float_start)
    args = _parsed(["--model", "yolov8n-bundled-float", "--data", "bundled", "--calibrate-images", "2",
                    "--first-levels", "8", "--distill", "1"])
    model, meta, float_start, _ = start_model(args)
    levels = [q.levels for q in model.modules() if isinstance(q, ClipQuan)]
    thresholds = [q.threshold for q in model.modules() if isinstance(q, ClipQuan)]
    assert levels[0] == 8 and set(levels[1:]) == {4} and meta["levels"] == 8 and 1.0 not in thresholds
    assert model.yaml["casc"] == {"levels": 8, "act": "relu", "quantized": True}
    assert teacher_spec(args, float_start) == "yolov8n-bundled-float"
    with pytest.raises(ValueError, match="is a rcnn model; casc train yolo trains YOLO"):
        start_model(_parsed(["--model", "rcnn-r18-bundled", "--data", "bundled"]))


def test_trainer_arguments_from_the_shared_options(tmp_path, capsys):
    from casc.cli import main
    from detector.train.yolo import data_yaml, trainer_overrides

    assert data_yaml("bundled") == ensure_bundled() / "data.yaml"
    with pytest.raises(ValueError, match="train on coco:DIR or voc:DIR with --qat"):
        data_yaml(f"coco:{tmp_path}")
    args = _parsed(["--data", "bundled", "--iterations", "10", "--batch", "16", "--lr", "0.002", "--max-minutes", "30",
                    "--device", "cpu", "--out", str(tmp_path / "run")])
    overrides = trainer_overrides(args, tmp_path / "start.pt", tmp_path / "data.yaml", 256, train_images=100)
    assert overrides["epochs"] == 2 and overrides["time"] == 0.5  # 10 steps of 7 per epoch; 30 minutes in hours
    assert (overrides["optimizer"], overrides["lr0"], overrides["device"]) == ("AdamW", 0.002, "cpu")
    assert (overrides["project"], overrides["name"], overrides["imgsz"]) == (str(tmp_path), "run", 256)
    assert main(["train", "yolo", "--data", "bundled", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "--resume: no " in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_start_that_is_not_ours_is_refused(tmp_path):
    trainer, start = _trainer(tmp_path)
    with pytest.raises(ValueError, match="starts from a checkpoint written by casc train yolo"):
        trainer.get_model(cfg="yolov8n.yaml", weights=None)


def test_ultralytics_ddp_entry_file_imports_our_trainer(tmp_path):
    pytest.importorskip("cloudpickle", reason="Ultralytics' DDP launch needs cloudpickle (requirements.txt)")
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    trainer, _ = _trainer(tmp_path)
    file = generate_ddp_file(trainer)
    try:
        # the entry file as Ultralytics runs it in every worker, up to the training itself
        script = Path(file).read_text().replace(
            "trainer.train()", "print('built', type(trainer).__module__, type(trainer).__name__, trainer.args.imgsz)")
        entry = tmp_path / "entry.py"
        entry.write_text(script)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, str(entry)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "built detector.train.yolo_trainer QATDetectionTrainer 64" in done.stdout
    finally:
        ddp_cleanup(trainer, file)


@pytest.mark.slow
def test_two_iterations_of_the_trainer_on_the_bundled_data(tmp_path, capsys):
    """From the bundled float model: calibrated start, two steps of Ultralytics' trainer (mosaic on), distillation,
    our safe checkpoints, the thresholds learnt."""
    from casc.cli import main

    data = _bundled_subset(tmp_path / "data")
    out = tmp_path / "run"
    code = main(["train", "yolo", "--model", "yolov8n-bundled-float", "--data", str(data), "--epochs", "1",
                 "--batch", "2", "--imgsz", "64", "--calibrate-images", "4", "--distill", "0.5", "--device", "cpu",
                 "--workers", "0", "--no-plots", "--out", str(out)])
    assert code == 0
    best = Path(capsys.readouterr().out.strip().splitlines()[-1].split("checkpoint: ")[-1])
    assert best == out / "weights" / "best.pt"
    start, _ = load_checkpoint(tmp_path / "run-start.pt")
    last, meta = load_checkpoint(out / "weights" / "last.casc.pt")
    assert meta["levels"] == 4 and meta["imgsz"] == 64 and meta["names"][0] == "circle"
    started = [q.threshold for q in start.modules() if isinstance(q, ClipQuan)]
    learnt = [q.threshold for q in last.modules() if isinstance(q, ClipQuan)]
    assert 1.0 not in started and learnt != started  # a calibrated start (no theta = 1), then learnt
    assert load_checkpoint(out / "weights" / "best.casc.pt")[1]["levels"] == 4
    assert "train/distill" in (out / "results.csv").read_text().splitlines()[0]
    trained, _ = load_checkpoint(out / "weights" / "last.pt")  # Ultralytics' checkpoint carries the settings
    assert trained.yaml["casc"]["qat"] == {"theta": "learn", "theta_lr": None, "distill": 0.5,
                                           "teacher": "yolov8n-bundled-float"}
    assert main(["train", "yolo", "--data", str(data), "--out", str(out), "--resume"]) == 2
    assert f"has finished; train its QANN further with --model {out / 'weights' / 'last.casc.pt'}" in \
        capsys.readouterr().err
    # resume, as after an interruption: the run had asked for 2 epochs (a checkpoint this test wrote itself)
    ckpt = torch.load(out / "weights" / "last.pt", weights_only=False)
    ckpt["train_args"]["epochs"], ckpt["epoch"] = 2, 0  # (Ultralytics marks a finished run's last.pt epoch -1)
    torch.save(ckpt, out / "weights" / "last.pt")
    assert main(["train", "yolo", "--data", str(data), "--out", str(out), "--resume"]) == 0
    assert len((out / "results.csv").read_text().splitlines()) == 3  # the header and 2 epochs
