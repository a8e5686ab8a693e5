"""Service benchmark: bounded load on 127.0.0.1 against a real ``casc serve`` process; prints figures.

    python benchmarks/service.py                       # tiny random YOLOv8n QANN at imgsz 256, 10 s per run
    python benchmarks/service.py --model yolov8n-bundled --duration 20 --concurrency 8 32

Figures: requests/s, p50/p95 latency, errors, server RSS before/after, per concurrency; time to the first
streamed event vs the full answer; ratios
  * service latency at concurrency 1 / in-process ``predict`` (same image, same thread count; target <= 1.25)
  * throughput with micro-batching / without (``--max-batch 1``) at concurrency 8 (target >= 1.5).
Client and server share this machine's cores: read the ratios with that in mind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tiny_model(path: Path, imgsz: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_service import make_tiny_checkpoint

    return make_tiny_checkpoint(path, imgsz=imgsz)


def start(model: str, threads: int, extra: list[str]):
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from test_service import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "detector.cli", "serve", "--model", model, "--port", str(port),
                             "--threads", str(threads), "--log-level", "warning", "--queue-size", "256",
                             "--timeout-s", "120", *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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
    backend = load_backend(model)
    array = np.asarray(Image.open(image_path).convert("RGB"))
    p = Params(conf=params.get("conf", 0.25))
    backend.predict([array], p)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.predict([array], p)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint path or manifest name (default: tiny random)")
    parser.add_argument("--imgsz", type=int, default=256, help="imgsz of the default tiny random model")
    parser.add_argument("--image", default=str(Path(__import__("ultralytics").__file__).parent / "assets" / "bus.jpg"))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--conf", type=float, default=0.25)
    args = parser.parse_args()

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
        one = asyncio.run(load(base, image, 1, args.duration, params))
        print(f"concurrency  1: {one['rps']:6.2f} req/s  p50 {one['p50'] * 1000:7.1f} ms  "
              f"p95 {one['p95'] * 1000:7.1f} ms  errors {one['errors']}")
        results = {}
        for c in args.concurrency:
            before = rss_mb(proc.pid)
            r = asyncio.run(load(base, image, c, args.duration, params))
            results[c] = r
            print(f"concurrency {c:2d}: {r['rps']:6.2f} req/s  p50 {r['p50'] * 1000:7.1f} ms  "
                  f"p95 {r['p95'] * 1000:7.1f} ms  errors {r['errors']}  RSS {before:.0f} -> {rss_mb(proc.pid):.0f} MB"
                  f"  (micro-batching window {args.batch_window_ms} ms, max {args.max_batch})")
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
