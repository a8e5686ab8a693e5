"""The service's runtime behaviour in-process (starlette TestClient) with a fake, controllable backend:
micro-batching, queue full (503 + Retry-After), timeout (504), draining on shutdown, latest-frame-wins."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from service.app import create_app  # noqa: E402
from service.backends import Backend, Params  # noqa: E402
from service.config import Settings  # noqa: E402
from service.worker import Job, ModelWorker, QueueFull  # noqa: E402


class FakeModel:
    levels = 4


class FakeBackend(Backend):
    """Records every predict call's batch size; takes ``delay`` seconds per call."""

    family = "yolo"

    def __init__(self, name="fake", delay=0.0):
        super().__init__(name, FakeModel(), source="fake")
        self.delay, self.calls, self.lock = delay, [], threading.Lock()

    def class_names(self):
        return ["a", "b"]

    def _result(self, image, p: Params) -> dict:
        h, w = image.shape[:2]
        return {"detections": [{"box": [0.0, 0.0, float(w), float(h)], "score": 0.9, "class_id": 1, "name": "b"}],
                "steps": (p.wake or 4) + 2, "wake": p.wake or 4, "spikes": 10.0, "energy_uj": 0.01, "settled": True}

    def predict(self, images, p):
        with self.lock:
            self.calls.append(len(images))
        time.sleep(self.delay)
        return [self._result(im, p) for im in images]

    def stream(self, image, p):
        for t in range(1, 4):
            time.sleep(self.delay / 3)
            yield {"type": "step", "stage": 1, "t": t, "phase": "wake", "wake": t, "spikes": 1.0,
                   "cumulative_spikes": float(t), "settled": False, "detections": []}
        yield {"type": "final", **self._result(image, p)}


def png(w=32, h=24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def app_with(backend, **settings):
    return create_app(Settings(**settings), {backend.name: backend})


def post_many(client, n, params=None, results=None):
    results = results if results is not None else [None] * n

    def one(i):
        results[i] = client.post("/v1/detect", content=png(), headers={"content-type": "image/png"},
                                 params=(params[i] if isinstance(params, list) else params) or {})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_micro_batching_one_predict_call():
    backend = FakeBackend(delay=0.05)
    with TestClient(app_with(backend, batch_window_ms=300, max_batch=8)) as client:
        backend.calls.clear()  # the warm-up call
        responses = post_many(client, 4)
        assert [r.status_code for r in responses] == [200] * 4
        assert backend.calls == [4]  # four requests, ONE predict call on a list of four images
        assert {r.json()["timings"]["batch_size"] for r in responses} == {4}
        # different settings are never mixed in one call
        backend.calls.clear()
        responses = post_many(client, 4, params=[{"conf": 0.1}, {"conf": 0.2}, {"conf": 0.1}, {"conf": 0.2}])
        assert [r.status_code for r in responses] == [200] * 4
        assert sorted(backend.calls) == [2, 2]
        assert sorted(r.json()["steps"] for r in responses) == [6] * 4


def test_max_batch_one_disables_batching():
    backend = FakeBackend(delay=0.02)
    with TestClient(app_with(backend, batch_window_ms=100, max_batch=1)) as client:
        backend.calls.clear()
        assert [r.status_code for r in post_many(client, 3)] == [200] * 3
        assert backend.calls == [1, 1, 1]


def test_queue_full_503_retry_after():
    backend = FakeBackend(delay=0.4)
    with TestClient(app_with(backend, queue_size=1, max_batch=1, batch_window_ms=0)) as client:
        responses = post_many(client, 5)
        codes = sorted(r.status_code for r in responses)
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"] == "queue_full"
        assert client.get("/healthz").status_code == 200
        assert 'casc_rejected_total{model="fake",reason="queue_full"}' in client.get("/metrics").text


def test_timeout_504():
    backend = FakeBackend(delay=0.0)
    with TestClient(app_with(backend, timeout_s=0.3)) as client:
        backend.delay = 1.0
        start = time.monotonic()
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png"})
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        assert time.monotonic() - start < 0.9
        r = client.post("/v1/detect/stream", content=png(), headers={"content-type": "image/png"})
        assert r.status_code in (200, 504)  # 504 before the first event, else an error line ends the stream
        if r.status_code == 200:
            assert '"type": "error"' in r.text.splitlines()[-1]
        backend.delay = 0.0
        time.sleep(1.2)
        assert client.post("/v1/detect", content=png(), headers={"content-type": "image/png"}).status_code == 200


def test_worker_drains_on_stop():
    backend = FakeBackend(delay=0.05)
    worker = ModelWorker(backend, queue_size=8, batch_window_ms=0, max_batch=1)
    worker.start()
    image = np.zeros((8, 8, 3), np.uint8)
    jobs = [worker.submit(Job("predict", image, Params())) for _ in range(4)]
    worker.stop(timeout=10)
    assert all(j.future.done() and j.future.result()["steps"] == 6 for j in jobs)  # finished, not dropped
    assert not worker.thread.is_alive()
    with pytest.raises(QueueFull):
        worker.submit(Job("predict", image, Params()))


def test_websocket_latest_frame_wins():
    backend = FakeBackend(delay=0.0)
    with TestClient(app_with(backend)) as client:
        backend.delay = 0.4
        with client.websocket_connect("/v1/stream?conf=0.5") as ws:
            for _ in range(5):
                ws.send_bytes(png())
            answers = [ws.receive_json()]
            while answers[-1]["frame"] != 4:
                answers.append(ws.receive_json())
            # frame 0 started at once; 1-3 were replaced by newer frames while it ran; 4 (the newest) answered
            assert [a["frame"] for a in answers] == [0, 4] and answers[-1]["dropped"] == 3
            assert answers[-1]["detections"][0]["box"] == [0.0, 0.0, 32.0, 24.0]
            ws.send_text("hello")
            assert ws.receive_json()["error"] == "bad_message"
        assert "casc_ws_dropped_frames_total 3" in client.get("/metrics").text


def test_validation_error_shape_and_openapi():
    backend = FakeBackend()
    with TestClient(app_with(backend)) as client:
        r = client.post("/v1/detect?wake=abc", content=png(), headers={"content-type": "image/png"})
        assert r.status_code == 422 and set(r.json()) == {"error", "detail"} and "wake" in r.json()["detail"]
        schema = client.get("/openapi.json").json()
        body = schema["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "image/jpeg", "image/png", "image/webp", "image/bmp"} <= set(body)
        ok = schema["paths"]["/v1/detect"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["$ref"].endswith("/DetectResponse")
        assert schema["paths"]["/v1/detect"]["post"]["responses"]["503"]


def test_rcnn_backend_detect_and_stream():
    """The Faster R-CNN family through the same endpoints (tiny random r18 QANN, in-process)."""
    import json

    import torch

    from detector.models.rcnn import SpikingFasterRCNN, build_qann_fasterrcnn
    from detector.randnet import randomise_batchnorm
    from service.backends import RCNNBackend

    torch.manual_seed(0)
    qann = build_qann_fasterrcnn("resnet18_fpn", num_classes=4, levels=4, min_size=64, max_size=96,
                                 representation_size=64, rpn_pre_nms_top_n_test=40, rpn_post_nms_top_n_test=12)
    randomise_batchnorm(qann, 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cls = qann.roi_heads.box_predictor.cls_score
        cls.bias.copy_(torch.randn(cls.bias.shape, generator=g) * 3)
    model = SpikingFasterRCNN.from_model(qann.eval(), classes=["x", "y", "z"])
    backend = RCNNBackend("r18", model, source="test")
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    with TestClient(create_app(Settings(), {"r18": backend})) as client:
        info = client.get("/v1/models").json()["models"][0]
        assert info["family"] == "rcnn" and info["classes"] == ["x", "y", "z"] and info["levels"] == 4
        detect = client.post("/v1/detect", content=data, headers={"content-type": "image/png"},
                             params={"conf": 0.05}).json()
        assert detect["image"] == {"width": 90, "height": 60} and detect["steps"] > 8
        for d in detect["detections"]:
            assert d["name"] == ["x", "y", "z"][d["class_id"]] and 0 <= d["box"][0] <= d["box"][2] <= 90
        r = client.post("/v1/detect/stream", content=data, headers={"content-type": "image/png"},
                        params={"conf": 0.05})
        events = [json.loads(x) for x in r.text.splitlines()]
        assert events[-1]["type"] == "final" and {e["stage"] for e in events[:-1]} == {1, 2}
        assert [e["t"] for e in events[:-1]] == list(range(1, len(events)))
        strip = lambda a: {k: v for k, v in a.items() if k not in ("timings", "type")}  # noqa: E731
        assert strip(events[-1]) == strip(detect)
