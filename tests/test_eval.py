"""casc eval end to end: the bundled detectors on a tiny set in the bundled benchmark's format."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from detector.data import generate_bundled
from detector.families import FAMILIES
from casc.cli import main as casc
from detector.devices import default_threads
from eval import EvalConfig, evaluate, report_text
from eval.cli import add_arguments, config_of
from eval.config import METHODS, parse_methods, parse_timesteps, stage_budgets
from eval.report import estimate_cost, format_table


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    generate_bundled(root, train=4, val=4, seed=11, workers=1)
    return root


def eval_args(*argv) -> EvalConfig:
    """The config ``casc eval`` makes of ``argv``."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_of(parser.parse_args(list(argv)))


def yolo_argv(tiny_set, out, *extra):
    return ["--model", "yolov8n-bundled", "--data", f"coco:{tiny_set}", "--limit", "4", "--batch", "2",
            "--timesteps", "1,4,8", "--dtype", "float64", "--calibration-images", "4", "--threads", "1",
            "--out", str(out), *extra]


def assert_drawn(path) -> None:
    """A readable PNG with a drawing on it: many colours, not a blank or single-colour canvas."""
    from PIL import Image

    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, f"{path.name}: {len(colours or [])} colours"


def test_parse_timesteps():
    assert parse_timesteps("1-4,8, 16") == [1, 2, 3, 4, 8, 16]
    for bad in ("", "0-3", "a,b"):
        with pytest.raises(ValueError, match="timesteps"):
            parse_timesteps(bad)


def test_yolo_all_methods_one_pass_outputs_and_resume(tiny_set, tmp_path):
    out = tmp_path / "yolo"
    results = evaluate(eval_args(*yolo_argv(tiny_set, out)))
    summary = results.summary
    assert set(summary) == {"ann", "qann", "casc", "if"}
    qann, casc = summary["qann"]["metrics"]["flat"], summary["casc"]["metrics"]
    # float64: once settled, the spiking network's detections are the QANN's, so is every metric
    assert casc["auto"]["map50_95"] == qann["map50_95"] and casc["auto"]["map50"] == qann["map50"]
    assert casc["auto"]["steps_mean"] > 4 and set(summary["if"]["metrics"]) == {"1", "4", "8"}
    assert summary["casc"]["energy_uj_at"]["8"] > summary["casc"]["energy_uj_at"]["1"] > 0
    assert results.model["sha256"] and results.data["images"] == 4
    rows = (out / "curve.csv").read_text().splitlines()
    # one row per method and T: ann and qann once (no T), CASC at T = 1, 4, 8 and auto, IF at T = 1, 4, 8
    keys = [tuple(row.split(",")[:2]) for row in rows[1:]]
    assert rows[0].startswith("method,T,map50_95")
    assert keys == [("ann", ""), ("qann", ""), ("casc", "1"), ("casc", "4"), ("casc", "8"), ("casc", "auto"),
                    ("if", "1"), ("if", "4"), ("if", "8")], keys
    for name in ("map_vs_t", "map_vs_energy", "map_vs_latency", "firing_rates"):
        assert_drawn(out / f"{name}.png")
    assert summary["if"]["latency_ms_at"]["1"] < summary["if"]["latency_ms_at"]["8"] <= summary["if"]["latency_ms"]
    assert summary["ann"]["latency_ms"] > 0 and results.schedule["burst"] == results.schedule["wake"] == 4
    # the report is what results.json holds, and what casc eval prints of it
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results.as_json()))
    assert results.out == out and results.written[:2] == ["results.json", "curve.csv"]
    text = report_text(results)
    assert text.startswith("| method | T=1 | T=4 | T=8 | T=auto |") and text.endswith(
        f"results in {out.resolve()}: {', '.join(results.written)}")

    cached = sorted((out / "cache").rglob("batch_*.json"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = evaluate(eval_args(*yolo_argv(tiny_set, out)))  # resumes: nothing recomputed
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert again.summary["casc"]["metrics"] == summary["casc"]["metrics"]


def test_torchrun_two_processes_give_the_numbers_of_one(tiny_set, tmp_path):
    argv = yolo_argv(tiny_set, tmp_path / "one", "--methods", "qann,casc")
    single = evaluate(eval_args(*argv)).summary
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


def test_onnxruntime_engine_gives_the_pytorch_curve_without_energy(tiny_set, tmp_path, monkeypatch):
    """casc eval --engine onnxruntime: the CASC curve from the exported step graphs follows the PyTorch engine's
    in float32: the same steps at every T, mAP within a few float32 boundary flips (the engines sum in different
    orders; on 4 images one flipped box moves mAP50-95 by ~0.02; identical detections on the bundled val images
    are checked in test_export); no energy (no spike counts)."""
    monkeypatch.setenv("CASC_ONNX_CACHE", str(tmp_path / "onnx"))
    argv = yolo_argv(tiny_set, tmp_path / "torch", "--methods", "qann,casc,casc-paper", "--dtype", "float32")
    expected = evaluate(eval_args(*argv))
    argv[argv.index("--out") + 1] = str(tmp_path / "ort")
    got = evaluate(eval_args(*argv, "--engine", "onnxruntime"))
    assert got.machine["engine"] == "onnxruntime" and got.machine["provider"] == "cpu"
    for method, keys in (("casc", ("1", "4", "8", "auto")), ("casc-paper", ("1", "4", "8"))):  # paper: burst 1
        for key in keys:
            e, g = expected.summary[method]["metrics"][key], got.summary[method]["metrics"][key]
            assert g["steps_mean"] == e["steps_mean"], (method, key)
            assert abs(g["map50_95"] - e["map50_95"]) <= 0.05 and abs(g["map50"] - e["map50"]) <= 0.05, key
    assert "energy_ratio_vs_qann" not in got.summary["casc"]  # no spike counts, so no comparison blocks
    assert got.summary["qann"]["metrics"]["flat"] == expected.summary["qann"]["metrics"]["flat"]
    assert all(v is None for v in got.summary["casc"]["energy_uj_at"].values())
    assert expected.summary["casc"]["energy_uj_at"]["8"] > 0


def test_two_stage_rcnn_settles_on_the_qann_on_total_steps(tiny_set, tmp_path):
    results = evaluate(eval_args("--model", "rcnn-r18-bundled", "--data", f"coco:{tiny_set}", "--limit", "2",
                                 "--timesteps", "2,8", "--methods", "qann,casc", "--dtype", "float64",
                                 "--threads", "1", "--out", str(tmp_path / "rcnn")))
    summary = results.summary
    casc = summary["casc"]["metrics"]
    assert casc["auto"]["map50_95"] == summary["qann"]["metrics"]["flat"]["map50_95"]
    assert casc["auto"]["steps_mean"] > 8  # both stages, wake + sleep each
    # T is the total of both stages (T/2 each); the per-stage split is kept
    assert results.schedule["stage_budgets"] == {"2": 1, "8": 4}
    assert casc["2"]["stage1_steps_mean"] == casc["2"]["stage2_steps_mean"] == 1 and casc["2"]["steps_mean"] == 2
    assert casc["8"]["steps_mean"] == casc["8"]["stage1_steps_mean"] + casc["8"]["stage2_steps_mean"] <= 8


@pytest.mark.parametrize("family", ["yolo", "rcnn"])
@pytest.mark.parametrize("method", METHODS)
def test_every_single_method_runs(tiny_set, tmp_path, capsys, family, method):
    model, steps = {"yolo": ("yolov8n-bundled", "1,2"), "rcnn": ("rcnn-r18-bundled", "2,4")}[family]
    results = evaluate(eval_args("--model", model, "--data", f"coco:{tiny_set}", "--limit", "1", "--methods", method,
                                 "--timesteps", steps, "--calibration-images", "2", "--threads", "1",
                                 "--out", str(tmp_path)))
    assert list(results.summary) == [method]
    assert "cost estimate: 1 image × (" in capsys.readouterr().out
    table = format_table(results.summary, results.schedule["timesteps"], family == "rcnn")
    assert all(f"T={t}" in table for t in steps.split(","))
    assert (tmp_path / "map_vs_t.png").is_file() and (tmp_path / "map_vs_latency.png").is_file()


def test_comparison_methods_binary_steps_and_energy_against_the_qann(tiny_set, tmp_path):
    """casc-paper is CASC at one spike per sleep step to the end of the L..L+4 sleep window; qcfs the same QANN
    with QCFS neurons; every spiking method reports binary-equivalent steps per T and, at its comparison T, its
    energy against the QANN, memory traffic and NeuroBench figures."""
    out = tmp_path / "cmp"
    results = evaluate(eval_args(*yolo_argv(tiny_set, out, "--methods", "qann,casc,casc-paper,qcfs",
                                            "--timesteps", "1,4,8,12", "--limit", "2")))
    summary = results.summary
    paper, qcfs, casc = summary["casc-paper"], summary["qcfs"], summary["casc"]
    assert paper["metrics"]["12"]["steps_mean"] == 12 and "auto" not in paper["metrics"]
    for method in (paper, qcfs):  # one spike per step: binary already
        assert all(method["metrics"][t]["steps_mean"] == int(t) == method["metrics"][t]["binary_steps_mean"]
                   for t in ("1", "4", "8", "12"))
    assert casc["metrics"]["auto"]["binary_steps_mean"] >= casc["metrics"]["auto"]["steps_mean"]
    for entry in (paper, qcfs, casc):
        assert entry["energy_ratio_vs_qann"] > 0 and entry["comparison_at"] in entry["metrics"]
        assert entry["energy_with_memory_ratio_vs_qann"] > 0
        assert entry["memory"]["membrane_reads"] > 0 and entry["memory"]["weight_reads_per_step"] > 0
        assert set(entry["neurobench"]) == {"activation_sparsity", "Dense", "Effective_MACs", "Effective_ACs"}
        assert 0 < entry["neurobench"]["activation_sparsity"] < 1
    # the same T, wake steps only: CASC and casc-paper are one network, so their energies agree
    assert paper["integer_energy_uj_at"]["4"] == pytest.approx(casc["integer_energy_uj_at"]["4"])
    assert_drawn(out / "energy_vs_qann.png")
    table = format_table(summary, [1, 4, 8, 12])
    assert "| CASC-PAPER |" in table and "| QCFS |" in table and "energy vs QANN (int8)" in table


def test_qcfs_on_onnxruntime_is_refused_clearly(tiny_set, tmp_path):
    with pytest.raises(ValueError, match="qcfs runs on the PyTorch engine only"):
        evaluate(eval_args(*yolo_argv(tiny_set, tmp_path, "--methods", "qann,qcfs", "--engine", "onnxruntime")))


def test_the_command_line_makes_the_config_python_makes():
    """casc eval's defaults are EvalConfig's, so eval.evaluate from Python runs what the command runs."""
    assert eval_args("--model", "m") == EvalConfig(model="m")
    assert eval_args("--model", "m", "--methods", "qann, casc", "--timesteps", "1-3,8", "--sleep", "5") == \
        EvalConfig(model="m", methods=("qann", "casc"), timesteps=(1, 2, 3, 8), sleep=5)
    with pytest.raises(ValueError, match="unknown"):
        EvalConfig(model="m", methods=("casc", "lif"))
    with pytest.raises(ValueError, match="sleep must be"):
        EvalConfig(model="m", sleep="5")


def test_demo_calls_evaluate_with_a_config_per_bundled_detector(monkeypatch, tmp_path, capsys):
    asked = []
    monkeypatch.setattr("eval.evaluate", lambda config: asked.append(config) or config.model)
    monkeypatch.setattr("eval.report_text", lambda report: f"table of {report}")
    assert casc(["demo", "--limit", "2", "--timesteps", "1-2", "--out", str(tmp_path)]) == 0
    assert asked == [EvalConfig(model=name, limit=2, timesteps=(1, 2), out=tmp_path / name)
                     for name in ("yolov8n-bundled", "rcnn-r18-bundled-sfpn")]
    out = capsys.readouterr().out
    assert "## yolov8n-bundled on the bundled benchmark (val, first 2 images)" in out
    assert "table of yolov8n-bundled" in out and "table of rcnn-r18-bundled-sfpn" in out


def test_table_keeps_every_requested_t():
    metrics = {"map50_95": 0.5, "map50": 0.7, "steps_mean": 6.0}
    summary = {"qann": {"metrics": {"flat": metrics}, "latency_ms": 20.0},
               "casc": {"metrics": {"1": metrics, "6": metrics, "24": metrics, "auto": metrics}, "latency_ms": 90.0,
                        "steps_to_99pct_qann": 6, "energy_ratio_at_99pct": 0.3}}
    head = format_table(summary, [1, 6, 24]).splitlines()[0]
    assert [c.strip() for c in head.split("|")[2:6]] == ["T=1", "T=6", "T=24", "T=auto"]
    assert "T≈6.0" in format_table(summary, [1, 6, 24])


def test_cost_estimate_counts_passes_and_prices_them():
    probe = {"forward_s": 0.02, "step_s": 0.05, "run_s": 0.0}
    args = eval_args()  # the defaults: sleep auto, burst = wake
    text = estimate_cost(probe, parse_methods("ann,qann,casc,if"), [1, 8, 64], 16, args, "yolo", wake=4)
    assert "16 images × (2 forwards + CASC ≈ 6 steps + IF 64 steps)" in text
    assert "about 57 s" in text  # 16 × (2 × 0.02 + 70 × 0.05) = 56.6
    with_setup = estimate_cost({**probe, "run_s": 0.1}, ["casc", "if"], [1, 64], 16, args, "yolo", wake=4)
    assert "about 59 s" in with_setup  # 16 × (70 × 0.05 + 2 runs × 0.1) = 59.2
    rcnn = estimate_cost(probe, ["casc"], [2, 8], 2, eval_args("--burst", "1"), "rcnn", wake=4)
    assert "CASC ≈ 48 steps" in rcnn  # two stages, one spike per sleep step: tens of sleep steps each
    both = estimate_cost(probe, ["casc-paper", "qcfs"], [1, 32], 1, args, "yolo", wake=4)
    assert "CASC-PAPER 12 steps + QCFS 32 steps" in both  # the paper's window ends at 2L + 4


def test_default_threads_leave_half_the_cores(monkeypatch):
    for cores, threads in ((1, 1), (2, 1), (16, 8), (None, 1)):
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        assert default_threads() == threads


def test_default_timesteps_and_stage_budgets():
    assert stage_budgets("yolo", [1, 3]) == {1: 1, 3: 3}
    assert stage_budgets("rcnn", [2, 8]) == {2: 1, 8: 4}
    with pytest.raises(ValueError, match="splits T evenly over its 2 spiking stages; give a multiple of 2"):
        stage_budgets("rcnn", [1, 4])
    for family in FAMILIES.values():
        stage_budgets(family.name, parse_timesteps(family.default_timesteps))  # the defaults fit their family


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit):
        casc(["eval", "--help"])
    text = capsys.readouterr().out
    assert "(default: ann,qann,casc,if)" in text and "(default: 1)" in text and "--methods" in text
    assert "(default: auto)" in text and "burst" in text
    with pytest.raises(SystemExit):
        casc(["--version"])
    assert capsys.readouterr().out.startswith("casc ")


def test_missing_device_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert casc(["eval", "--device", "cuda", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("casc eval: error: --device cuda: CUDA is not available") and "\n" not in err
    assert casc(["eval", "--device", "gpu0", "--limit", "1"]) == 2
    assert "not a device name" in capsys.readouterr().err


def test_bad_arguments_are_clear_errors(tiny_set, tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        evaluate(eval_args(*yolo_argv(tiny_set, tmp_path, "--methods", "casc,lif")))
    with pytest.raises(ValueError, match="must be a QANN"):
        evaluate(eval_args(*yolo_argv(tiny_set, tmp_path), "--model", "yolov8n-bundled-float"))
    with pytest.raises(FileNotFoundError):
        evaluate(eval_args(*yolo_argv(tiny_set, tmp_path), "--model", "no-such-model"))


def test_quickstart_python_blocks_run_as_written(capsys, tmp_path, monkeypatch):
    page = (Path(__file__).parents[1] / "docs" / "quickstart.md").read_text()
    monkeypatch.chdir(tmp_path)  # the page writes an image into the current folder
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:  # in order, one session, as the page says
        exec(compile(block, "docs/quickstart.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "YOLO found:" in out and "Faster R-CNN found:" in out and "in the image:" in out
    assert (tmp_path / "rcnn_boxes.jpg").stat().st_size > 0
    assert "4 levels at 256 px" in out  # the calibrated Faster R-CNN keeps its input size
