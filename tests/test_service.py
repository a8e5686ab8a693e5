"""The HTTP service against a real ``uvicorn`` process (``python -m casc serve``) on 127.0.0.1.

A tiny random-init YOLOv8n QANN (nc=3, imgsz 64, randomised BN statistics and class biases so there are
boxes) is exported once per session (served with ``--allow-unverified``: it is in no manifest); the server runs
it with small limits so that the limit paths are cheap. Also: hostile uploads (playlists, concat lists, images
as video, strips), slow clients (headers, bodies, idle connections that count for nothing), WebSocket origins,
SIGTERM (readiness, drain, exit 0), checkpoint verification, the web page and ``/docs`` in a real headless
Chromium (Debian's ``chromium``, driven over the DevTools protocol) and a bounded schemathesis fuzz run over
the OpenAPI schema (no 5xx).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("detector.models.yolo").prepare_ultralytics()  # offline, before ultralytics is imported
from PIL import Image  # noqa: E402

from detector.randnet import randomise_batchnorm, randomise_class_biases  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__import__("ultralytics").__file__).parent / "assets"
BUS = ASSETS / "bus.jpg"
MAX_PIXELS = 1_000_000  # bus.jpg (810x1080 = 874,800) fits
MAX_UPLOAD_MB = 1.0
STARTUP_S = 120
HEADER_TIMEOUT_S, BODY_TIMEOUT_S, LIMIT_CONCURRENCY = 2, 3, 12


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread BN statistics and the class biases so a random-init net has mid-level activations and boxes."""
    randomise_batchnorm(model, seed)
    randomise_class_biases([seq[-1] for seq in model.model[-1].cv3], seed + 1, -2.0, 1.0)
    return model


def make_tiny_checkpoint(path: Path, imgsz: int = 64) -> Path:
    from detector.models.yolo import build_qann, export_checkpoint

    torch.manual_seed(0)
    qann = randomize(build_qann("yolov8n.yaml", levels=4, nc=3))
    return export_checkpoint(qann, path, names=["cat", "dog", "bus"], imgsz=imgsz)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="casc-serve-", suffix=".log")[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "casc", "serve", "--model", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--threads", "1", "--max-pixels", str(MAX_PIXELS), "--max-upload-mb",
           str(MAX_UPLOAD_MB), "--timeout-s", "60", "--demo-image", str(BUS), "--max-video-frames", "20",
           "--log-level", "warning", "--allow-unverified", "--header-timeout-s", str(HEADER_TIMEOUT_S),
           "--body-timeout-s", str(BODY_TIMEOUT_S), "--limit-concurrency", str(LIMIT_CONCURRENCY), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server not ready within {STARTUP_S} s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("service") / "tiny.pt")


@pytest.fixture(scope="session")
def server(tiny_ckpt):
    proc, base, log = start_server(tiny_ckpt)
    yield base
    proc.terminate()  # SIGTERM: graceful shutdown
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("server did not stop within 30 s of SIGTERM")
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]  # a clean stop
    assert "worker(s) drained" in text and "Traceback" not in text, text[-3000:]
    log.unlink(missing_ok=True)


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def bus_bytes() -> bytes:
    return BUS.read_bytes()


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def strip(answer: dict) -> dict:
    """A detection answer without its timings (which differ between runs); the energy estimate to 6 digits
    (the stream adds it up step by step, predict at once)."""
    out = {k: v for k, v in answer.items() if k not in ("timings", "type")}
    if out.get("energy_uj") is not None:
        out["energy_uj"] = float(f"{out['energy_uj']:.6g}")
    return out


def assert_error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    if code:
        assert body["error"] == code, body


def assert_healthy(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.post("/v1/detect", content=bus_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text


# --- endpoints ---------------------------------------------------------------------------------------

def test_health_ready_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["models"] == ["tiny"]
    models = client.get("/v1/models").json()
    assert models["default"] == "tiny"
    (m,) = models["models"]
    assert m["family"] == "yolo" and m["levels"] == 4 and m["classes"] == ["cat", "dog", "bus"]
    assert m["default_wake"] == 4 and m["default_sleep"] == "auto" and m["imgsz"] == 64 and m["default"]
    assert m["max_wake"] == 16 and m["max_sleep"] == 32 and m["verified"] is False and len(m["sha256"]) == 64
    assert "source" not in m and str(ROOT) not in json.dumps(models) and "/tmp" not in json.dumps(models)


def test_detect_multipart_and_raw(client):
    data = bus_bytes()
    a = client.post("/v1/detect", files={"file": ("bus.jpg", data, "image/jpeg")}, params={"conf": 0.5})
    b = client.post("/v1/detect", content=data, headers={"content-type": "image/jpeg"}, params={"conf": 0.5})
    c = client.post("/v1/detect", files={"file": ("bus.jpg", data, "image/jpeg")}, data={"conf": "0.5"})
    for r in (a, b, c):
        assert r.status_code == 200, r.text
    a, b, c = a.json(), b.json(), c.json()
    assert strip(a) == strip(b) == strip(c)
    assert a["model"] == "tiny" and a["image"] == {"width": 810, "height": 1080}
    assert a["detections"], "the randomised tiny model gives boxes on bus.jpg"
    for d in a["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 810 and 0 <= y1 <= y2 <= 1080  # original pixels
        assert d["score"] >= 0.5 and d["name"] == ["cat", "dog", "bus"][d["class_id"]]
    assert a["wake"] == 4 and a["sleep"] == "auto" and a["steps"] >= 5 and a["settled"] is True
    assert a["spikes"] > 0 and a["energy_uj"] > 0
    t = a["timings"]
    assert t["total_ms"] >= t["inference_ms"] >= 0 and t["batch_size"] >= 1
    # other parameters reach the model: a fixed sleep, fewer detections
    r = client.post("/v1/detect", content=data, headers={"content-type": "image/jpeg"},
                    params={"wake": 2, "sleep": 3, "conf": 0.01, "max_det": 2}).json()
    assert r["steps"] == 5 and r["wake"] == 2 and r["sleep"] == 3 and len(r["detections"]) <= 2
    # burst=1 (one spike per sleep step) needs more sleep steps than the default burst sleep, within max_sleep
    one = client.post("/v1/detect", content=data, headers={"content-type": "image/jpeg"},
                      params={"burst": 1, "max_sleep": 30}).json()
    assert one["burst"] == 1 and one["max_sleep"] == 30 and a["steps"] <= one["steps"] <= 34


@pytest.mark.parametrize("fmt,ctype", [("PNG", "image/png"), ("WEBP", "image/webp"), ("BMP", "image/bmp")])
def test_detect_formats(client, fmt, ctype):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    r = client.post("/v1/detect", content=encode(array, fmt), headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": 80, "height": 48}


def read_ndjson(response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def test_stream_ndjson_final_equals_detect(client):
    data = bus_bytes()
    with client.stream("POST", "/v1/detect/stream", content=data, params={"conf": 0.3},
                       headers={"content-type": "image/jpeg"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = read_ndjson(r)
    steps, final = events[:-1], events[-1]
    assert [e["type"] for e in steps] == ["step"] * len(steps) and final["type"] == "final"
    assert [e["t"] for e in steps] == list(range(1, len(steps) + 1))  # one line per time step, in order
    assert [e["phase"] for e in steps[:4]] == ["wake"] * 4 and steps[-1]["phase"] == "sleep"
    cumulative = [e["cumulative_spikes"] for e in steps]
    assert cumulative == sorted(cumulative) and cumulative[-1] > 0
    assert steps[-1]["settled"]  # sleep="auto" stops at the silent step
    assert final["steps"] == steps[-1]["t"] and final["spikes"] == cumulative[-1]
    assert final["detections"] == steps[-1]["detections"]
    detect = client.post("/v1/detect", content=data, params={"conf": 0.3},
                         headers={"content-type": "image/jpeg"}).json()
    assert strip(final) == strip(detect)


def test_stream_sse(client):
    data = bus_bytes()
    with client.stream("POST", "/v1/detect/stream", content=data, params={"conf": 0.3},
                       headers={"content-type": "image/jpeg", "accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    blocks = [b for b in text.split("\n\n") if b.strip()]
    events = []
    for block in blocks:
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    assert events[-1]["type"] == "final" and all(e["type"] == "step" for e in events[:-1])
    with client.stream("POST", "/v1/detect/stream", content=data, params={"conf": 0.3},
                       headers={"content-type": "image/jpeg"}) as r:
        ndjson = read_ndjson(r)
    assert [strip(e) for e in events] == [strip(e) for e in ndjson]


def make_video(path: Path, frames: int = 7, size=(64, 48)) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    rng = np.random.default_rng(1)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path


def test_video(client, tmp_path):
    data = make_video(tmp_path / "clip.avi").read_bytes()
    r = client.post("/v1/video", files={"file": ("clip.avi", data, "video/x-msvideo")},
                    data={"every": "2", "conf": "0.01"})
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines()]
    frames, end = lines[:-1], lines[-1]
    assert [f["frame"] for f in frames] == [0, 2, 4, 6] and all(f["type"] == "frame" for f in frames)
    assert end == {"type": "end", "frames": 7, "processed": 4, "every": 2, "fps": 10.0, "width": 64, "height": 48,
                   "truncated": False}
    assert frames[1]["time_s"] == pytest.approx(0.2) and frames[0]["steps"] >= 5
    # delta frames by default: the first frame runs the whole schedule, the later ones only their change
    assert [f["keyframe"] for f in frames] == [True, False, False, False]
    assert all(f["steps"] < frames[0]["steps"] for f in frames[1:])
    r = client.post("/v1/video", files={"file": ("clip.avi", data, "video/x-msvideo")},
                    params={"every": 2, "conf": 0.01, "delta": "false"})
    fresh = [json.loads(x) for x in r.text.splitlines()][:-1]
    assert all(f["keyframe"] for f in fresh) and all(f["steps"] >= 5 for f in fresh)
    r = client.post("/v1/video", files={"file": ("clip.avi", data, "video/x-msvideo")},
                    params={"every": 2, "keyframe_every": 2})
    assert [json.loads(x)["keyframe"] for x in r.text.splitlines()[:-1]] == [True, False, True, False]
    r = client.post("/v1/video", files={"file": ("clip.avi", data, "video/x-msvideo")}, params={"keyframe_every": 0})
    assert r.status_code == 422 and r.json()["error"] == "invalid_parameter"
    # raw body, and the frame limit (--max-video-frames 20)
    long_clip = make_video(tmp_path / "long.avi", frames=25).read_bytes()
    r = client.post("/v1/video", content=long_clip, headers={"content-type": "video/x-msvideo"},
                    params={"every": 10})
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["frame"] for x in lines[:-1]] == [0, 10] and lines[-1]["truncated"] and lines[-1]["frames"] == 20


def test_live_streams_keep_their_own_delta_state(server, client):
    """Two live connections take turns on one model: each connection's frames are delta frames of its own video,
    and each answer equals a fresh detection of that frame (the sessions never see each other's state)."""
    ws_client = pytest.importorskip("websockets.sync.client")
    rng = np.random.default_rng(5)
    scenes = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(2)]
    videos = [[encode(np.roll(scene, 3 * t, axis=1), "PNG") for t in range(3)] for scene in scenes]
    # conf 0.6: the tiny random model's low-score boxes all hug the image border, where float32 noise reorders NMS
    url = server.replace("http", "ws") + "/v1/stream?conf=0.6"
    with ws_client.connect(url, max_size=None) as a, ws_client.connect(url, max_size=None) as b:
        answers = {0: [], 1: []}
        for t in range(3):
            for i, ws in enumerate((a, b)):
                ws.send(videos[i][t])
                answers[i].append(json.loads(ws.recv(timeout=60)))
    for i in (0, 1):
        assert [x["keyframe"] for x in answers[i]] == [True, False, False], answers[i]
        for t, answer in enumerate(answers[i]):
            fresh = client.post("/v1/detect", content=videos[i][t], headers={"content-type": "image/png"},
                                params={"conf": 0.6}).json()
            # the same detections; near-equal scores may come in another order (float32 summation order)
            got, want = (sorted(x["detections"], key=lambda d: (d["class_id"], d["box"], d["score"])) for x in (answer, fresh))
            assert got and [d["class_id"] for d in got] == [d["class_id"] for d in want]
            for d, e in zip(got, want):
                assert d["box"] == pytest.approx(e["box"], abs=0.05) and d["score"] == pytest.approx(e["score"], abs=1e-3)


def test_websocket_live(server):
    ws_client = pytest.importorskip("websockets.sync.client")
    url = server.replace("http", "ws") + "/v1/stream?conf=0.3"
    frame = bus_bytes()
    with ws_client.connect(url, max_size=None) as ws:
        ws.send(frame)
        answer = json.loads(ws.recv(timeout=60))
        assert answer["type"] == "detections" and answer["frame"] == 0 and answer["detections"]
        ws.send(b"not an image")
        error = json.loads(ws.recv(timeout=60))
        assert error["type"] == "error" and error["error"] == "unsupported_image" and error["frame"] == 1
        for _ in range(6):  # a burst: the newest frame is always answered, older ones may be dropped
            ws.send(frame)
        seen = []
        while not seen or seen[-1]["frame"] != 7:
            seen.append(json.loads(ws.recv(timeout=60)))
        assert len(seen) + seen[-1]["dropped"] == 6
    with ws_client.connect(server.replace("http", "ws") + "/v1/stream?model=nope") as ws:
        assert json.loads(ws.recv(timeout=10))["error"] == "unknown_model"


def test_metrics(client):
    client.post("/v1/detect", content=bus_bytes(), headers={"content-type": "image/jpeg"})
    text = client.get("/metrics").text
    assert 'casc_http_requests_total{endpoint="/v1/detect",method="POST",status="200"}' in text
    assert 'casc_http_request_duration_seconds_bucket{endpoint="/v1/detect",le="+Inf"}' in text
    assert 'casc_queue_depth{model="tiny"}' in text
    spikes = [line for line in text.splitlines() if line.startswith('casc_spikes_total{model="tiny"}')]
    assert spikes and float(spikes[0].split()[-1]) > 0
    assert "# TYPE casc_batch_size histogram" in text


def test_web_page_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/detect/stream" in r.text and "<script" in r.text and "http" not in r.text.split("<script")[1]
    assert client.get("/demo-image").content == bus_bytes()
    schema = client.get("/openapi.json").json()
    assert {"/v1/detect", "/v1/detect/stream", "/v1/video", "/v1/models", "/metrics"} <= set(schema["paths"])
    assert "DetectResponse" in schema["components"]["schemas"]


# --- bad input: 4xx in the one error shape, never a 500 or a hang; healthy after ------------------------

def png_header_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width x height`` (tiny file, huge decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_INPUTS = {
    "non_image": (b"hello, this is not an image", "image/jpeg", {}, 415, "unsupported_image"),
    "truncated_jpeg": (BUS.read_bytes()[:4000], "image/jpeg", {}, 422, "bad_image"),
    "empty_body": (b"", "image/jpeg", {}, 400, "empty_body"),
    "no_content_type": (b"", None, {}, 400, "empty_body"),
    "wrong_content_type": (BUS.read_bytes(), "application/json", {}, 415, "unsupported_media_type"),
    "text_plain": (b"abc", "text/plain", {}, 415, "unsupported_media_type"),
    "gif": (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/png", {}, 415, "unsupported_image"),
    "over_pixel_limit": (encode(np.zeros((1001, 1000, 3), np.uint8), "PNG"), "image/png", {}, 413,
                         "image_too_large"),
    "decompression_bomb": (png_header_bomb(100_000, 100_000), "image/png", {}, 413, "image_too_large"),
    "over_upload_limit": (b"\xff\xd8" + os.urandom(int(1.2 * 1024 * 1024)), "image/jpeg", {}, 413, "upload_too_large"),
    "unknown_model": (BUS.read_bytes(), "image/jpeg", {"model": "nope"}, 404, "unknown_model"),
    "wake_0": (BUS.read_bytes(), "image/jpeg", {"wake": 0}, 422, "invalid_parameter"),
    "sleep_-1": (BUS.read_bytes(), "image/jpeg", {"sleep": -1}, 422, "invalid_parameter"),
    "sleep_word": (BUS.read_bytes(), "image/jpeg", {"sleep": "later"}, 422, "invalid_parameter"),
    "sleep_too_big": (BUS.read_bytes(), "image/jpeg", {"sleep": 999}, 422, "invalid_parameter"),
    "conf_2": (BUS.read_bytes(), "image/jpeg", {"conf": 2}, 422, "invalid_parameter"),
    "conf_nan": (BUS.read_bytes(), "image/jpeg", {"conf": "nan"}, 422, "invalid_parameter"),
    "iou_neg": (BUS.read_bytes(), "image/jpeg", {"iou": -0.1}, 422, "invalid_parameter"),
    "max_det_0": (BUS.read_bytes(), "image/jpeg", {"max_det": 0}, 422, "invalid_parameter"),
    "wake_over_4L": (BUS.read_bytes(), "image/jpeg", {"wake": 17}, 422, "invalid_parameter"),
    "sleep_over_max": (BUS.read_bytes(), "image/jpeg", {"sleep": 33}, 422, "invalid_parameter"),
    "max_sleep_over": (BUS.read_bytes(), "image/jpeg", {"max_sleep": 64}, 422, "invalid_parameter"),
    "burst_over_wake": (BUS.read_bytes(), "image/jpeg", {"burst": 5}, 422, "invalid_parameter"),
    "unknown_parameter": (BUS.read_bytes(), "image/jpeg", {"sleeps": 3}, 422, "invalid_parameter"),
    "strip_1x20000": (encode(np.zeros((1, 20000, 3), np.uint8), "PNG"), "image/png", {}, 422, "bad_image_shape"),
    "webp_header_over_limit": (encode(np.zeros((1200, 1000, 3), np.uint8), "WEBP"), "image/webp", {}, 413,
                               "image_too_large"),
}


@pytest.mark.parametrize("endpoint", ["/v1/detect", "/v1/detect/stream"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(client, case, endpoint):
    body, ctype, params, status, code = BAD_INPUTS[case]
    headers = {"content-type": ctype} if ctype else {}
    r = client.post(endpoint, content=body, headers=headers, params=params)
    assert_error(r, status, code)


def test_bad_multipart(client):
    assert_error(client.post("/v1/detect", files={"other": ("x.jpg", bus_bytes(), "image/jpeg")}), 422, "missing_file")
    assert_error(client.post("/v1/detect", files={"file": ("x.jpg", b"junk", "image/jpeg")}), 415, "unsupported_image")
    assert_error(client.post("/v1/detect", files={"file": ("x.jpg", bus_bytes(), "image/jpeg")}, data={"wake": "0"}),
                 422, "invalid_parameter")
    assert_error(client.post("/v1/detect", content=b"--x\r\nbroken", headers={
        "content-type": "multipart/form-data; boundary=x"}), 422, "missing_file")
    r = client.get("/v1/detect")
    assert_error(r, 405)
    assert_error(client.get("/nowhere"), 404)
    assert_healthy(client)


def test_bad_video(client, tmp_path):
    assert_error(client.post("/v1/video", content=b"\x00\x01garbage" * 100,
                             headers={"content-type": "video/mp4"}), 415, "unsupported_video")
    assert_error(client.post("/v1/video", content=b"\x00\x00\x00\x18ftypisom" + b"\x00" * 200,
                             headers={"content-type": "video/mp4"}), 422, "bad_video")
    clip = make_video(tmp_path / "c.avi").read_bytes()
    assert_error(client.post("/v1/video", content=clip[: len(clip) // 8], headers={"content-type": "video/x-msvideo"}),
                 422, "bad_video")
    assert_error(client.post("/v1/video", content=b"", headers={"content-type": "video/mp4"}), 400, "empty_body")
    assert_error(client.post("/v1/video", content=clip, headers={"content-type": "image/jpeg"}), 415)
    assert_error(client.post("/v1/video", content=clip, headers={"content-type": "video/x-msvideo"},
                             params={"every": 0}), 422, "invalid_parameter")
    assert_healthy(client)


def hostile_videos(tmp_path: Path) -> dict[str, bytes]:
    """Uploads that make an unguarded FFmpeg read other files on the server (each names a real video there)."""
    target = make_video(tmp_path / "on-server.avi")
    hls = ("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10.0,\n"
           f"{target.as_uri()}\n#EXT-X-ENDLIST\n")
    return {
        "hls_file_url": hls.encode(),
        "hls_absolute_path": hls.replace(target.as_uri(), str(target)).encode(),
        "ffconcat_relative": f"ffconcat version 1.0\nfile '{os.path.relpath(target, tempfile.gettempdir())}'\n".encode(),
        "ffconcat_absolute": f"ffconcat version 1.0\nfile '{target}'\n".encode(),
        "png_as_video": encode(np.zeros((48, 64, 3), np.uint8), "PNG"),
        "gif_as_video": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
        "jpeg_as_video": bus_bytes(),
    }


@pytest.mark.parametrize("case", ["hls_file_url", "hls_absolute_path", "ffconcat_relative", "ffconcat_absolute",
                                  "png_as_video", "gif_as_video", "jpeg_as_video"])
def test_video_refuses_playlists_concat_lists_and_images(client, tmp_path, case):
    data = hostile_videos(tmp_path)[case]
    for name, ctype in (("clip.m3u8", "application/vnd.apple.mpegurl"), ("clip.mp4", "video/mp4"),
                        ("clip.avi", "video/x-msvideo")):
        r = client.post("/v1/video", files={"file": (name, data, ctype)})
        assert_error(r, 415, "unsupported_video")
    assert_error(client.post("/v1/video", content=data, headers={"content-type": "application/octet-stream"}),
                 415, "unsupported_video")


def test_video_with_a_container_signature_but_playlist_inside_is_not_followed(client, tmp_path):
    """Past the signature check, FFmpeg is held to the container's demuxer and the file protocol."""
    playlist = hostile_videos(tmp_path)["hls_file_url"]
    fake_mp4 = b"\x00\x00\x00\x10ftypisom\x00\x00\x00\x00" + playlist
    fake_mkv = b"\x1a\x45\xdf\xa3" + playlist
    for data in (fake_mp4, fake_mkv):
        assert_error(client.post("/v1/video", content=data, headers={"content-type": "video/mp4"}), 422, "bad_video")
    assert_healthy(client)


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(the server closed the connection within ``seconds``, what it sent before)."""
    sock.settimeout(seconds)
    received = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True, received
            received += chunk
    except socket.timeout:
        return False, received
    except ConnectionResetError:
        return True, received


def test_slow_headers_and_idle_connections_are_closed(server):
    with socket.create_connection(("127.0.0.1", port_of(server))) as idle:
        closed, _ = closed_within(idle, HEADER_TIMEOUT_S + 3)
        assert closed, "an idle connection that never sends a request stays open"
    with socket.create_connection(("127.0.0.1", port_of(server))) as slow:
        start = time.monotonic()
        slow.settimeout(1)
        for piece in (b"POST /v1/detect HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: 1\r\n", b"X-Slow: 2\r\n"):
            try:
                slow.sendall(piece)
            except OSError:
                break
            time.sleep(0.8)
        closed, _ = closed_within(slow, HEADER_TIMEOUT_S + 3)
        assert closed and time.monotonic() - start < HEADER_TIMEOUT_S + 5, "slow headers kept the connection open"


def test_slow_body_gets_408_and_the_connection_closes(server, client):
    with socket.create_connection(("127.0.0.1", port_of(server))) as s:
        s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n")
        start = time.monotonic()
        s.settimeout(0.5)
        answer = b""
        while time.monotonic() - start < BODY_TIMEOUT_S + 5 and not answer:
            try:
                s.sendall(b"\xff")  # one byte every 0.5 s
                answer = s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        answered_after = time.monotonic() - start
        closed, rest = closed_within(s, 3)  # the body can come in a segment of its own
        answer += rest
        assert b'"body_timeout"' in answer and answered_after < BODY_TIMEOUT_S + 3, answer[:300]
        assert closed, "the connection stayed open after the 408"
    assert_healthy(client)


def test_idle_connections_count_for_nothing(server, client):
    """--limit-concurrency counts requests in flight, not open sockets: idle connections (beyond the limit)
    neither turn probes away nor block requests."""
    sockets = [socket.create_connection(("127.0.0.1", port_of(server))) for _ in range(2 * LIMIT_CONCURRENCY)]
    try:
        time.sleep(0.2)
        with httpx.Client(base_url=server, timeout=30) as c:
            assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
            assert_healthy(c)
    finally:
        for s in sockets:
            s.close()


def test_websocket_origin(server):
    ws_client = pytest.importorskip("websockets.sync.client")
    url = server.replace("http", "ws") + "/v1/stream"
    with pytest.raises(Exception) as refused:
        with ws_client.connect(url, origin="http://evil.example") as ws:
            ws.recv(timeout=10)
    assert "403" in str(refused.value) or "1008" in str(refused.value)
    with ws_client.connect(url, origin=server, max_size=None) as ws:  # the page this server serves
        ws.send(bus_bytes())
        assert json.loads(ws.recv(timeout=60))["type"] == "detections"


def test_client_disconnects_mid_stream(server, client):
    for _ in range(3):
        with httpx.Client(base_url=server, timeout=60) as c:
            with c.stream("POST", "/v1/detect/stream", content=bus_bytes(),
                          headers={"content-type": "image/jpeg"}) as r:
                first = next(r.iter_lines())
                assert json.loads(first)["t"] == 1
            # leaving the block closes the connection before the stream ends
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as s:  # half a request
        s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n"
                  + bus_bytes()[:100])
    assert_healthy(client)
    assert client.get("/readyz").status_code == 200


def test_sigterm_readiness_drain_exit_zero(tiny_ckpt):
    """Graceful shutdown: /readyz answers 503 as soon as SIGTERM arrives, a stream in progress still ends with
    its final event, the workers drain, and the exit status is 0."""
    proc, base, log = start_server(tiny_ckpt, "--max-sleep", "256", "--shutdown-delay-s", "2")
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            with c.stream("POST", "/v1/detect/stream", content=bus_bytes(), params={"sleep": 250, "burst": 1},
                          headers={"content-type": "image/jpeg"}) as r:
                lines = r.iter_lines()
                assert json.loads(next(lines))["t"] == 1
                proc.terminate()
                time.sleep(0.3)
                with httpx.Client(base_url=base, timeout=10) as other:
                    ready = other.get("/readyz")
                assert ready.status_code == 503 and ready.json()["error"] == "stopping"
                events = [json.loads(x) for x in lines if x.strip()]
        assert events[-1]["type"] == "final" and events[-1]["steps"] == 254
        assert proc.wait(timeout=30) == 0
        text = log.read_text(errors="replace")
        assert "worker(s) drained" in text and "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
        log.unlink(missing_ok=True)


def serve_fails(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "casc", "serve", "--port", str(free_port()), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_unavailable_device_is_one_clear_line(tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = serve_fails("--model", str(tiny_ckpt), "--allow-unverified", "--device", "cuda")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "CUDA is not available" in r.stderr, r.stderr


def test_unverified_and_tampered_checkpoints_are_refused(tiny_ckpt, tmp_path):
    from detector.weights import load_manifest

    r = serve_fails("--model", str(tiny_ckpt))
    assert r.returncode == 2 and "--allow-unverified" in r.stderr and "sha256" in r.stderr, r.stderr
    manifest = load_manifest()
    if "yolov8n-bundled" not in manifest:
        pytest.skip("no bundled yolov8n in the manifest")
    tampered = tmp_path / "yolov8n-bundled.pt"
    data = bytearray(manifest["yolov8n-bundled"].path.read_bytes())
    data[-100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    for extra in ((), ("--allow-unverified",)):  # never under the bundled model's name
        r = serve_fails("--model", str(tampered), *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "yolov8n-bundled" in r.stderr, r.stderr


def test_a_copy_of_a_bundled_checkpoint_is_served_under_its_manifest_name(tmp_path):
    from detector.weights import load_manifest
    from service.backends import load_backend

    manifest = load_manifest()
    if "yolov8n-bundled" not in manifest:
        pytest.skip("no bundled yolov8n in the manifest")
    copy = tmp_path / "renamed.pt"
    shutil.copyfile(manifest["yolov8n-bundled"].path, copy)
    backend = load_backend(str(copy))
    assert backend.name == "yolov8n-bundled" and backend.verified
    assert backend.sha256 == manifest["yolov8n-bundled"].sha256 and "path" not in backend.describe()


# --- the web page in headless Chromium ------------------------------------------------------------------

def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_poll(url: str, expr: str, profile: Path, finished, timeout_s: float = 60) -> dict:
    """Open ``url`` in headless Chromium with every host but 127.0.0.1 unresolvable (as offline), evaluate the
    JSON-returning JavaScript ``expr`` until ``finished(state)``; the last state."""
    browser = chromium_binary()
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); the page is not tested")
    ws_client = pytest.importorskip("websockets.sync.client")
    profile.mkdir()
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
           f"--user-data-dir={profile}", "--remote-debugging-port=0", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline and proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        page = None
        while page is None:
            assert time.monotonic() < deadline, "no page target"
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            page = next((t for t in targets if t.get("type") == "page" and t["url"].startswith(url.split("?")[0])),
                        None)
            time.sleep(0.1)
        with ws_client.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            state, msg_id = {}, 0
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                msg_id += 1
                ws.send(json.dumps({"id": msg_id, "method": "Runtime.evaluate",
                                    "params": {"expression": expr, "returnByValue": True}}))
                while True:
                    reply = json.loads(ws.recv(timeout=10))
                    if reply.get("id") == msg_id:
                        break
                value = reply.get("result", {}).get("result", {}).get("value")
                state = json.loads(value) if value else state  # None while the page is still loading
                if finished(state):
                    break
                time.sleep(0.2)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return state


def test_web_page_in_chromium(server, tmp_path):
    expr = ("JSON.stringify({done: document.getElementById('stats').dataset.done, "
            "step: document.getElementById('stats').dataset.step, "
            "boxes: document.getElementById('stats').dataset.boxes, "
            "status: document.getElementById('status').textContent, events: window.streamEvents || [], "
            "painted: [document.getElementById('canvas').width, document.getElementById('canvas').height]})")
    state = chromium_poll(f"{server}/?demo=/demo-image&conf=0.3", expr, tmp_path / "profile",
                          lambda st: st.get("done") in ("1", "error"))
    assert state.get("done") == "1", state
    events = state["events"]
    steps = [e["t"] for e in events if e["type"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 5  # the step counter advanced step by step
    assert events[-1]["type"] == "final" and int(state["step"]) == steps[-1]
    assert int(state["boxes"]) > 0 and events[-1]["boxes"] == int(state["boxes"])  # boxes drawn
    assert state["painted"] == [810, 1080]  # the canvas took the photo's size


def test_web_page_video_shows_steps_and_energy_per_frame(tiny_ckpt, tmp_path):
    """The page's video section uploads a clip (here fetched from the same origin: /demo-image serves it) and
    lists every frame's run (keyframe or delta), steps and energy as the NDJSON lines arrive."""
    if not chromium_binary():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); the page is not tested")
    clip = make_video(tmp_path / "clip.avi", frames=5)
    proc, base, _ = start_server(tiny_ckpt, "--demo-image", str(clip))
    try:
        expr = ("JSON.stringify({done: document.getElementById('video-status').dataset.done, "
                "status: document.getElementById('video-status').textContent, frames: window.videoFrames || [], "
                "rows: document.querySelectorAll('#video-frames tbody tr').length})")
        state = chromium_poll(f"{base}/?video=/demo-image&conf=0.1", expr, tmp_path / "profile",
                              lambda st: st.get("done") in ("1", "error"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert state.get("done") == "1", state
    frames = state["frames"]
    assert [f["keyframe"] for f in frames] == [True, False, False, False, False] and state["rows"] == 5
    assert all(f["steps"] < frames[0]["steps"] and f["energy_uj"] < frames[0]["energy_uj"] for f in frames[1:])
    assert "delta frames" in state["status"]


def test_docs_render_offline_in_chromium(server, tmp_path):
    """Swagger UI's assets come from the package: /docs renders the operations with no other host reachable."""
    expr = ("JSON.stringify({title: (document.querySelector('.swagger-ui .info .title') || {}).textContent || '', "
            "operations: document.querySelectorAll('.swagger-ui .opblock').length})")
    state = chromium_poll(f"{server}/docs", expr, tmp_path / "profile", lambda st: st.get("operations", 0) >= 5)
    assert "CASC spiking detectors" in state.get("title", ""), state
    assert state["operations"] >= 5, state


# --- fuzzing the OpenAPI schema ---------------------------------------------------------------------------

def test_fuzz_openapi_no_5xx(server, client):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis import strategies as st

    for media in ("image/jpeg", "image/png", "image/webp", "image/bmp", "video/mp4", "video/x-msvideo",
                  "application/octet-stream"):
        schemathesis.openapi.media_type(media, st.binary(max_size=2048) | st.just(bus_bytes()))
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    failures, calls = [], 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy()

        @settings(max_examples=12, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @schemathesis_given(strategy)
        def run(case):
            nonlocal calls
            if time.monotonic() - started > 60:
                return
            calls += 1
            response = case.call(base_url=server, timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.query} -> {response.status_code} {response.text[:200]}")

        run()
    assert calls >= 20
    assert not failures, failures
    assert_healthy(client)


def schemathesis_given(strategy):
    from hypothesis import given

    return given(case=strategy)


def test_serve_without_model_and_empty_manifest_is_a_clear_error(tmp_path):
    env = {**os.environ, "CASC_WEIGHTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "casc", "serve", "--port", str(free_port())], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no --model given" in r.stderr and "manifest" in r.stderr
    r = subprocess.run([sys.executable, "-m", "casc", "serve", "--model", str(tmp_path / "missing.pt")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "neither a bundled model" in r.stderr
