"""casc eval end to end: the bundled detectors on a tiny set in the bundled benchmark's format."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from detector.data import generate_bundled
from eval.runner import add_arguments, evaluate, format_table, parse_timesteps


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    generate_bundled(root, train=4, val=4, seed=11, workers=1)
    return root


def eval_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def yolo_argv(tiny_set, out, *extra):
    return ["--model", "yolov8n-bundled", "--data", f"coco:{tiny_set}", "--limit", "4", "--batch", "2",
            "--timesteps", "1,4,8", "--dtype", "float64", "--calibration-images", "4", "--threads", "2",
            "--out", str(out), *extra]


def test_parse_timesteps():
    assert parse_timesteps("1-4,8, 16") == [1, 2, 3, 4, 8, 16]
    for bad in ("", "0-3", "a,b"):
        with pytest.raises(ValueError, match="timesteps"):
            parse_timesteps(bad)


def test_yolo_all_methods_one_pass_outputs_and_resume(tiny_set, tmp_path):
    out = tmp_path / "yolo"
    results = evaluate(eval_args(*yolo_argv(tiny_set, out)))
    summary = results["summary"]
    assert set(summary) == {"ann", "qann", "casc", "if"}
    qann, casc = summary["qann"]["metrics"]["flat"], summary["casc"]["metrics"]
    # float64: once settled, the spiking network's detections are the QANN's, so is every metric
    assert casc["auto"]["map50_95"] == qann["map50_95"] and casc["auto"]["map50"] == qann["map50"]
    assert casc["auto"]["steps_mean"] > 4 and set(summary["if"]["metrics"]) == {"1", "4", "8"}
    assert summary["casc"]["energy_uj_at"]["8"] > summary["casc"]["energy_uj_at"]["1"] > 0
    assert results["model"]["sha256"] and results["data"]["images"] == 4
    rows = (out / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("method,T,map50_95") and len(rows) == 1 + 2 + 4 + 3
    assert (out / "map_vs_t.png").stat().st_size > 0 and (out / "firing_rates.png").stat().st_size > 0
    assert "CASC" in format_table(summary, [1, 4, 8])

    cached = sorted((out / "cache").rglob("batch_*.json"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = evaluate(eval_args(*yolo_argv(tiny_set, out)))  # resumes: nothing recomputed
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert again["summary"]["casc"]["metrics"] == summary["casc"]["metrics"]


def test_torchrun_two_processes_give_the_numbers_of_one(tiny_set, tmp_path):
    argv = yolo_argv(tiny_set, tmp_path / "one", "--methods", "qann,casc")
    single = evaluate(eval_args(*argv))["summary"]
    two = tmp_path / "two"
    argv[argv.index("--out") + 1] = str(two)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "eval", *argv],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    gathered = json.loads((two / "results.json").read_text())
    assert gathered["processes"] == 2
    assert gathered["summary"]["casc"]["metrics"] == single["casc"]["metrics"]
    assert gathered["summary"]["qann"]["metrics"] == single["qann"]["metrics"]


def test_two_stage_rcnn_settles_on_the_qann(tiny_set, tmp_path):
    results = evaluate(eval_args("--model", "rcnn-r18-bundled", "--data", f"coco:{tiny_set}", "--limit", "2",
                                 "--timesteps", "1,4", "--methods", "qann,casc", "--dtype", "float64",
                                 "--threads", "2", "--out", str(tmp_path / "rcnn")))
    summary = results["summary"]
    assert summary["casc"]["metrics"]["auto"]["map50_95"] == summary["qann"]["metrics"]["flat"]["map50_95"]
    assert summary["casc"]["metrics"]["auto"]["steps_mean"] > 8  # both stages, wake + sleep each


def test_bad_arguments_are_clear_errors(tiny_set, tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        evaluate(eval_args(*yolo_argv(tiny_set, tmp_path, "--methods", "casc,lif")))
    with pytest.raises(ValueError, match="must be a QANN"):
        evaluate(eval_args(*yolo_argv(tiny_set, tmp_path), "--model", "yolov8n-bundled-float"))
    with pytest.raises(FileNotFoundError):
        evaluate(eval_args(*yolo_argv(tiny_set, tmp_path), "--model", "no-such-model"))
