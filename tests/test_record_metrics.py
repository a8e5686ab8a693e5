"""weights/record_metrics.py: manifest metrics come from casc eval results, with the command."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("record_metrics", ROOT / "weights" / "record_metrics.py")
record_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record_metrics)


def _curve(values):
    return {str(t): {"map50_95": v, "map50": v + 0.1, "steps_mean": float(t)} for t, v in values.items()}


def test_metrics_land_on_the_qann_and_float_entries(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": [{"name": "q", "metrics": {}}, {"name": "f", "metrics": {"old": 1}}]}))
    casc = _curve({1: 0.0, 4: 0.3, 5: 0.5, 6: 0.6})
    casc["auto"] = {"map50_95": 0.6, "map50": 0.7, "steps_mean": 6.0}
    results = {"command": "casc eval --model q", "model": {"name": "q"}, "float_model": {"name": "f"},
               "data": {"spec": "bundled", "split": "val", "images": 10}, "schedule": {"wake": 4},
               "summary": {"ann": {"metrics": {"flat": {"map50_95": 0.62, "map50": 0.8}}},
                           "qann": {"metrics": {"flat": {"map50_95": 0.6, "map50": 0.7}}},
                           "casc": {"metrics": casc, "steps_to_99pct_qann": 6}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    record_metrics.record([path], manifest)
    entries = {e["name"]: e["metrics"] for e in json.loads(manifest.read_text())["models"]}
    assert entries["q"]["qann"] == {"map50_95": 0.6, "map50": 0.7}
    assert entries["q"]["casc_auto"]["steps_mean"] == 6.0 and entries["q"]["casc_steps_to_99pct_qann"] == 6
    assert entries["q"]["casc_steps_to_95pct_float"] == 6  # 0.95 * 0.62 = 0.589: first reached at T = 6
    assert entries["q"]["command"] == "casc eval --model q" and entries["q"]["images"] == 10
    assert entries["f"] == {"old": 1, "data": "bundled", "split": "val", "images": 10, "command": "casc eval --model q",
                            "ann": {"map50_95": 0.62, "map50": 0.8}}


def _train_bundled():
    spec = importlib.util.spec_from_file_location("train_bundled", ROOT / "weights" / "train_bundled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_bundled_model_states_its_training_budget():
    """"Percent of float" is only fair read against what each model's training had."""
    train_bundled = _train_bundled()
    models = json.loads((ROOT / "weights" / "manifest.json").read_text())["models"]
    for entry in models:
        train_bundled.check_budget(entry["training_budget"])
    budgets = {entry["name"]: entry["training_budget"] for entry in models}
    for entry in models:
        if entry["kind"] == "qann":
            assert budgets[entry["name"]]["from"].startswith((entry["float_model"], "rcnn-r18-bundled")), entry["name"]


def test_a_budget_comes_from_its_command_line_and_must_say_enough():
    train_bundled = _train_bundled()
    step = ["train", "rcnn", "--batch", "16", "--device", "cuda", "--epochs", "14", "--max-minutes", "4.3"]
    assert train_bundled.budget_of(step, "random init") == {"device": "cuda", "from": "random init", "epochs": 14,
                                                            "batch": 16, "max_minutes": 4.3}
    assert train_bundled.budget_of(["--epochs", "3", "--batch", "8", "--time", "0.5"], "x")["max_minutes"] == 30
    with pytest.raises(ValueError, match="epochs or iterations"):
        train_bundled.check_budget({"device": "cpu", "from": "x", "batch": 4})


def test_bundle_writes_a_float_or_a_qann_entry_from_the_checkpoint_itself(tmp_path):
    """The kind, levels and float model of a bundled entry come from the checkpoint (a float model has no
    quantizers); a bundled name keeps its place in the manifest."""
    train_bundled = _train_bundled()
    weights = ROOT / "weights"
    (tmp_path / "manifest.json").write_text((weights / "manifest.json").read_text())
    budget = {"device": "CPU, 1 thread", "from": "x", "batch": 4, "epochs": 1}
    float_entry = train_bundled.bundle("yolov8n-bundled-float", weights / "yolov8n-bundled-float.pt", "casc train a",
                                       budget, tmp_path)
    qann_entry = train_bundled.bundle("yolov8n-bundled", weights / "yolov8n-bundled.pt", "casc train b", budget, tmp_path)
    assert float_entry["kind"] == "float" and float_entry["levels"] is None and float_entry["float_model"] is None
    assert "rounding" not in float_entry and float_entry["training_budget"] == budget
    assert qann_entry["kind"] == "qann" and qann_entry["levels"] == 4 and qann_entry["site_levels"] == [4]
    assert qann_entry["rounding"] == ["round"] and qann_entry["float_model"] == "yolov8n-bundled-float"
    names = [m["name"] for m in json.loads((tmp_path / "manifest.json").read_text())["models"]]
    assert names == [m["name"] for m in json.loads((weights / "manifest.json").read_text())["models"]]
    assert (tmp_path / "yolov8n-bundled.pt").is_file() and qann_entry["metrics"] == {}
