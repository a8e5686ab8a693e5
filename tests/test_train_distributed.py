"""casc train rcnn: under torchrun on the CPU (gloo) two processes equal one with the same global batch; --model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torchvision.models.detection._utils import Matcher

from detector.data import open_dataset
from detector.models.rcnn import build_fasterrcnn, to_qann_fasterrcnn
from detector.train.distributed import Process, start_process
from detector.train.rcnn import distribute, parameter_groups, train_loader, train_one_epoch
from test_rcnn import _coco_fixture

ROOT = Path(__file__).resolve().parents[1]
PER_PROCESS = 2


def _exact_sampling_qann() -> torch.nn.Module:
    """A small QANN whose loss is a plain mean over its images, so that averaging the gradients of two halves of a
    batch is the gradient of the whole. Faster R-CNN draws anchors and RoIs at random per image (the two runs draw
    from different random streams) and divides its losses by how many it drew in the batch; here every anchor and
    every RoI is taken (samplers larger than the candidates, no IoU band left out) and each image yields the same
    count (same size; a fixed number of proposals, exceeded by NMS's survivors; one box per image). The backbone's
    BatchNorms are frozen, as in QAT, so no batch statistic depends on how the batch is split."""
    torch.manual_seed(0)
    model = to_qann_fasterrcnn(build_fasterrcnn("resnet18_fpn", num_classes=3, min_size=64, max_size=96,
                                                representation_size=32), 4, inplace=True)
    model.rpn.proposal_matcher = Matcher(0.5, 0.5, allow_low_quality_matches=True)
    model.rpn.fg_bg_sampler.batch_size_per_image = 10**6
    model.rpn._post_nms_top_n["training"] = 8
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 10**6
    return model


def _one_step(process: Process, data: Path, batch: int) -> dict[str, torch.Tensor]:
    model = _exact_sampling_qann()
    optimizer = torch.optim.SGD(parameter_groups(model, "learn", 1e-4), lr=0.01, momentum=0.9, weight_decay=1e-4)
    trained = distribute(model, process, torch.device("cpu"))
    loader = train_loader(open_dataset(f"coco:{data}", "train"), batch, process, seed=0, workers=0)
    assert len(loader) == 1  # one optimizer step
    train_one_epoch(trained, loader, optimizer, torch.device("cpu"), process)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world_size: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    process = start_process("cpu")
    try:
        torch.save(_one_step(process, Path(data), PER_PROCESS), Path(out) / f"rank{rank}.pt")
    finally:
        process.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_step_on_two_processes_equals_the_same_global_batch_on_one(tmp_path):
    data = tmp_path / "coco"
    _coco_fixture(data)  # 4 images of one size, one box each
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _one_step(Process(), data, 2 * PER_PROCESS)
    start = _exact_sampling_qann().state_dict()
    moved = [k for k in single if single[k].is_floating_point() and not torch.equal(single[k], start[k])]
    assert any("threshold_param" in k for k in moved) and any("roi_heads" in k for k in moved)
    for k in single:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # DDP keeps the processes equal
        # equal up to the order of float sums (the loss terms of two halves added apart, then averaged)
        torch.testing.assert_close(ranks[0][k], single[k], rtol=1e-5, atol=1e-7, msg=k)


def test_torchrun_two_cpu_processes_train_and_only_rank_0_writes(tmp_path):
    data = tmp_path / "coco"
    _coco_fixture(data)
    out = tmp_path / "runs" / "rcnn"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "casc",
               "train", "rcnn", "--model", "resnet18_fpn", "--data", str(data), "--epochs", "1", "--batch", "1",
               "--min-size", "64", "--max-size", "96", "--representation-size", "32", "--workers", "0",
               "--warmup-iters", "1", "--device", "cpu", "--max-minutes", "10",  # a time cap: all-reduced per step
               "--project", str(tmp_path / "runs"), "--name", "rcnn"]  # a run folder that process 0 numbers
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes x 1 images = global batch 2, lr 0.0025" in done.stderr
    # each process returns the same path; one file, written by process 0
    returned = [line for line in done.stdout.splitlines() if line.startswith("checkpoint: ")]
    assert returned == [f"checkpoint: {out / 'last.pt'}"] * 2
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["world_size"] == 2 and saved["global_batch"] == 2
    assert saved["meta"]["levels"] == 4 and sorted(p.name for p in out.iterdir()) == ["last.pt"]
    assert [p.name for p in out.parent.iterdir()] == ["rcnn"]  # one folder, not one per process
    # resume with another number of processes: model, optimizer and schedule from the checkpoint, the next epoch
    from casc.cli import main

    resume = command[command.index("train"):command.index("--epochs")] + command[command.index("--batch"):]
    assert main(resume + ["--epochs", "2", "--resume", str(out / "last.pt")]) == 0
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["world_size"] == 1


def test_a_job_of_one_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    process = start_process("cpu")
    assert process == Process() and process.is_main and not process.distributed
    assert process.any(True) and not process.any(False) and process.device("auto").type in ("cpu", "cuda")
    assert process.from_main(lambda: "made once") == "made once"


def test_a_model_of_another_family_is_refused(capsys):
    from casc.cli import main

    assert main(["train", "rcnn", "--model", "yolov8n-bundled", "--data", "bundled", "--epochs", "1"]) == 2
    assert "yolov8n-bundled is a yolo model; casc train rcnn trains Faster R-CNN" in capsys.readouterr().err


def test_a_bundled_qann_continues_its_training(tmp_path):
    from casc.cli import main
    from detector.models.rcnn import load_checkpoint
    from detector.weights import resolve

    out = tmp_path / "run"
    assert main(["train", "rcnn", "--model", "rcnn-r18-bundled", "--data", "bundled", "--epochs", "1", "--batch", "1",
                 "--workers", "0", "--device", "cpu", "--max-minutes", "0.001", "--out", str(out)]) == 0  # one step
    saved = torch.load(out / "last.pt", weights_only=True)
    bundled = load_checkpoint(resolve("rcnn-r18-bundled").path)
    assert saved["meta"]["levels"] == bundled["meta"]["levels"] == 4 and saved["meta"]["arch"] == "resnet18_fpn"
    assert (saved["meta"]["min_size"], saved["meta"]["max_size"]) == (256, 256)  # the checkpoint's sizes, not 800
    assert saved["state_dict"].keys() == bundled["state_dict"].keys()
