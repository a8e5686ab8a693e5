"""Prometheus text exposition, hand-written (no extra dependency): counters, histograms, gauges."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(pairs: dict) -> str:
    if not pairs:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in sorted(pairs.items()))
    return "{" + body + "}"


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, method, status) -> n
        self.latency = {}  # endpoint -> histogram
        self.spikes = defaultdict(float)  # model -> spikes
        self.images = defaultdict(int)  # model -> images run
        self.batches = {}  # model -> batch-size histogram
        self.inference = {}  # model -> histogram of seconds per predict call
        self.rejected = defaultdict(int)  # (model, reason) -> n
        self.ws_dropped = 0
        self.queue_depth = lambda: {}  # set by the app: model -> depth

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, method, status)] += 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        with self.lock:
            self.batches.setdefault(model, _Histogram(BATCH_BUCKETS)).observe(size)
            self.inference.setdefault(model, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def add_result(self, model: str, spikes: float | None) -> None:
        with self.lock:
            self.images[model] += 1
            if spikes:
                self.spikes[model] += float(spikes)

    def reject(self, model: str, reason: str) -> None:
        with self.lock:
            self.rejected[(model, reason)] += 1

    def drop_frames(self, n: int) -> None:
        with self.lock:
            self.ws_dropped += n

    def render(self) -> str:
        out: list[str] = []

        def header(name, kind, text):
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        def histogram(name, labels, h):
            for b, c in zip(h.buckets, h.counts):
                out.append(f"{name}_bucket{_labels({**labels, 'le': repr(float(b))})} {c}")
            out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {h.count}")
            out.append(f"{name}_sum{_labels(labels)} {h.sum:.6f}")
            out.append(f"{name}_count{_labels(labels)} {h.count}")

        with self.lock:
            header("casc_http_requests_total", "counter", "HTTP requests by endpoint, method and status")
            for (ep, method, status), n in sorted(self.requests.items()):
                out.append(f"casc_http_requests_total{_labels({'endpoint': ep, 'method': method, 'status': status})} {n}")
            header("casc_http_request_duration_seconds", "histogram", "HTTP request latency (until the body ends)")
            for ep, h in sorted(self.latency.items()):
                histogram("casc_http_request_duration_seconds", {"endpoint": ep}, h)
            header("casc_images_total", "counter", "images (or frames) run through a model")
            for model, n in sorted(self.images.items()):
                out.append(f"casc_images_total{_labels({'model': model})} {n}")
            header("casc_spikes_total", "counter", "spike events emitted, all images and steps")
            for model, n in sorted(self.spikes.items()):
                out.append(f"casc_spikes_total{_labels({'model': model})} {n:.1f}")
            header("casc_batch_size", "histogram", "images per predict call (micro-batching)")
            for model, h in sorted(self.batches.items()):
                histogram("casc_batch_size", {"model": model}, h)
            header("casc_inference_seconds", "histogram", "seconds per predict call")
            for model, h in sorted(self.inference.items()):
                histogram("casc_inference_seconds", {"model": model}, h)
            header("casc_rejected_total", "counter", "requests rejected (queue full, timeout, client gone; model \"-\": "
                   "over --limit-concurrency)")
            for (model, reason), n in sorted(self.rejected.items()):
                out.append(f"casc_rejected_total{_labels({'model': model, 'reason': reason})} {n}")
            header("casc_ws_dropped_frames_total", "counter", "live frames dropped because a newer one arrived")
            out.append(f"casc_ws_dropped_frames_total {self.ws_dropped}")
        header("casc_queue_depth", "gauge", "jobs waiting or running per model worker")
        for model, depth in sorted(self.queue_depth().items()):
            out.append(f"casc_queue_depth{_labels({'model': model})} {depth}")
        return "\n".join(out) + "\n"
