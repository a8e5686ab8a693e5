"""Families are looked up, not string-tested: one plain dict, adapters imported only when used."""

import subprocess
import sys

import pytest

from detector.families import FAMILIES, family_of, get_family


def test_each_family_names_its_adapter_stages_and_trainer():
    for family in FAMILIES.values():
        detector_type = family.detector_type()
        assert detector_type.__name__ == family.detector_class
        assert all(hasattr(detector_type, m) for m in ("from_checkpoint", "export_networks", "fit_box", "input_size"))
        assert family.stages and family.steps_per_stage(2 * len(family.stages)) == 2
        __import__(family.trainer)
    assert get_family("rcnn").stages == ("stage1", "stage2") and get_family("yolo").sized
    with pytest.raises(ValueError, match="unknown detector family 'ssd'; known: yolo, rcnn"):
        get_family("ssd")
    with pytest.raises(ValueError, match="give a multiple of 2"):
        get_family("rcnn").steps_per_stage(5)


def test_a_loaded_detector_knows_its_family_whatever_its_engine():
    from detector.weights import load_detector

    det = load_detector("yolov8n-bundled")
    assert family_of(det) is FAMILIES["yolo"]
    with pytest.raises(ValueError, match="not the detector of any known family"):
        family_of(object())


def test_importing_the_registry_imports_no_adapter():
    code = "import sys, detector.families; print(any(m.startswith('detector.models') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_quantize_is_the_familys_and_refuses_what_the_family_does_not_take(tmp_path):
    """casc quantize has no family test: each adapter's quantize_checkpoint is looked up; options of another family
    are refused by name before the adapter runs, and a family without a quantizer says so."""
    from toy_family import TOY

    from detector.weights import resolve

    yolo, rcnn = get_family("yolo"), get_family("rcnn")
    entry = resolve("yolov8n-bundled-float")
    assert yolo.foreign_quantize_options({"spiking_fpn": True, "min_size": 256, "theta": "mse", "max_size": None}) \
        == ["min_size", "spiking_fpn"]
    assert rcnn.foreign_quantize_options({"spiking_fpn": True, "min_size": 256, "rounding": "round"}) == []
    with pytest.raises(ValueError, match="spiking_fpn: not an option for a yolo model"):
        yolo.quantize(entry.path, entry.sha256, [], tmp_path / "q.pt", 4, 2, spiking_fpn=True)
    with pytest.raises(ValueError, match="the toy family has no quantizer"):
        TOY.quantize(entry.path, entry.sha256, [], tmp_path / "q.pt", 4, 2)
    assert not (tmp_path / "q.pt").exists()
