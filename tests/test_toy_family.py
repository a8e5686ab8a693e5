"""A third detector family takes one new package (``tests/toy_family``) and one ``FAMILIES`` entry: loaded from its
checkpoint path, converted, run, streamed and evaluated at many T through the shared code, into ``Results``."""

import numpy as np
import pytest
import torch
from toy_family import TOY, ToyDetector, save_toy

from detector.families import FAMILIES, family_of, get_family
from detector.neuron_kinds import NEURON_KINDS
from detector.weights import load_detector, resolve
from eval.config import parse_timesteps, stage_budgets


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", TOY)  # the one dict entry
    return save_toy(tmp_path / "toy.pt", seed=3)


def same_boxes(a, b) -> bool:
    return torch.equal(a.boxes.cls, b.boxes.cls) and torch.allclose(a.boxes.xyxy, b.boxes.xyxy) and \
        torch.allclose(a.boxes.conf, b.boxes.conf)


def test_load_convert_run_gives_results_that_are_the_qanns(toy):
    assert resolve(toy).family == "toy"  # the checkpoint's format names its family
    det = load_detector(toy, dtype=torch.float64)
    assert type(det) is ToyDetector and family_of(det) is TOY and det.levels == 4
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spiking, reference = det.predict(x, conf=0.0), det.qann_predict(x, conf=0.0)
    for s, r in zip(spiking, reference):  # settled, the spiking network's detections are the QANN's
        assert len(s) == 3 and same_boxes(s, r) and r.run is None
        assert s.settled and s.steps > 4 and s.spikes > 0 and s.energy_uj > 0 and s.to_dict()["steps"] == s.steps
    events = list(det.stream(x[:1], conf=0.0))
    assert events[-1].final and same_boxes(events[-1].detections, spiking[0])
    assert [e.t for e in events] == list(range(1, spiking[0].steps + 1))
    at, info = det.detections_at_steps(x, [1, 4, 64], conf=0.0)
    assert all(same_boxes(a, s) for a, s in zip(at[64], spiking)) and info["steps"] == [s.steps for s in spiking]
    assert [r.steps for r in at[1]] == [1, 1]
    image = (x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # an image input goes through the shared reader
    assert det.predict(image, color="rgb")[0].orig_shape == (12, 12)


def test_the_layers_above_work_from_the_entry(toy):
    assert stage_budgets("toy", parse_timesteps(TOY.default_timesteps)) == {1: 1, 2: 2, 4: 4, 8: 8}
    det = load_detector(toy)
    frames = [torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    video = list(det.predict_video(frames, conf=0.0))  # delta frames through the shared video session
    assert [r.keyframe for r in video] == [True, False, False] and video[1].steps < video[0].steps


def test_the_neuron_kind_is_looked_up_for_any_family(toy):
    """A rate-coded network (QCFS neurons on the toy QANN) runs wake = T with no sleep and has no delta frames."""
    qcfs = load_detector(toy, neuron="qcfs")
    assert qcfs.neuron_kind is NEURON_KINDS["qcfs"] and load_detector(toy).neuron_kind is NEURON_KINDS["cif"]
    at, info = qcfs.detections_at_steps(torch.rand(1, 3, 12, 12), [2, 5], conf=0.0)
    assert [at[t][0].steps for t in (2, 5)] == [2, 5] and info["steps"] == [5]
    with pytest.raises(ValueError, match="rate-coded network"):
        qcfs.video(delta=True)


def test_the_family_names_its_network_parts_for_the_firing_rate_plot(toy):
    assert get_family("toy").layer_part("blocks.0.act") == "network"
