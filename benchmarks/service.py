"""Service benchmark: bounded load on 127.0.0.1 against a real ``casc serve`` process; prints figures.

    python benchmarks/service.py                       # tiny random YOLOv8n QANN at imgsz 256, 10 s per run
    python benchmarks/service.py --model yolov8n-bundled --duration 20 --concurrency 8 32
    python benchmarks/service.py --hostile --duration 60 # both bundled models, 16 clients, clean vs hostile mix
    python benchmarks/service.py --sleep-bound          # sleep steps "auto" uses on the bundled val images
    python benchmarks/service.py --abuse                # the default model: burst, abandoned requests, 16-bit images

Figures: requests/s, p50/p95 latency, errors, server RSS over each run (sampled every second), at 1, 8 and 16
clients (``--concurrency``); time to the first
streamed event vs the full answer; ratios
  * service latency at concurrency 1 / in-process ``predict`` (same image, same thread count; target <= 1.25)
  * throughput with micro-batching / without (``--max-batch 1``) at concurrency 8 (target >= 1.5).
Client and server share this machine's cores: read the ratios with that in mind.

``--hostile``: the hardening target. Both bundled models are served (default settings); 16 clients send normal
requests for ``--duration`` s (clean run), then again with hostile clients mixed in (header bombs, tiny lossless
6000x6000 WebPs, 4500x4500 16-bit PNGs, 24 Mpx JPEGs, a 720p video, 1x20000 strips, truncated files, playlists /
concat lists / images as video, bad WebSocket frames, slow-header and slow-body connections, and maximum-cost
requests). Printed: normal requests' p50/p95 in both runs and their ratio (target <= 2), the 5xx count over the
bad inputs (target 0; the maximum-cost requests and the large images and video are valid requests, shown but not
counted: under load they may time out), peak server RSS (target < 3 GB), and both runs' peak RSS above idle
(after the warm-up) against the in-flight budget + 300 MB.

``--abuse``: the first QANN of the manifest (default settings but ``--limit-concurrency``/``--queue-size`` as
given): a burst of ``--burst`` requests at once with 70 idle sockets open (served, refused, other statuses,
/healthz statuses during it); eight maximum-cost ``/v1/detect`` requests dropped after 0.8 s (server CPU seconds in
the second after); six concurrent 4500 x 4500 16-bit PNGs (peak RSS above idle, against the in-flight budget).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detector.models.yolo import prepare_ultralytics  # noqa: E402

prepare_ultralytics()  # offline, before the asset paths below import ultralytics


def tiny_model(path: Path, imgsz: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_service import make_tiny_checkpoint

    return make_tiny_checkpoint(path, imgsz=imgsz)


def start(model: str | list[str], threads: int, extra: list[str], defaults: bool = False):
    """A ``casc serve`` process; ``defaults``: the service's own queue and timeout settings."""
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from test_service import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    models = [x for m in ([model] if isinstance(model, str) else model) for x in ("--model", m)]
    tuning = [] if defaults else ["--queue-size", "256", "--timeout-s", "120"]
    proc = subprocess.Popen([sys.executable, "-m", "casc", "serve", *models, "--port", str(port),
                             "--threads", str(threads), "--log-level", "warning", "--allow-unverified", *tuning,
                             *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("server not ready")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class RSSOverTime:
    """Samples a process's RSS every ``every_s`` seconds in a thread until it ends; ``samples`` and ``peak`` in MB."""

    def __init__(self, pid: int, every_s: float = 1.0):
        import threading

        self.pid, self.every_s, self.samples = pid, every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                self.samples.append(rss_mb(self.pid))
            except Exception:  # the process ended
                return
            self._stop.wait(self.every_s)

    @property
    def peak(self) -> float:
        return max(self.samples, default=0.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def line(self) -> str:
        return "RSS over time (MB, every {:g} s): {}".format(self.every_s, " ".join(f"{v:.0f}" for v in self.samples))


async def load(base: str, image: bytes, concurrency: int, duration: float, params: dict) -> dict:
    import httpx

    latencies, errors = [], 0
    stop = time.monotonic() + duration
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def user():
            nonlocal errors
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/detect", content=image, params=params,
                                          headers={"content-type": "image/jpeg"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        start = time.monotonic()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    return {"rps": len(latencies) / elapsed, "p50": pct(latencies, 50), "p95": pct(latencies, 95),
            "n": len(latencies), "errors": errors}


def first_event_vs_full(base: str, image: bytes, params: dict, repeats: int = 5) -> tuple[float, float, float]:
    import httpx

    first, stream_total, full = [], [], []
    with httpx.Client(base_url=base, timeout=120) as c:
        for _ in range(repeats):
            t0 = time.perf_counter()
            with c.stream("POST", "/v1/detect/stream", content=image, params=params,
                          headers={"content-type": "image/jpeg"}) as r:
                lines = r.iter_lines()
                next(lines)
                first.append(time.perf_counter() - t0)
                for _ in lines:
                    pass
            stream_total.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            c.post("/v1/detect", content=image, params=params, headers={"content-type": "image/jpeg"})
            full.append(time.perf_counter() - t0)
    return statistics.median(first), statistics.median(stream_total), statistics.median(full)


def in_process_predict(model: str, image_path: Path, params: dict, threads: int, repeats: int) -> float:
    import numpy as np
    import torch
    from PIL import Image

    from service.backends import Params, load_backend

    torch.set_num_threads(threads)
    backend = load_backend(model, allow_unverified=True)  # the benchmark's own tiny model is in no manifest
    array = np.asarray(Image.open(image_path).convert("RGB"))
    p = Params(conf=params.get("conf", 0.25))
    backend.predict([array], p)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.predict([array], p)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


BUNDLED = ("yolov8n-bundled", "rcnn-r18-bundled")


def sleep_bound(models=BUNDLED, images: int = 48, threads: int = 1) -> None:
    """The most sleep steps ``sleep="auto"`` takes on the bundled val images, with burst sleep and with burst=1
    (what the service's default --max-sleep is chosen from)."""
    import torch

    from detector.data import bundled_root
    from detector.images import read_image
    from detector.weights import load_detector

    torch.set_num_threads(threads)
    files = sorted((bundled_root() / "images" / "val").glob("*.jpg"))[:images]
    arrays = [read_image(f) for f in files]
    for name in models:
        model = load_detector(name)
        count = len(arrays) if name.startswith("yolo") else max(1, len(arrays) // 4)  # R-CNN is slower
        for burst in (None, 1):
            sleeps, settled = [], []
            for i in range(0, count, 8):
                batch = arrays[i:min(i + 8, count)]
                out = model.predict(batch, sleep="auto", burst=burst, color="rgb", max_sleep=256)
                sleeps += [(max(r.stage_steps.values()) if r.stage_steps else r.steps) - r.wake for r in out]
                settled += [r.settled for r in out]
            print(f"{name}: burst {burst or 'L (default)'}: sleep steps of 'auto' max {max(sleeps)}, "
                  f"mean {statistics.mean(sleeps):.1f} over {count} images (per stage for R-CNN); all settled: "
                  f"{all(settled)}")


def hostile_bodies(tmp: Path) -> list[tuple[str, str, bytes, str, dict]]:
    """(name, endpoint, body, content type, params) of the hostile uploads; all must get a 4xx."""
    import io

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from test_service import hostile_videos, make_video, png_header_bomb
    from test_service_abuse import sixteen_bit_png

    def enc(array, fmt, **kw):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt, **kw)
        return buf.getvalue()

    big_webp = enc(np.zeros((6000, 6000, 3), np.uint8), "WEBP", lossless=True)  # ~1.4 KB, 36 Mpx
    noise = np.random.default_rng(0).integers(0, 255, (4000, 6000, 3), dtype=np.uint8)
    big_jpeg = enc(noise, "JPEG", quality=75)  # a 24 Mpx photo-sized upload
    clip = make_video(tmp / "clip.avi", frames=30, size=(1280, 720)).read_bytes()
    videos = hostile_videos(tmp)
    jpeg = Path(__import__("ultralytics").__file__).parent.joinpath("assets", "bus.jpg").read_bytes()
    return [("header_bomb", "/v1/detect", png_header_bomb(100_000, 100_000), "image/png", {}),
            ("webp_6000x6000", "/v1/detect", big_webp, "image/webp", {}),
            ("png16_4500x4500", "/v1/detect", sixteen_bit_png(4500), "image/png", {}),
            ("jpeg_6000x4000", "/v1/detect", big_jpeg, "image/jpeg", {"model": BUNDLED[1]}),
            ("video_720p", "/v1/video", clip, "video/x-msvideo", {"every": 3}),
            ("strip_1x20000", "/v1/detect", enc(np.zeros((1, 20000, 3), np.uint8), "PNG"), "image/png", {}),
            ("truncated_jpeg", "/v1/detect", jpeg[:4000], "image/jpeg", {}),
            ("not_an_image", "/v1/detect/stream", b"hello" * 100, "image/jpeg", {}),
            ("wake_too_big", "/v1/detect", jpeg, "image/jpeg", {"wake": 64, "sleep": 256}),
            ("unknown_param", "/v1/detect", jpeg, "image/jpeg", {"sleeps": 3}),
            ("hls_playlist", "/v1/video", videos["hls_file_url"], "video/mp4", {}),
            ("ffconcat", "/v1/video", videos["ffconcat_absolute"], "video/mp4", {}),
            ("png_as_video", "/v1/video", videos["png_as_video"], "video/mp4", {}),
            ("webp_6000_stream", "/v1/detect/stream", big_webp, "image/webp", {"model": BUNDLED[1]})]


async def hostile_client(base: str, bodies, stop: float, tally: dict, pause_s: float) -> None:
    """Cycles through the hostile uploads, a maximum-cost request and bad WebSocket frames."""
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        i = 0
        while time.monotonic() < stop:
            kind = i % (len(bodies) + 2)
            i += 1
            try:
                if kind < len(bodies):
                    name, endpoint, body, ctype, params = bodies[kind]
                    r = await client.post(endpoint, content=body, params=params, headers={"content-type": ctype})
                    tally.setdefault(name, []).append(r.status_code)
                elif kind == len(bodies):  # the most a request may cost: 4L wake, max sleep, one spike per step
                    r = await client.post("/v1/detect", content=BUS_BYTES, params={
                        "model": BUNDLED[1], "wake": 16, "sleep": 32, "burst": 1}, headers={"content-type": "image/jpeg"})
                    tally.setdefault("max_cost", []).append(r.status_code)
                else:
                    tally.setdefault("ws_bad_frames", []).append(await bad_ws_frames(base))
            except httpx.HTTPError as error:
                tally.setdefault("client_error", []).append(type(error).__name__)
            await asyncio.sleep(pause_s)


async def slow_clients(base: str, stop: float, tally: dict, count: int) -> None:
    """``count`` connections at a time that trickle their headers or their body (slow-loris)."""
    port = int(base.rsplit(":", 1)[1])

    async def one(headers_too: bool):
        while time.monotonic() < stop:
            tally.setdefault("slow_headers" if headers_too else "slow_body", []).append(
                await slow_client(port, headers_too))

    await asyncio.gather(*(one(k % 2 == 0) for k in range(count)))


BUS_BYTES = Path(__import__("ultralytics").__file__).parent.joinpath("assets", "bus.jpg").read_bytes()


async def slow_client(port: int, headers_too: bool) -> str:
    """A request trickled in one byte a second (from its headers, or from its body): how the server ended it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 9000\r\n\r\n"
    try:
        if not headers_too:
            writer.write(head)
        for k in range(120):
            writer.write(head[k:k + 1] if headers_too else b"\xff")
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(200), 1.0)
            except asyncio.TimeoutError:
                continue
            return data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "closed"
        return "still open"
    except OSError:
        return "closed"
    finally:
        writer.close()


async def bad_ws_frames(base: str) -> str:
    from websockets.asyncio.client import connect

    async with connect(base.replace("http", "ws") + "/v1/stream", max_size=None) as ws:
        await ws.send(b"junk")
        first = json.loads(await asyncio.wait_for(ws.recv(), 60))
        await ws.send(BUS_BYTES)
        second = json.loads(await asyncio.wait_for(ws.recv(), 60))
    return f"{first.get('error')}+{second.get('type')}"


async def normal_clients(base: str, images: dict[str, bytes], concurrency: int, stop: float,
                         rcnn_clients: int) -> dict:
    import httpx

    latencies, errors = [], []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def user(k: int):
            model = BUNDLED[1] if k < rcnn_clients else BUNDLED[0]
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/detect", content=images[model], params={"model": model},
                                          headers={"content-type": "image/jpeg"})
                    ok = r.status_code == 200
                    code = r.status_code
                except httpx.HTTPError as error:
                    ok, code = False, type(error).__name__
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(code)
        await asyncio.gather(*(user(k) for k in range(concurrency)))
    return {"n": len(latencies), "p50": pct(latencies, 50), "p95": pct(latencies, 95), "errors": errors}


async def mixed(base: str, images, concurrency: int, duration: float, bodies, hostile: int, pause_s: float,
                rcnn_clients: int, slow: int = 0):
    stop = time.monotonic() + duration
    tally: dict = {}
    results = await asyncio.gather(normal_clients(base, images, concurrency, stop, rcnn_clients),
                                   slow_clients(base, stop, tally, slow),
                                   *(hostile_client(base, bodies, stop, tally, pause_s) for _ in range(hostile)))
    return results[0], tally


def hostile_benchmark(args) -> int:
    from detector.data import bundled_root
    from service.config import Settings

    image = (bundled_root() / "images" / "val" / "000000.jpg").read_bytes()
    images = {m: image for m in BUNDLED}
    tmp = tempfile.TemporaryDirectory()
    bodies = hostile_bodies(Path(tmp.name))
    proc, base = start(list(BUNDLED), args.threads, [], defaults=True)
    try:
        print(f"server: {', '.join(BUNDLED)}, default settings, {args.threads} torch thread(s); {os.cpu_count()} "
              f"CPUs shared by client and server; RSS after start {rss_mb(proc.pid):.0f} MB")
        rcnn = round(args.clients * args.rcnn_share)
        print(f"normal clients: {args.clients - rcnn} on {BUNDLED[0]}, {rcnn} on {BUNDLED[1]} (one 256 px val image)")
        asyncio.run(mixed(base, images, 4, 3.0, bodies, 0, 0, 1))  # warm-up
        idle_rss, budget_mb = rss_mb(proc.pid), Settings().max_inflight_mb
        with RSSOverTime(proc.pid, every_s=0.1) as clean_rss:
            clean, _ = asyncio.run(mixed(base, images, args.clients, args.duration, bodies, 0, 0, rcnn))
        print(f"clean:   {args.clients} clients x {args.duration:.0f} s: {clean['n']} requests, p50 "
              f"{clean['p50'] * 1000:.0f} ms, p95 {clean['p95'] * 1000:.0f} ms, errors {len(clean['errors'])}, "
              f"peak RSS {clean_rss.peak:.0f} MB")
        with RSSOverTime(proc.pid, every_s=0.1) as mixed_rss:
            dirty, tally = asyncio.run(mixed(base, images, args.clients, args.duration, bodies, args.hostile_clients,
                                             args.hostile_pause_s, rcnn, args.slow_clients))
        print(f"hostile: {args.clients} clients x {args.duration:.0f} s + {args.hostile_clients} hostile and "
              f"{args.slow_clients} slow clients: "
              f"{dirty['n']} normal requests, p50 {dirty['p50'] * 1000:.0f} ms, p95 {dirty['p95'] * 1000:.0f} ms, "
              f"errors {len(dirty['errors'])} {sorted(set(map(str, dirty['errors'])))}, peak RSS "
              f"{mixed_rss.peak:.0f} MB")
        for name, codes in sorted(tally.items()):
            print(f"  {name:18s} {len(codes):4d} x  {json.dumps(sorted(set(map(str, codes))))}")
        valid = ("max_cost", "webp_6000x6000", "webp_6000_stream", "png16_4500x4500", "jpeg_6000x4000", "video_720p",
                 "client_error")  # legitimate, if costly
        bad = [c for name, codes in tally.items() if name not in valid for c in codes
               if isinstance(c, int) and c >= 500 or isinstance(c, str) and c.startswith("HTTP/1.1 5")]
        print(f"RATIO normal p95 hostile / clean: {dirty['p95'] / clean['p95']:.2f} (target <= 2)")
        print(f"5xx over bad inputs: {len(bad)} (target 0); peak RSS {max(clean_rss.peak, mixed_rss.peak):.0f} MB "
              f"(target < 3072)")
        print(f"RSS above idle ({idle_rss:.0f} MB after warm-up): clean peak +{clean_rss.peak - idle_rss:.0f} MB, "
              f"hostile peak +{mixed_rss.peak - idle_rss:.0f} MB (target: at most the in-flight budget {budget_mb:.0f} "
              f"+ 300 MB)")
    finally:
        proc.terminate()
        code = proc.wait(60)
        print(f"server exit status after SIGTERM: {code}")
    tmp.cleanup()
    return 0


def abuse_benchmark(args) -> int:
    """The hostile-load targets, measured on the default model (see the module docstring)."""
    import socket
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from test_service_abuse import cpu_used, heavy_requests, raw_request, sixteen_bit_png

    from service.backends import default_model_name
    from service.config import Settings

    model, budget_mb = default_model_name(), Settings().max_inflight_mb
    proc, base = start(model, args.threads, ["--queue-size", str(args.queue_size), "--limit-concurrency",
                                             str(args.limit_concurrency)], defaults=True)
    port, image = int(base.rsplit(":", 1)[1]), Path(args.image).read_bytes()
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(70)]
        probes, stop = [], threading.Event()

        def probe():
            with httpx.Client(base_url=base, timeout=5) as c:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    probes.append((c.get("/healthz").status_code, time.perf_counter() - t0))
                    time.sleep(0.1)

        prober = threading.Thread(target=probe)
        prober.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.burst) as pool:
            replies = list(pool.map(lambda _: raw_request(port, "/v1/detect", image, timeout=120), range(args.burst)))
        took = time.monotonic() - t0
        stop.set()
        prober.join()
        for s in idle:
            s.close()
        statuses = [r[0] for r in replies]
        codes = sorted({json.loads(r[2]).get("error") for r in replies if r[0] == 503})
        print(f"burst of {args.burst} requests + 70 idle sockets ({model}, --queue-size {args.queue_size}, "
              f"--limit-concurrency {args.limit_concurrency}): {statuses.count(200)} served, {statuses.count(503)} "
              f"refused with 503 {codes}, {len(statuses) - statuses.count(200) - statuses.count(503)} other; "
              f"{took:.1f} s; /healthz during it: {len(probes)} probes, statuses {sorted({p[0] for p in probes})}, "
              f"slowest {max(p[1] for p in probes) * 1000:.0f} ms")

        sockets = heavy_requests(port, image)
        time.sleep(0.8)
        busy = cpu_used(proc.pid, 0.5) / 0.5
        for s in sockets:
            s.close()
        seconds = [cpu_used(proc.pid, 1.0) for _ in range(3)]
        print(f"abandoned: 8 max-cost requests dropped after 0.8 s (server CPU {busy:.2f} s/s while they ran); "
              f"server CPU seconds in each second after: {' '.join(f'{v:.2f}' for v in seconds)}")

        data = sixteen_bit_png(4500)
        with httpx.Client(base_url=base, timeout=120) as c:
            idle_rss = rss_mb(proc.pid)
            with RSSOverTime(proc.pid, every_s=0.01) as peak, ThreadPoolExecutor(6) as pool:
                statuses = list(pool.map(lambda _: c.post("/v1/detect", content=data, headers={
                    "content-type": "image/png"}).status_code, range(6)))
        print(f"16-bit: 6 concurrent 4500x4500 16-bit PNGs ({len(data) // 1024} KB each): statuses {statuses}; "
              f"peak RSS {peak.peak - idle_rss:.0f} MB above idle ({idle_rss:.0f} MB); in-flight budget "
              f"{budget_mb:.0f} MB (target: at most budget + 300)")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint path or manifest name (default: tiny random)")
    parser.add_argument("--imgsz", type=int, default=256, help="imgsz of the default tiny random model")
    parser.add_argument("--image", default=str(Path(__import__("ultralytics").__file__).parent / "assets" / "bus.jpg"))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16], help="clients (1 always runs)")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--hostile", action="store_true", help="clean vs hostile mix on both bundled models")
    parser.add_argument("--clients", type=int, default=16, help="--hostile: normal clients")
    parser.add_argument("--hostile-clients", type=int, default=2)
    parser.add_argument("--slow-clients", type=int, default=4, help="--hostile: slow-loris connections at a time")
    parser.add_argument("--rcnn-share", type=float, default=0.25, help="--hostile: normal clients on the R-CNN")
    parser.add_argument("--hostile-pause-s", type=float, default=0.25, help="--hostile: pause between hostile requests")
    parser.add_argument("--sleep-bound", action="store_true", help="sleep steps of sleep='auto' on the bundled data")
    parser.add_argument("--abuse", action="store_true", help="burst, abandoned requests and 16-bit images on the "
                                                             "default model")
    parser.add_argument("--burst", type=int, default=120, help="--abuse: requests at once")
    parser.add_argument("--queue-size", type=int, default=16, help="--abuse: the server's --queue-size")
    parser.add_argument("--limit-concurrency", type=int, default=64, help="--abuse: the server's --limit-concurrency")
    args = parser.parse_args()
    if args.abuse:
        return abuse_benchmark(args)
    if args.sleep_bound:
        sleep_bound(threads=args.threads)
        return 0
    if args.hostile:
        return hostile_benchmark(args)

    tmp = tempfile.TemporaryDirectory()
    model = args.model or str(tiny_model(Path(tmp.name) / f"tiny{args.imgsz}.pt", args.imgsz))
    image = Path(args.image).read_bytes()
    params = {"conf": args.conf}
    print(f"model {args.model or f'tiny random yolov8n QANN, imgsz {args.imgsz}'}; image {Path(args.image).name}; "
          f"server threads {args.threads}; {os.cpu_count()} CPUs (shared by client and server)")

    batched = ["--batch-window-ms", str(args.batch_window_ms), "--max-batch", str(args.max_batch)]
    proc, base = start(model, args.threads, batched)
    try:
        asyncio.run(load(base, image, 2, 2.0, params))  # warm-up
        results = {}
        for c in [1, *[c for c in args.concurrency if c != 1]]:
            with RSSOverTime(proc.pid) as rss:
                r = asyncio.run(load(base, image, c, args.duration, params))
            results[c] = r
            print(f"concurrency {c:2d}: {r['rps']:6.2f} req/s  p50 {r['p50'] * 1000:7.1f} ms  "
                  f"p95 {r['p95'] * 1000:7.1f} ms  errors {r['errors']}"
                  f"  (micro-batching window {args.batch_window_ms} ms, max {args.max_batch})")
            print(f"  {rss.line()}")
        one = results[1]
        first, stream_total, full = first_event_vs_full(base, image, params)
        print(f"stream: first event {first * 1000:.1f} ms, whole stream {stream_total * 1000:.1f} ms; "
              f"/v1/detect {full * 1000:.1f} ms (medians of 5, concurrency 1)")
        if 8 not in results:
            results[8] = asyncio.run(load(base, image, 8, args.duration, params))
    finally:
        proc.terminate()
        proc.wait(30)

    proc, base = start(model, args.threads, ["--batch-window-ms", "0", "--max-batch", "1"])
    try:
        asyncio.run(load(base, image, 2, 2.0, params))
        unbatched = asyncio.run(load(base, image, 8, args.duration, params))
        print(f"concurrency  8 without batching: {unbatched['rps']:6.2f} req/s  p50 {unbatched['p50'] * 1000:7.1f} ms"
              f"  p95 {unbatched['p95'] * 1000:7.1f} ms  errors {unbatched['errors']}")
    finally:
        proc.terminate()
        proc.wait(30)

    local = in_process_predict(model, Path(args.image), params, args.threads, repeats=10)
    print(f"in-process predict (same image, {args.threads} thread(s)): {local * 1000:.1f} ms")
    print(f"RATIO service p50 latency at concurrency 1 / in-process predict: {one['p50'] / local:.2f} (target <= 1.25)")
    print(f"RATIO throughput at concurrency 8, micro-batching / none: {results[8]['rps'] / unbatched['rps']:.2f} "
          f"(target >= 1.5)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
