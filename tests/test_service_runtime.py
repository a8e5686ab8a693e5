"""The service's runtime behaviour in-process (starlette TestClient) with a fake, controllable backend:
micro-batching, queue full (503 + Retry-After), timeout (504) that stops the work, one bad request failing
alone, cost and parameter bounds, memory bounds (decoding to the model's input size, bytes in flight),
WebSocket limits and Origin checks, offline docs, model digests."""

from __future__ import annotations

import json
import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from detector.runtime import RunCancelled  # noqa: E402
from service.app import create_app  # noqa: E402
from service.backends import Backend, Params  # noqa: E402
from service.config import MAX_FRAME_STRIDE, Settings  # noqa: E402
from service.worker import AllCancelled, Job, ModelWorker, QueueFull  # noqa: E402

FAIL_WIDTH = 13  # the fake model fails on images of this width


class FakeModel:
    levels = 4
    architecture = "fake"

    def input_size(self, size):
        return size


class FakeBackend(Backend):
    """Records every predict call's batch size, images and params; takes ``delay`` seconds per call in
    ``steps`` time steps, checking the cancel flag between them as the runtime does; fails on images
    ``FAIL_WIDTH`` pixels wide; resizes into ``fit_box`` when given."""

    family = "rcnn"  # no fixed input size: images keep theirs unless fit_box says otherwise

    def __init__(self, name="fake", delay=0.0, steps=10, fit_box=None):
        super().__init__(name, FakeModel(), sha256="ab" * 32, verified=True)
        self.delay, self.steps, self.fit_box = delay, steps, fit_box
        self.calls, self.shapes, self.params, self.cancelled_runs = [], [], [], 0
        self.lock = threading.Lock()

    def class_names(self):
        return ["a", "b"]

    def fit(self, size):
        return self.fit_box or size

    def _result(self, image, p: Params) -> dict:
        h, w = image.shape[:2]
        return {"detections": [{"box": [0.0, 0.0, float(w), float(h)], "score": 0.9, "class_id": 1, "name": "b"}],
                "steps": (p.wake or 4) + 2, "wake": p.wake or 4, "spikes": 10.0, "energy_uj": 0.01, "settled": True}

    def _run(self, cancel):
        for _ in range(self.steps):
            if cancel is not None and cancel.is_set():
                self.cancelled_runs += 1
                raise RunCancelled("cancelled")
            time.sleep(self.delay / self.steps)

    def predict(self, images, p, cancel=None):
        with self.lock:
            self.calls.append(len(images))
            self.shapes.extend(im.shape for im in images)
            self.params.append(p)
        self._run(cancel)
        if any(im.shape[1] == FAIL_WIDTH for im in images):
            raise RuntimeError("Input and output sizes should be greater than 0 (secret /srv/internal/path)")
        return [self._result(im, p) for im in images]

    def video(self, p, delta=True, keyframe_every=None):
        return {"frames": 0, "delta": delta}  # the connection's own state: a frame count

    def frame(self, video, image, p, cancel=None):
        (result,) = self.predict([image], p, cancel)
        video["frames"] += 1
        return {**result, "keyframe": video["frames"] == 1 or not video["delta"]}

    def stream(self, image, p, cancel=None):
        for t in range(1, 4):
            self._run(cancel)
            yield {"type": "step", "stage": 1, "t": t, "phase": "wake", "wake": t, "spikes": 1.0,
                   "cumulative_spikes": float(t), "settled": False, "detections": []}
        yield {"type": "final", **self._result(image, p)}


def png(w=32, h=24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(w, h, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG",
                                                                                                **kwargs)
    return buf.getvalue()


def app_with(backend, **settings):
    return create_app(Settings(**settings), {backend.name: backend})


def post_many(client, n, params=None, results=None, bodies=None):
    results = results if results is not None else [None] * n

    def one(i):
        results[i] = client.post("/v1/detect", content=bodies[i] if bodies else png(),
                                 headers={"content-type": "image/png"},
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
            assert [a["keyframe"] for a in answers] == [True, False]  # the connection's own video state
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
    from service.backends import Backend

    torch.manual_seed(0)
    qann = build_qann_fasterrcnn("resnet18_fpn", num_classes=4, levels=4, min_size=64, max_size=96,
                                 representation_size=64, rpn_pre_nms_top_n_test=40, rpn_post_nms_top_n_test=12)
    randomise_batchnorm(qann, 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cls = qann.roi_heads.box_predictor.cls_score
        cls.bias.copy_(torch.randn(cls.bias.shape, generator=g) * 3)
    model = SpikingFasterRCNN.from_model(qann.eval(), classes=["x", "y", "z"])
    backend = Backend("r18", model, sha256="cd" * 32)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    with TestClient(create_app(Settings(), {"r18": backend})) as client:
        info = client.get("/v1/models").json()["models"][0]
        assert info["family"] == "rcnn" and info["classes"] == ["x", "y", "z"] and info["levels"] == 4
        strip_png = io.BytesIO()
        Image.fromarray(np.zeros((1, 2000, 3), np.uint8)).save(strip_png, format="PNG")
        r = client.post("/v1/detect", content=strip_png.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 422 and r.json()["error"] == "bad_image_shape"  # refused before it joins a batch
        detect = client.post("/v1/detect", content=data, headers={"content-type": "image/png"},
                             params={"conf": 0.05}).json()
        assert detect["image"] == {"width": 90, "height": 60} and detect["steps"] > 8
        assert detect["settled"] is True and detect["burst"] is None and detect["max_sleep"] == 32
        for d in detect["detections"]:
            assert d["name"] == ["x", "y", "z"][d["class_id"]] and 0 <= d["box"][0] <= d["box"][2] <= 90
        r = client.post("/v1/detect/stream", content=data, headers={"content-type": "image/png"},
                        params={"conf": 0.05})
        events = [json.loads(x) for x in r.text.splitlines()]
        assert events[-1]["type"] == "final" and {e["stage"] for e in events[:-1]} == {1, 2}
        assert [e["t"] for e in events[:-1]] == list(range(1, len(events)))
        strip = lambda a: {k: v for k, v in a.items() if k not in ("timings", "type")}  # noqa: E731
        assert strip(events[-1]) == strip(detect)


# --- isolation: one bad request fails alone, and never with the exception text ------------------------------

def test_a_failing_member_fails_alone_without_exception_text():
    backend = FakeBackend(delay=0.05)
    with TestClient(app_with(backend, batch_window_ms=300, max_batch=8)) as client:
        backend.calls.clear()
        bodies = [png(), png(), png(w=FAIL_WIDTH), png(), png()]
        responses = post_many(client, 5, bodies=bodies)
        codes = [r.status_code for r in responses]
        assert codes == [200, 200, 500, 200, 200], codes
        bad = responses[2].json()
        assert bad["error"] == "inference_failed" and "secret" not in responses[2].text
        assert "RuntimeError" not in responses[2].text
        assert backend.calls[0] == 5 and sorted(backend.calls[1:]) == [1] * 5  # batched, then one by one
        assert client.get("/healthz").status_code == 200


def test_unhandled_errors_say_nothing_of_the_exception():
    backend = FakeBackend()
    backend.stream = lambda image, p, cancel=None: iter(())  # a broken model: no event at all
    with TestClient(app_with(backend)) as client:
        r = client.post("/v1/detect", content=png(w=FAIL_WIDTH), headers={"content-type": "image/png"})
        assert r.status_code == 500 and "secret" not in r.text and set(r.json()) == {"error", "detail"}


# --- cost bounds and timeouts -----------------------------------------------------------------------------

def test_timeout_stops_the_work_within_a_step():
    backend = FakeBackend(delay=0.0)
    with TestClient(app_with(backend, timeout_s=0.3, max_batch=1)) as client:
        backend.delay, backend.steps = 5.0, 100  # one request would hold the worker 5 s
        start = time.monotonic()
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png"})
        assert r.status_code == 504
        backend.delay = 0.0
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and time.monotonic() - start < 1.5  # the worker was free again at once
        assert backend.cancelled_runs == 1


def test_batch_is_cancelled_only_when_all_members_are():
    jobs = [Job("predict", None, Params()) for _ in range(3)]
    flag = AllCancelled(jobs)
    jobs[0].cancelled.set()
    jobs[1].cancelled.set()
    assert not flag.is_set()
    jobs[2].cancelled.set()
    assert flag.is_set()


@pytest.mark.parametrize("query,fragment", [
    ({"wake": 17}, "wake"), ({"sleep": 33}, "sleep"), ({"max_sleep": 33}, "max_sleep"), ({"burst": 5}, "burst"),
    ({"burst": 0}, "burst"), ({"bogus": 1}, "unknown query"), ({"Wake": 2}, "unknown query")])
def test_cost_bounds_and_unknown_parameters_422(query, fragment):
    backend = FakeBackend()
    with TestClient(app_with(backend)) as client:  # L = 4: wake <= 16; --max-sleep 32
        for endpoint in ("/v1/detect", "/v1/detect/stream"):
            r = client.post(endpoint, content=png(), headers={"content-type": "image/png"}, params=query)
            assert r.status_code == 422 and r.json()["error"] == "invalid_parameter", r.text
            assert fragment in r.json()["detail"]
        r = client.post("/v1/detect", files={"file": ("x.png", png(), "image/png")}, data={"bogus": "1"})
        assert r.status_code == 422 and "unknown form" in r.json()["detail"]


def test_burst_and_max_sleep_reach_the_model():
    backend = FakeBackend()
    with TestClient(app_with(backend, max_sleep=20)) as client:
        backend.params.clear()
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png"},
                        params={"burst": 1, "max_sleep": 12, "wake": 16})
        assert r.status_code == 200 and r.json()["settled"] is True
        assert r.json()["burst"] == 1 and r.json()["max_sleep"] == 12
        assert (backend.params[-1].burst, backend.params[-1].max_sleep, backend.params[-1].wake) == (1, 12, 16)
        client.post("/v1/detect", content=png(), headers={"content-type": "image/png"})
        assert (backend.params[-1].burst, backend.params[-1].max_sleep) == (None, 20)  # the configured cap
        assert client.get("/v1/models").json()["models"][0]["max_wake"] == 16


# --- memory: decode to the model's size, bytes in flight ----------------------------------------------------

def test_decoded_straight_to_the_model_input_and_boxes_in_original_pixels():
    backend = FakeBackend(fit_box=(64, 64))
    with TestClient(app_with(backend)) as client:
        backend.shapes.clear()
        r = client.post("/v1/detect", content=jpeg(2000, 1000), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200
        assert backend.shapes == [(32, 64, 3)]  # only the resized image reached (and waited for) the model
        assert r.json()["image"] == {"width": 2000, "height": 1000}
        assert r.json()["detections"][0]["box"] == [0.0, 0.0, 2000.0, 1000.0]


def test_exif_orientation_and_sixteen_bit_in_replies():
    backend = FakeBackend()
    with TestClient(app_with(backend)) as client:
        exif = Image.Exif()
        exif[0x0112] = 6
        r = client.post("/v1/detect", content=jpeg(40, 20, exif=exif), headers={"content-type": "image/jpeg"})
        assert r.json()["image"] == {"width": 20, "height": 40}  # as displayed
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(buf, format="PNG")
        backend.shapes.clear()
        r = client.post("/v1/detect", content=buf.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and backend.shapes == [(8, 8, 3)]


def test_bytes_in_flight_are_bounded():
    backend = FakeBackend(delay=0.6, fit_box=(64, 64))
    # about decoding's bytes: the inference part (test_a_request_reserves_its_part_of_the_inference_memory) is off
    with TestClient(app_with(backend, max_inflight_mb=1.0, timeout_s=5, budget_inference=False)) as client:
        big = png(w=500, h=500)  # 250,000 px x 5 bytes while decoding (RGB): more than the whole 1 MB budget
        r = client.post("/v1/detect", content=big, headers={"content-type": "image/png"})
        assert r.status_code == 413 and r.json()["error"] == "image_too_large"
        fits = png(w=300, h=300)  # 450 KB while decoding: two at a time, the third waits its turn
        responses = post_many(client, 3, bodies=[fits] * 3)
        assert [r.status_code for r in responses] == [200] * 3
        budget = client.app.state.service.budget
        assert 0 < budget.peak <= budget.limit and budget.used == 0  # never over the budget; all given back


def test_the_byte_budget_is_first_come_first_served():
    import asyncio

    from service.budget import ByteBudget
    from service.errors import ServiceError

    async def scenario() -> list[str]:
        budget, order = ByteBudget(100), []
        first = await budget.reserve(60, time.monotonic() + 1)

        async def reserve(name: str, n: int, wait_s: float = 1.0):
            await budget.reserve(n, time.monotonic() + wait_s)
            order.append(name)

        large = asyncio.ensure_future(reserve("large", 80))
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(reserve("small", 30))  # it fits now, but the large one came first
        await asyncio.sleep(0.01)
        assert order == []
        received = await budget.reserve(5, time.monotonic() + 0.05, in_line=False)  # a body's chunk: when it fits
        await budget.release(received + first)
        await large
        with pytest.raises(ServiceError, match="too many large requests"):
            await reserve("late", 10, wait_s=0.05)  # it fits, but the small one (waiting for room) came first
        await budget.release(80)
        await small
        return order

    assert asyncio.run(scenario()) == ["large", "small"]


def test_peak_growth_sees_an_allocation_and_none_without_a_resettable_peak(monkeypatch, tmp_path):
    from service import memory

    grown = memory.peak_growth(lambda: np.ones(64 * 2 ** 20, np.uint8).sum())  # 64 MB, touched, then freed
    if grown is None:
        pytest.skip("no resettable peak RSS here (Linux's /proc/self/clear_refs)")
    assert 60 * 2 ** 20 <= grown < 200 * 2 ** 20, grown
    monkeypatch.setattr(memory, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    assert memory.peak_growth(lambda: None) is None


def test_inference_memory_from_two_peaks_and_within_a_budget():
    from service.memory import InferenceMemory

    assert InferenceMemory.from_peaks(100, 160) == InferenceMemory(per_image=60, fixed=40)
    assert InferenceMemory.from_peaks(100, 101) == InferenceMemory(per_image=25, fixed=75)  # noise: the floor
    assert InferenceMemory.from_peaks(100, 300) == InferenceMemory(per_image=200, fixed=0)
    assert InferenceMemory(400, 600).within(1000, models=2) == InferenceMemory(250, 250)
    assert InferenceMemory(10, 20).within(1000, models=2) == InferenceMemory(10, 20)


def test_the_largest_input_is_the_largest_area_the_models_resize_gives(tmp_path):
    from service.backends import largest_input, load_backend
    from test_service import make_tiny_checkpoint

    assert largest_input(FakeBackend(), 20.0) == (1280, 640)  # no resize of its own: the widest shape tried
    assert largest_input(FakeBackend(), 1.5) == (853, 640)
    yolo = load_backend(str(make_tiny_checkpoint(tmp_path / "tiny.pt")), allow_unverified=True)
    assert largest_input(yolo, 20.0) == (64, 64)  # the letterbox: imgsz square


def test_inference_memory_of_the_tiny_model_is_measured(tmp_path):
    from service.backends import inference_memory, load_backend
    from test_service import make_tiny_checkpoint

    yolo = load_backend(str(make_tiny_checkpoint(tmp_path / "tiny.pt", imgsz=128)), allow_unverified=True)
    measured = inference_memory(yolo, Params(sleep=0, max_sleep=1), 20.0)
    if measured is None:
        pytest.skip("no resettable peak RSS here (Linux's /proc/self/clear_refs)")
    assert 0 < measured.per_image < 500 * 2 ** 20 and 0 <= measured.fixed < 500 * 2 ** 20, measured


def test_a_request_reserves_its_part_of_the_inference_memory():
    from service.memory import InferenceMemory

    backend = FakeBackend(delay=0.2)
    with TestClient(app_with(backend)) as client:
        state = client.app.state.service
        figures = client.get("/v1/models").json()["models"][0]["inference_bytes"]
        if figures is None:
            pytest.skip("no resettable peak RSS here (Linux's /proc/self/clear_refs)")
        assert figures["per_image"] >= 0 and state.budget.used == figures["budgeted_fixed"]  # held by the worker
        fixed = state.budget.used
        state.inference["fake"] = InferenceMemory(per_image=300_000, fixed=0)
        state.budget.peak = fixed
        assert client.post("/v1/detect", content=png(), headers={"content-type": "image/png"}).status_code == 200
        assert state.budget.peak >= fixed + 32 * 24 * 3 + 300_000 and state.budget.used == fixed
    assert state.budget.used == 0  # the worker's part given back on shutdown
    with TestClient(app_with(backend, budget_inference=False)) as client:
        state = client.app.state.service
        assert client.get("/v1/models").json()["models"][0]["inference_bytes"] is None and state.budget.used == 0
        assert client.post("/v1/detect", content=png(), headers={"content-type": "image/png"}).status_code == 200
        assert state.budget.peak < 300_000


def test_inference_larger_than_the_budget_is_capped_and_requests_still_served(monkeypatch, capsys):
    from service import state as state_module
    from service.memory import InferenceMemory

    monkeypatch.setattr(state_module, "inference_memory", lambda *_: InferenceMemory(8 * 2 ** 20, 8 * 2 ** 20))
    with TestClient(app_with(FakeBackend(), max_inflight_mb=1.0, timeout_s=5)) as client:
        assert client.post("/v1/detect", content=png(), headers={"content-type": "image/png"}).status_code == 200
        info = client.get("/v1/models").json()["models"][0]["inference_bytes"]
        assert info == {"per_image": 8 * 2 ** 20, "fixed": 8 * 2 ** 20, "budgeted_per_image": 2 ** 18,
                        "budgeted_fixed": 2 ** 19}
    err = capsys.readouterr().err
    assert "fake: inference takes 8 MB per image + 8 MB per batch" in err
    assert "fake: its inference does not fit beside requests in --max-inflight-mb 1" in err
    monkeypatch.setattr(state_module, "inference_memory", lambda *_: None)
    with TestClient(app_with(FakeBackend())) as client:
        assert client.get("/v1/models").json()["models"][0]["inference_bytes"] is None
    assert "fake: inference memory is not budgeted" in capsys.readouterr().err


# --- WebSocket: bad frames, limits, origins -------------------------------------------------------------------

def test_websocket_bad_frame_keeps_the_socket_open():
    backend = FakeBackend()
    with TestClient(app_with(backend)) as client:
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_bytes(png(w=FAIL_WIDTH))
            error = ws.receive_json()
            assert error["type"] == "error" and error["error"] == "inference_failed" and "secret" not in str(error)
            ws.send_bytes(b"junk")
            assert ws.receive_json()["error"] == "unsupported_image"
            strip = io.BytesIO()
            Image.fromarray(np.zeros((1, 500, 3), np.uint8)).save(strip, format="PNG")
            ws.send_bytes(strip.getvalue())
            assert ws.receive_json()["error"] == "bad_image_shape"
            ws.send_bytes(png())
            assert ws.receive_json()["type"] == "detections"  # still open and answering


def test_websocket_idle_and_total_limits():
    from starlette.websockets import WebSocketDisconnect

    backend = FakeBackend()
    with TestClient(app_with(backend, ws_idle_s=0.3)) as client:
        with client.websocket_connect("/v1/stream") as ws:
            message = ws.receive_json()
            assert message == {"type": "closing", "reason": "idle for 0.3 s"}
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1001
    with TestClient(app_with(backend, ws_max_s=0.5, ws_idle_s=10)) as client:
        with client.websocket_connect("/v1/stream") as ws:
            start = time.monotonic()
            seen = []
            while not seen or seen[-1].get("type") != "closing":
                ws.send_bytes(png())
                seen.append(ws.receive_json())
            assert seen[-1]["reason"].startswith("session over") and time.monotonic() - start < 2


def test_origin_allow_list():
    from starlette.websockets import WebSocketDisconnect

    backend = FakeBackend()
    with TestClient(app_with(backend), base_url="http://svc:8000") as client:
        other = {"origin": "http://evil.example"}
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect("/v1/stream", headers=other) as ws:
                ws.receive_json()
        assert refused.value.code == 1008
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png", **other})
        assert r.status_code == 403 and r.json()["error"] == "origin_not_allowed"
        same = {"origin": "http://127.0.0.1:8000"}  # the page this server serves (--host 127.0.0.1 --port 8000)
        assert client.post("/v1/detect", content=png(), headers={"content-type": "image/png", **same}).status_code == 200
        with client.websocket_connect("/v1/stream", headers={"origin": "http://localhost:8000"}) as ws:
            ws.send_bytes(png())
            assert ws.receive_json()["type"] == "detections"
        # DNS rebinding: the page's origin matches the Host header it made the browser send; still refused
        rebound = {"origin": "http://evil.example", "host": "evil.example"}
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png", **rebound})
        assert r.status_code == 403 and r.json()["error"] == "origin_not_allowed"
    with TestClient(app_with(backend, allowed_origins=["http://evil.example"]), base_url="http://svc:8000") as client:
        assert client.post("/v1/detect", content=png(), headers={"content-type": "image/png", **other}).status_code == 200
    from service.middleware import own_origins

    assert "http://localhost:8000" in own_origins("0.0.0.0", 8000) and own_origins("::1", 80)[0] == "http://127.0.0.1:80"
    with TestClient(app_with(backend, host="detect.example", port=443)) as client:  # a public name
        page = {"origin": "http://detect.example:443"}
        assert client.post("/v1/detect", content=png(), headers={"content-type": "image/png", **page}).status_code == 200


# --- docs offline, model listing ---------------------------------------------------------------------------

def test_docs_are_served_from_the_package():
    backend = FakeBackend()
    with TestClient(app_with(backend)) as client:
        for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            html = client.get(page).text
            sources = [part.split('"')[1] for part in html.split("src=")[1:]] + \
                      [part.split('"')[1] for part in html.split("href=")[1:]]
            assert sources and all(s.startswith("/") for s in sources), sources  # no CDN, no other host
            assert any(s.endswith(asset) for s in sources)
            for s in sources:
                assert client.get(s).status_code == 200, s


def test_models_show_names_and_digests_not_paths():
    backend = FakeBackend()
    with TestClient(app_with(backend)) as client:
        (info,) = client.get("/v1/models").json()["models"]
        assert info["sha256"] == "ab" * 32 and info["verified"] is True and "source" not in info
        assert "/" not in json_text(info)


def json_text(value) -> str:
    import json

    return json.dumps(value)


def test_yolo11_hybrid_is_served_with_analog_islands(tmp_path):
    import argparse

    import torch

    from detector.models.yolo import UnsupportedModelError, build_qann, export_checkpoint
    from service.backends import load_backend
    from service.server import add_arguments, settings_from_args

    torch.manual_seed(0)
    path = export_checkpoint(build_qann("yolo11n.yaml", levels=4, nc=3), tmp_path / "y11.pt", names=["a", "b", "c"],
                             imgsz=64)
    with pytest.raises(UnsupportedModelError, match="analog"):
        load_backend(str(path), allow_unverified=True)
    backend = load_backend(str(path), allow_unverified=True, analog="auto")
    with TestClient(create_app(Settings(), {backend.name: backend})) as client:
        (info,) = client.get("/v1/models").json()["models"]
        assert info["analog"] == ["layers.10.m.0.attn"] and info["verified"] is False
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["settled"] is not None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_args(parser.parse_args(["--analog", "auto"])).analog == "auto"
    assert settings_from_args(parser.parse_args(["--analog", "a.attn, b.attn"])).analog == ["a.attn", "b.attn"]


def test_heavy_requests_wait_for_ordinary_ones():
    backend = FakeBackend(delay=0.3)
    with TestClient(app_with(backend, max_batch=1, batch_window_ms=0)) as client:
        backend.params.clear()
        queries = [{}, {"wake": 12}, {"burst": 1}, {}, {}]
        results = [None] * len(queries)
        threads = []
        for i, query in enumerate(queries):  # the first occupies the worker; the rest queue up in this order
            threads.append(threading.Thread(target=lambda i=i, q=query: results.__setitem__(i, client.post(
                "/v1/detect", content=png(), headers={"content-type": "image/png"}, params=q))))
            threads[-1].start()
            time.sleep(0.05)
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [200] * 5
        order = [(p.wake, p.burst) for p in backend.params]
        assert order == [(None, None), (None, None), (None, None), (12, None), (None, 1)], order
    assert Params(wake=8).heavy(4) and Params(sleep=8).heavy(4) and Params(burst=1).heavy(4)
    assert not Params().heavy(4) and not Params(wake=4, sleep=4, burst=4).heavy(4)


def test_onnx_runtime_engine_is_served_and_streams_without_spike_counts(onnx_cache):
    import argparse

    from detector.data import ensure_bundled
    from service.backends import load_backend
    from service.server import add_arguments, settings_from_args

    data = (ensure_bundled() / "images" / "val" / "000000.jpg").read_bytes()
    backend = load_backend("yolov8n-bundled", engine="onnxruntime", provider="cpu", threads=1)
    with TestClient(create_app(Settings(), {backend.name: backend})) as client:
        (info,) = client.get("/v1/models").json()["models"]
        assert info["engine"] == "onnxruntime" and info["verified"] is True
        got = client.post("/v1/detect", content=data, headers={"content-type": "image/jpeg"}).json()
        r = client.post("/v1/detect/stream", content=data, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.text.splitlines() if line]
        steps, final = [x for x in lines if x["type"] == "step"], lines[-1]
        assert final["type"] == "final" and len(steps) == got["steps"]
        assert all(x["spikes"] is None for x in steps) and final["spikes"] is None
        assert [d["class_id"] for d in final["detections"]] == [d["class_id"] for d in got["detections"]]
    with TestClient(create_app(Settings(), {"torch": load_backend("yolov8n-bundled")})) as client:
        expected = client.post("/v1/detect", content=data, headers={"content-type": "image/jpeg"}).json()
    assert got["spikes"] is None and got["energy_uj"] is None and expected["spikes"] > 0 and expected["detections"]
    assert (got["steps"], got["settled"]) == (expected["steps"], expected["settled"])
    assert [d["class_id"] for d in got["detections"]] == [d["class_id"] for d in expected["detections"]]
    assert np.allclose([d["box"] for d in got["detections"]], [d["box"] for d in expected["detections"]], atol=1e-2)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--engine", "onnxruntime", "--provider", "cuda"]))
    assert (settings.engine, settings.provider) == ("onnxruntime", "cuda")


# --- admission, replies in the service's words, the schema's bounds -------------------------------------------

def test_admission_refuses_excess_at_once_and_always_answers_probes():
    from starlette.websockets import WebSocketDisconnect

    backend = FakeBackend(delay=1.5)
    # no inference measurement: its two predicts would take 3 s of this fake's delay
    with TestClient(app_with(backend, limit_concurrency=1, timeout_s=10, budget_inference=False)) as client:
        slow = threading.Thread(target=lambda: client.post("/v1/detect", content=png(),
                                                           headers={"content-type": "image/png"}))
        slow.start()
        time.sleep(0.4)  # the one admitted request is in flight
        start = time.monotonic()
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"] == "busy" and r.headers["retry-after"] == "1"
        assert time.monotonic() - start < 0.5, "an excess request must be refused at once, not queued"
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert client.get(probe).status_code == 200, probe
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect("/v1/stream") as ws:
                ws.receive_json()
        assert refused.value.code == 1013  # try again later
        slow.join()
        assert client.post("/v1/detect", content=png(), headers={"content-type": "image/png"}).status_code == 200


def test_replies_carry_no_library_text_for_bombs_and_forged_jpegs():
    import struct
    import zlib

    backend = FakeBackend()
    with TestClient(app_with(backend, max_pixels=40_000_000)) as client:
        ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # a header that says 30000 x 30000
        chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                    + struct.pack(">I", zlib.crc32(kind + body)))
        bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                + chunk(b"IEND", b""))
        r = client.post("/v1/detect", content=bomb, headers={"content-type": "image/png"})
        assert r.status_code == 413 and r.json()["error"] == "image_too_large", r.text
        assert "Pillow" not in r.text and "DOS" not in r.text and "decompression" not in r.text.lower(), r.text
        small = jpeg(64, 48)
        sof = small.find(b"\xff\xc0")
        forged = small[:sof + 5] + struct.pack(">HH", 6000, 6000) + small[sof + 9:]  # SOF 6000 x 6000, tiny scan
        r = client.post("/v1/detect", content=forged, headers={"content-type": "image/jpeg"})
        assert r.status_code == 422 and r.json()["error"] == "bad_image", r.text
        r = client.post("/v1/detect", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
        assert r.status_code == 400 and r.json()["error"] == "bad_multipart" and "boundary" in r.json()["detail"]


def test_video_temp_files_count_against_the_disk_budget():
    backend = FakeBackend()
    with TestClient(app_with(backend, max_video_disk_mb=0.01)) as client:  # 10 KB of temp files in all
        fake_mkv = b"\x1a\x45\xdf\xa3" + b"\0" * 20_000
        r = client.post("/v1/video", content=fake_mkv, headers={"content-type": "video/x-matroska"})
        assert r.status_code == 413 and r.json()["error"] == "video_too_large", r.text
        r = client.post("/v1/video", content=fake_mkv[:5000], headers={"content-type": "video/x-matroska"})
        assert r.status_code == 422 and r.json()["error"] == "bad_video"  # saved, refused, space given back
        r = client.post("/v1/video", content=fake_mkv[:5000], headers={"content-type": "video/x-matroska"})
        assert r.status_code == 422, "the disk budget was not released after a refused video"


def test_openapi_states_the_enforced_bounds_and_every_ref_resolves():
    import re

    from service.openapi import sleep_pattern

    backend = FakeBackend()  # levels 4: wake at most 16
    with TestClient(app_with(backend, max_sleep=5)) as client:
        schema = client.get("/openapi.json").json()
    text = json.dumps(schema)
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert "#/$defs/" not in text and refs <= set(schema["components"]["schemas"]), refs
    detect = schema["paths"]["/v1/detect"]["post"]
    query = {p["name"]: p["schema"] for p in detect["parameters"]}
    form = detect["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    for declared in (query["wake"]["anyOf"][0], query["burst"]["anyOf"][0], form["wake"]):
        assert declared["maximum"] == 16
    assert query["max_sleep"]["anyOf"][0]["maximum"] == 5 and form["max_sleep"]["maximum"] == 5
    assert form["sleep"]["pattern"] == sleep_pattern(5) and re.match(sleep_pattern(5), "5")
    assert not re.match(sleep_pattern(5), "6") and re.match(sleep_pattern(5), "auto")
    video = schema["paths"]["/v1/video"]["post"]
    strides = {p["name"]: p["schema"] for p in video["parameters"] if p["name"] in ("every", "keyframe_every")}
    stated = [strides["keyframe_every"], strides["every"]["anyOf"][0],
              video["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["every"]]
    assert all(s["maximum"] == MAX_FRAME_STRIDE for s in stated), stated


def test_request_parameters_and_their_schema_come_from_the_one_declaration():
    """Query and form fields are detector.options' Schedule and Selection (help, lower bounds), capped by the
    settings (Settings.caps) in what the server enforces and in what its schema states."""
    from detector.options import Schedule, Selection, bounds_of

    backend = FakeBackend()  # levels 4
    settings = Settings(max_sleep=5, max_det=50)
    with TestClient(create_app(settings, {backend.name: backend})) as client:
        detect = client.get("/openapi.json").json()["paths"]["/v1/detect"]["post"]
        query = {p["name"]: p for p in detect["parameters"]}
        form = detect["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        caps = settings.caps(backend.levels)
        for declaration, name in ((Schedule, "wake"), (Schedule, "max_sleep"), (Selection, "max_det")):
            bounds = bounds_of(declaration, name)
            for schema in (query[name]["schema"]["anyOf"][0], form[name]):
                assert (schema["minimum"], schema["maximum"]) == (bounds.minimum, caps[name]), name
            assert query[name]["description"] == bounds.help == form[name]["description"]
        assert query["conf"]["schema"]["anyOf"][0]["maximum"] == bounds_of(Selection, "conf").maximum
        assert "classes" not in query
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png"}, params={"max_det": 51})
        assert r.status_code == 422 and r.json()["detail"] == "max_det: at most 50"
        r = client.post("/v1/detect", content=png(), headers={"content-type": "image/png"}, params={"max_det": 50})
        assert r.status_code == 200 and backend.params[-1].max_det == 50


def test_serve_options_are_the_settings_fields():
    import argparse
    import dataclasses

    from service.server import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(Settings):
        assert options[f.name].help == f.metadata["help"], f.name
    settings = settings_from_args(parser.parse_args(["--demo-image", "x.jpg"]))
    assert settings == Settings(demo_image="x.jpg")
    with pytest.raises(ValueError, match="--max-det must be >= 1"):
        settings_from_args(parser.parse_args(["--max-det", "0"]))


def test_create_app_is_short_and_so_is_every_function_of_the_service():
    import ast
    import inspect
    from pathlib import Path

    assert len(inspect.getsource(create_app).splitlines()) <= 80
    root = Path(__file__).resolve().parents[1] / "service"
    long = [f"{path.relative_to(root)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in root.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long
