"""Seconds per image of the bundled YOLOv8n's spiking network: PyTorch eager vs ONNX Runtime (issue 14).

The default schedule (wake = L, sleep="auto", burst = L) on bundled val images, per batch size:
PyTorch eager as ``predict`` runs it (spike / SOP recording on), PyTorch eager without recording,
and the ONNX Runtime engine (exported step graphs, IO binding). Both engines get the same number of
threads. The ratio eager / ONNX Runtime is the speed-up (issue target: >= 1.5 at batch 1 on CPU).
Every row also checks both engines against each other: steps used, largest readout difference
(float32: a sum landing on the other side of a quantization level flips it), detections per image.

    OMP_NUM_THREADS=1 python benchmarks/onnx_runtime.py                 # CPU, batch 1 and 8, 1 thread
    python benchmarks/onnx_runtime.py --threads 2 --batch 1 8 --repeats 5 --json runs/onnx_bench.json
    python benchmarks/onnx_runtime.py --provider cuda --device cuda      # with onnxruntime-gpu and a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from detector.data.synthetic import generate_bundled
from detector.weights import export_detector, load_detector


def timed(fns: dict, repeats: int) -> dict:
    """Median seconds of each ``fn()`` over ``repeats`` rounds after one warm-up; the functions take
    turns within a round, so a busy machine slows them alike."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _same_detections(a, b) -> bool:
    return (len(a) == len(b) and torch.equal(a.boxes.cls, b.boxes.cls)
            and torch.allclose(a.boxes.xyxy, b.boxes.xyxy, atol=1e-3) and torch.allclose(a.boxes.conf, b.boxes.conf, atol=1e-5))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_batch(model: str, batch: int, images: list[Path], work: Path, threads: int, provider: str,
                device: torch.device, repeats: int) -> dict:
    folder = work / f"b{batch}"
    start = time.perf_counter()
    export_detector(model, folder, batch=batch)
    export_s = time.perf_counter() - start
    eager = load_detector(model, device=device)
    engine = load_detector(model, engine="onnxruntime", export_dir=folder, provider=provider, threads=threads)
    x, _ = eager.preprocess(images[:batch])

    def run_eager(record: bool):
        def fn():
            result = eager.snn.run(x, sleep="auto", record=record)
            _sync(device)
            return result
        return fn

    expected, got = run_eager(False)(), engine.raw(x.cpu())
    error = max(float((a.cpu() - b).abs().max()) for a, b in zip(expected.readout, got.readout))
    same = [_same_detections(a, b) for a, b in zip(eager.decode([t.cpu() for t in expected.readout]),
                                                   eager.decode(got.readout))]
    row = {"batch": batch, "steps": expected.steps.tolist(), "same_steps": torch.equal(expected.steps, got.steps),
           "max_abs_readout_diff": error, "images_with_same_detections": sum(same), "export_s": export_s}
    seconds = timed({"eager": run_eager(True), "eager_no_record": run_eager(False),
                     "ort": lambda: engine.raw(x.cpu())}, repeats)
    for name, value in seconds.items():
        row[f"{name}_s_per_image"] = value / batch
    row["speedup"] = row["eager_s_per_image"] / row["ort_s_per_image"]
    row["speedup_no_record"] = row["eager_no_record_s_per_image"] / row["ort_s_per_image"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n-bundled")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both engines")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    parser.add_argument("--device", default="cpu", help="PyTorch eager's device")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = generate_bundled(work / "data", train=1, val=max(args.batch), workers=1)
        images = sorted((root / "images" / "val").glob("*.jpg"))
        print(f"{args.model}, default schedule (sleep=auto, burst=L), {args.threads} thread(s), ONNX Runtime "
              f"{args.provider}, PyTorch {args.device}; seconds per image (median of {args.repeats})")
        print(f"{'batch':>5} {'eager':>9} {'eager -rec':>10} {'ORT':>9} {'eager/ORT':>9} {'-rec/ORT':>9} "
              f"{'T':>3} {'same T':>6} {'readout diff':>12} {'same dets':>9}")
        for batch in args.batch:
            row = bench_batch(args.model, batch, images, work, args.threads, args.provider, device, args.repeats)
            rows.append(row)
            print(f"{batch:5d} {row['eager_s_per_image']:9.4f} {row['eager_no_record_s_per_image']:10.4f} "
                  f"{row['ort_s_per_image']:9.4f} {row['speedup']:9.2f} {row['speedup_no_record']:9.2f} "
                  f"{max(row['steps']):3d} {str(row['same_steps']):>6} {row['max_abs_readout_diff']:12.2e} "
                  f"{row['images_with_same_detections']:>5d}/{batch}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
