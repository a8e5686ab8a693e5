"""Delta sessions (video): a frame after the first keeps the previous frame's states and feeds only its change,
and its readouts still equal the QANN's outputs on that frame (float64), in a couple of steps.

Random QANNs of every block type (conv, residual, split/concat, up/down, SPPF max-pool, avg-pool; BN, signed
quantizers), L in {2, 4, 8}, both execution modes, burst 1 and L, over sequences with a local change, noise
everywhere and a return to an earlier frame. The ablation (biases left on in the delta step) must fail.
"""

import threading

import pytest
import torch

from detector import RunCancelled, convert
from detector.export import OrtSpikingNetwork, export_steps
from detector.randnet import random_qann
from detector.runtime import TorchStepEngine


def frames(seed: int, n: int = 5, size: int = 12) -> list[torch.Tensor]:
    """A scene with a small square moving over it, then noise everywhere, then the first frame again."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.rand(2, 3, size, size, generator=g, dtype=torch.float64) * 2
    seq = []
    for i in range(n - 2):
        f = scene.clone()
        f[:, :, 2:5, 2 + 2 * i:5 + 2 * i] = 1.7  # the moving object (a local change)
        seq.append(f)
    seq.append(seq[-1] + 0.05 * torch.randn(seq[-1].shape, generator=g, dtype=torch.float64))  # sensor noise
    seq.append(seq[0].clone())  # back to an earlier frame
    return seq


def max_error(readout, reference) -> float:
    return max(float((a - b).detach().abs().max()) for a, b in zip(readout, reference))


CASES = [(L, burst, mode) for L in (2, 4, 8) for burst in ("1", "L") for mode in ("step", "multistep")]


@pytest.mark.parametrize("L,burst,mode", CASES)
def test_every_frame_of_a_delta_session_equals_the_qann(L, burst, mode):
    for index in range(6):
        seed = 700 + 37 * L + index
        qann = random_qann(seed, levels=L, depth=3 + 3 * index, signed=0.3 if index % 2 else 0.0).double()
        snn = convert(qann)
        session = snn.session(burst=1 if burst == "1" else L, mode=mode, max_sleep=400)
        for i, frame in enumerate(frames(seed)):
            res = session.run(frame)
            assert res.keyframe == (i == 0)
            assert max_error(res.readout, qann(frame)) <= 1e-9, f"net {seed} L={L} burst={burst} {mode} frame {i}"
            assert bool(res.settled.all()), "a delta frame ended at max_sleep, not at a silent step"


def test_a_changed_frame_takes_two_steps_at_burst_L_and_fewer_spikes():
    qann = random_qann(4242, levels=4, depth=12).double()
    snn = convert(qann)
    session = snn.session()
    seq = frames(4242)
    first = session.run(seq[0])
    second = session.run(seq[1])
    assert int(first.steps.max()) >= 5 and not second.keyframe
    assert second.steps.tolist() == [2, 2]  # the delta step and the silent one that confirms the fixed point
    assert bool((second.stats.spikes < first.stats.spikes).all())
    assert second.stats.wake == 0 and first.stats.wake == 4
    same = session.run(seq[1].clone())  # nothing changed: the delta step is silent, the frame is settled at once
    assert same.steps.tolist() == [1, 1] and float(same.stats.spikes.sum()) == 0
    assert max_error(same.readout, second.readout) == 0


def test_biases_left_on_in_the_delta_step_break_it():
    """The ablation: a delta step run as a wake step (biases on) adds every bias once more per frame."""

    class BiasOnDelta(TorchStepEngine):
        def step(self, x, sleeping, wake_counts, burst):
            super().step(x, sleeping and x is None, wake_counts, burst)
            return self.net.sim.activity.cpu()  # the delta step's activity, as a sleep step reports it

    qann = random_qann(99, levels=4, depth=8).double()
    snn = convert(qann)
    ablated = snn.session()
    ablated.engine = BiasOnDelta(snn)
    seq = frames(99)
    errors = [max_error(ablated.run(f).readout, qann(f)) for f in seq]
    assert errors[0] <= 1e-9 and max(errors[1:]) > 1e-3


def test_a_plain_run_between_frames_does_not_corrupt_the_session():
    qann = random_qann(5, levels=4, depth=10).double()
    snn = convert(qann)
    session = snn.session()
    seq = frames(5)
    session.run(seq[0])
    snn.run(torch.rand(1, 3, 20, 20, dtype=torch.float64))  # someone else's run, another size
    res = session.run(seq[1])
    assert not res.keyframe and max_error(res.readout, qann(seq[1])) <= 1e-9
    other = snn.session()  # a second session on the same network interleaved with the first
    other.run(seq[3])
    assert max_error(session.run(seq[2]).readout, qann(seq[2])) <= 1e-9
    assert max_error(other.run(seq[4]).readout, qann(seq[4])) <= 1e-9


def test_keyframes_shape_changes_reset_and_cancelled_frames():
    qann = random_qann(6, levels=4, depth=6).double()
    snn = convert(qann)
    session = snn.session(keyframe_every=3)
    seq = frames(6, n=7)
    assert [session.run(f).keyframe for f in seq] == [True, False, False, True, False, False, True]
    small = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    res = session.run(small)
    assert res.keyframe and max_error(res.readout, qann(small)) <= 1e-9
    assert session.run(seq[0][:1]).keyframe  # another batch size
    session.reset()
    assert session.run(seq[0][:1]).keyframe
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RunCancelled):
        session.run(seq[1][:1], cancel=cancel)
    res = session.run(seq[1][:1])
    assert res.keyframe and max_error(res.readout, qann(seq[1][:1])) <= 1e-9  # a cancelled frame resets
    with pytest.raises(ValueError, match="float64"):
        session.run(seq[2][:1].float())
    assert not session.run(seq[2][:1]).keyframe  # a refused input leaves the session as it was
    with pytest.raises(ValueError, match="keyframe_every"):
        snn.session(keyframe_every=0)


def test_stream_of_a_delta_frame_ends_with_its_result():
    qann = random_qann(8, levels=4, depth=6).double()
    snn = convert(qann)
    session = snn.session()
    seq = frames(8)
    events = list(session.stream(seq[0]))
    assert [e.phase for e in events[:4]] == ["wake"] * 4 and events[-1].result.keyframe
    events = list(session.stream(seq[1]))
    assert events[0].phase == "delta" and all(e.phase == "sleep" for e in events[1:])
    assert [e.t for e in events] == list(range(1, len(events) + 1))
    assert events[-1].result is not None and max_error(events[-1].readout, qann(seq[1])) <= 1e-9
    assert float(sum(e.spikes.sum() for e in events)) == float(events[-1].result.stats.spikes.sum())


def test_onnx_runtime_sessions_step_like_the_pytorch_ones(tmp_path):
    """The same schedule on the exported graphs: the delta step is the sleep graph fed the frame's change. float32
    both sides; each frame's readouts agree within float noise and its steps are the same."""
    snn = convert(random_qann(11, levels=4, depth=8))
    seq = [f.float() for f in frames(11)]
    engine = OrtSpikingNetwork(tmp_path, export_steps(snn, seq[0], tmp_path, "snn"), threads=1)
    eager, onnx = snn.session(), engine.session()
    for i, frame in enumerate(seq):
        expected, got = eager.run(frame), onnx.run(frame)
        assert expected.keyframe == (i == 0) and got.keyframe == (i in (0, 3))
        assert max_error(got.readout, expected.readout) <= 1e-4
        if not got.keyframe:
            assert torch.equal(got.steps, expected.steps)
        if i == 2:  # another run on the engine in between: its states are gone, so the next frame is a keyframe
            engine.run(seq[0])
    assert onnx.run(seq[0]).keyframe is False
    with pytest.raises(ValueError, match="exported batch"):
        engine.session().run(torch.cat([seq[0]] * 2))


# --- the detectors: predict_video on the bundled video split's frames --------------------------------------------


@pytest.fixture(scope="module")
def moving_frames():
    from detector.data.video import render_sequence

    return [img[..., ::-1].copy() for img, *_ in render_sequence(1, "static", 4)]  # BGR, as OpenCV decodes


@pytest.mark.parametrize("model", ["yolov8n-bundled", "rcnn-r18-bundled-sfpn"])
def test_predict_video_by_delta_equals_the_qann_in_float64(model, moving_frames):
    """Every frame's detections are the QANN's (float64); later frames are delta frames that cost fewer steps and
    spikes than a fresh run (Faster R-CNN: stage 1 by delta, stage 2 fresh on each frame's RoIs)."""
    from detector.weights import load_detector

    det = load_detector(model, dtype=torch.float64)
    delta = list(det.predict_video(moving_frames))
    fresh = list(det.predict_video(iter(moving_frames), delta=False))
    reference = det.qann_predict(moving_frames)
    assert [r.keyframe for r in delta] == [True, False, False, False] and all(r.keyframe for r in fresh)
    for got, want in zip(delta, reference):
        assert torch.equal(got.boxes.cls, want.boxes.cls) and torch.allclose(got.boxes.xyxy, want.boxes.xyxy)
        assert torch.allclose(got.boxes.conf, want.boxes.conf, atol=1e-9) and got.settled
    for d, f in zip(delta[1:], fresh[1:]):
        first_stage = (d.stage_steps or {"stage1": d.steps})["stage1"], (f.stage_steps or {"stage1": f.steps})["stage1"]
        assert first_stage[0] < first_stage[1] and d.spikes < f.spikes and d.energy_uj < f.energy_uj
    if model.startswith("yolo"):  # the readouts themselves, not only the decoded boxes
        session = det.snn.session()
        for frame in moving_frames:
            x, _ = det.preprocess([frame])
            assert max_error(session.run(x).readout, det.qann_raw(x)) <= 1e-9


def test_predict_video_refusals(moving_frames, tmp_path):
    from detector.weights import load_detector

    det = load_detector("yolov8n-bundled")
    with pytest.raises(ValueError, match="not a video file"):
        next(det.predict_video(str(tmp_path / "frames.txt")))
    with pytest.raises(FileNotFoundError, match="no video file"):
        next(det.predict_video(str(tmp_path / "missing.mp4")))
    with pytest.raises(TypeError, match="video source"):
        next(det.predict_video(3))
    with pytest.raises(ValueError, match="keyframe_every"):
        next(det.predict_video(moving_frames, keyframe_every=0))
