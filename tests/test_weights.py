"""Weights manifest, sha256 checks and loading a detector by name or path."""

import json

import pytest
import torch

from detector.models.rcnn import build_fasterrcnn
from detector.models.yolo import SpikingYOLO, build_qann, export_checkpoint
from detector.weights import checkpoint_family, load_detector, load_manifest, resolve, sha256_of, verify_sha256


@pytest.fixture(scope="module")
def yolo_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny-yolo.pt"
    export_checkpoint(build_qann("yolov8n.yaml", levels=4, nc=3), path, names=["a", "b", "c"], imgsz=64)
    return path


def write_manifest(folder, entries):
    (folder / "manifest.json").write_text(json.dumps({"models": entries}))
    return folder / "manifest.json"


def test_manifest_entries_resolve_by_name_and_files_by_path(tmp_path, yolo_checkpoint):
    digest = sha256_of(yolo_checkpoint)
    manifest = load_manifest(write_manifest(tmp_path, [
        {"name": "tiny", "family": "yolo", "kind": "qann", "file": str(yolo_checkpoint), "sha256": digest,
         "levels": 4, "float_model": "tiny-float"}]))
    entry = resolve("tiny", manifest)
    assert entry.path == yolo_checkpoint and entry.info["levels"] == 4 and entry.float_model == "tiny-float"
    assert resolve(str(yolo_checkpoint), manifest).family == "yolo"
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        resolve("nope", manifest)


def test_bad_manifests_are_clear_errors(tmp_path):
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_manifest(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match="bad entry"):
        load_manifest(write_manifest(tmp_path, [{"name": "x", "family": "ssd", "kind": "qann", "file": "f", "sha256": "0"}]))
    assert load_manifest(tmp_path / "absent.json") == {}


def test_verify_sha256(tmp_path, yolo_checkpoint):
    verify_sha256(yolo_checkpoint, sha256_of(yolo_checkpoint))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        verify_sha256(yolo_checkpoint, "0" * 64)
    with pytest.raises(FileNotFoundError):
        verify_sha256(tmp_path / "missing.pt", None)


def test_family_detection_and_loading(tmp_path, yolo_checkpoint):
    detector = load_detector(yolo_checkpoint)
    assert isinstance(detector, SpikingYOLO) and detector.levels == 4 and detector.imgsz == 64
    rcnn_state = tmp_path / "rcnn.pth"
    torch.save(build_fasterrcnn("resnet18_fpn", num_classes=3, min_size=64, max_size=64).state_dict(), rcnn_state)
    assert checkpoint_family(rcnn_state) == "rcnn"
    assert checkpoint_family(yolo_checkpoint) == "yolo"


def test_the_demo_runs_bundled_qanns_of_both_families():
    from casc.cli import DEMO_RUNS

    manifest = load_manifest()
    families = set()
    for name, limit in DEMO_RUNS:
        entry = manifest[name]
        assert entry.kind == "qann" and entry.path.is_file() and limit > 0, name
        families.add(entry.family)
    assert families == {"yolo", "rcnn"}
