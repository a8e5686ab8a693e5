"""Runtime cost of the spiking simulation on a YOLOv8n-sized QANN or a bundled Faster R-CNN.

Prints, per batch size and execution mode: float-ANN and QANN forward time, SNN seconds per wake
step and per sleep step, total steps used by sleep="auto", and the ratio
SNN time / (T x ANN forward) measured in the same run, with and without spike/SOP recording; and, for YOLO, the
tensor operations one run dispatches with and without recording (a count, steady where times are not).
For Faster R-CNN each stage runs its own schedule on the same input (stage 2 on the QANN's RoIs), so
the ratio is (stage-1 SNN + stage-2 SNN) / (T1 x stage-1 ANN + T2 x stage-2 ANN), the ANN's BatchNorms
folded as deployed. Also checks fidelity on the chosen device: max |SNN readout - QANN output| in float64.

    python benchmarks/runtime.py                       # CPU, imgsz 320, batch 1 and 8
    python benchmarks/runtime.py --model yolov8n-bundled --threads 1
    python benchmarks/runtime.py --model yolov8n-bundled --threads 1 --cpu-time   # steadier on a shared machine
    python benchmarks/runtime.py --model rcnn-r18-bundled-l8 --threads 1
    python benchmarks/runtime.py --device cuda --batch 1 8 32
    python benchmarks/runtime.py --burst 1             # the paper's one spike per sleep step (default: burst sleep)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from detector import convert
from detector.models.yolo import SpikingYOLO, YOLOReadoutNet, build_qann
from detector.randnet import random_qann, randomise_batchnorm
from detector.spike_counts import DISABLE_ENV, fused_counter
from detector.weights import resolve


class Clock:
    """What a timing reads: wall time and the median of the rounds, or (``cpu_time``) this thread's CPU time and the
    minimum, which other processes on a shared machine disturb far less (CPU only: a GPU's work is not the thread's)."""

    def __init__(self, device: torch.device, cpu_time: bool = False):
        if cpu_time and device.type != "cpu":
            raise ValueError("--cpu-time measures the CPU thread: use it with --device cpu")
        self.device, self.cpu_time = device, cpu_time

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.thread_time() if self.cpu_time else time.perf_counter()

    def summary(self, seconds: list[float]) -> float:
        return min(seconds) if self.cpu_time else sorted(seconds)[len(seconds) // 2]


def timed(fn, repeats: int, clock: Clock) -> float:
    """Seconds of ``fn()`` over ``repeats`` runs after one warm-up (``Clock.summary`` of them)."""
    return timed_alternating({"fn": fn}, repeats, clock)["fn"]


def timed_alternating(fns: dict, repeats: int, clock: Clock) -> dict:
    """Seconds of each function, run in alternating rounds after one warm-up each, so that a ratio of two of them
    is measured under the same machine load."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock.now()
            fn()
            times[name].append(clock.now() - start)
    return {name: clock.summary(t) for name, t in times.items()}


@torch.no_grad()
def fidelity(device: torch.device, imgsz: int = 128, nets: int = 30, burst: int | None = None) -> dict:
    float_model = build_qann("yolov8n.yaml", quantize=False, act="relu")
    randomise_batchnorm(float_model)
    qann = build_qann(float_model, levels=4)
    detector = SpikingYOLO.from_model(qann, imgsz=imgsz, device=device, dtype=torch.float64)
    x = torch.rand(2, 3, imgsz, imgsz, dtype=torch.float64, device=device, generator=None)
    reference = detector.qann_raw(x)
    run = detector.raw(x, wake=4, sleep="auto", burst=burst)
    error = max(float((a - b).abs().max()) for a, b in zip(run.readout, reference))
    random_error = 0.0
    for seed in range(nets):  # the exactness suite's random QANNs, on this device
        qnet = random_qann(seed, levels=(2, 4, 8)[seed % 3], depth=2 + seed % 19).double().to(device)
        xr = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
        for mode in ("step", "multistep"):
            out = convert(qnet).run(xr, wake=qnet.blocks[0].act.levels, sleep="auto", mode=mode, burst=burst).readout
            random_error = max(random_error, max(float((a - b).abs().max()) for a, b in zip(out, qnet(xr))))
    return {"imgsz": imgsz, "max_abs_error_float64": error, "steps": run.steps.tolist(), "settled": run.settled.tolist(),
            "random_nets": nets, "random_nets_max_abs_error_float64": random_error}


def networks(model: str | None):
    """(float model, QANN, imgsz, images or None): a bundled/trained pair, or a random-init YOLOv8n."""
    if model is None:
        float_model = build_qann("yolov8n.yaml", quantize=False, act="relu")
        randomise_batchnorm(float_model)
        return float_model, build_qann(float_model, levels=4), None, None
    from detector.data import open_dataset
    from detector.models.yolo import load_checkpoint
    from detector.weights import load_manifest, resolve

    entry = resolve(model)
    qann, meta = load_checkpoint(entry.path)
    float_model, _ = load_checkpoint(load_manifest()[entry.float_model].path)
    dataset = open_dataset("bundled", "val")
    return float_model, qann, meta["imgsz"], [dataset.load_image(i)[..., ::-1].copy() for i in range(32)]


@torch.no_grad()
def measure(batch: int, imgsz: int, clock: Clock, repeats: int, model: str | None,
            burst: int | None = None) -> list[dict]:
    device = clock.device
    float_model, qann, trained_imgsz, images = networks(model)
    imgsz = trained_imgsz or imgsz
    ann = YOLOReadoutNet(float_model.fuse(verbose=False)).to(device).eval()  # BN folded, as deployed
    detector = SpikingYOLO.from_model(qann, imgsz=imgsz, device=device)
    snn = detector.snn
    if images:
        x = detector.preprocess([images[i % len(images)] for i in range(batch)])[0]
    else:
        x = torch.rand(batch, 3, imgsz, imgsz, device=device)
    qann_s = timed(lambda: detector.qann_raw(x), repeats, clock)
    rows = []
    for mode in ("step", "multistep"):
        wake_s = {record: timed(lambda: snn.run(x, wake=4, sleep=0, mode=mode, record=record), repeats, clock) / 4
                  for record in (False, True)}
        runs = {False: [], True: []}  # the timed runs' results (the last one's steps are reported)

        def run(record: bool):
            return lambda: runs[record].append(snn.run(x, wake=4, sleep="auto", mode=mode, record=record, burst=burst))

        # The ANN and both SNN runs in the same alternating rounds: the recording cost (on / off) and each ratio to
        # the ANN are measured under the same machine load; and, where the fused spike counter serves, a recorded run
        # that counts with eager PyTorch instead (CASC_FUSED_COUNTS=0), what recording costs without it.
        fns = {"ann": lambda: ann(x), "off": run(False), "on": run(True)}
        if fused_counter() is not None and device.type == "cpu":
            fns["on_eager"] = lambda: with_eager_counts(run(True))
        times = timed_alternating(fns, repeats, clock)
        for record in (False, True):
            total_s = times["on" if record else "off"]
            used = runs[record][-1].steps
            steps = int(used.max())
            sleep_steps = steps - 4
            sleep_s = (total_s - 4 * wake_s[record]) / sleep_steps if sleep_steps else 0.0
            rows.append({
                "batch": batch, "imgsz": imgsz, "mode": mode, "record": record, "model": model,
                "burst": burst if burst is not None else 4,
                "ann_forward_s": times["ann"], "qann_forward_s": qann_s,
                "snn_wake_step_s": wake_s[record], "snn_sleep_step_s": sleep_s,
                "steps_auto_mean": float(used.double().mean()), "steps_auto_max": steps,
                "snn_total_s": total_s, "ratio_snn_over_T_ann": total_s / (steps * times["ann"]),
                "sleep_over_wake": sleep_s / wake_s[record],
                "recording_cost": times["on"] / times["off"] - 1,
                "recording_cost_eager_counts": times["on_eager"] / times["off"] - 1 if "on_eager" in times else None,
            })
    return rows


def with_eager_counts(fn):
    """``fn()`` with recorders counting in eager PyTorch (``detector.spike_counts``: CASC_FUSED_COUNTS=0)."""
    saved = os.environ.get(DISABLE_ENV)
    os.environ[DISABLE_ENV] = "0"
    try:
        return fn()
    finally:
        if saved is None:
            del os.environ[DISABLE_ENV]
        else:
            os.environ[DISABLE_ENV] = saved


@torch.no_grad()
def tensor_operations(snn, x, mode: str = "step") -> dict:
    """Tensor operations dispatched by one default-schedule run, without and with recording (``torch.profiler``,
    top-level ``aten`` calls): a count that, unlike a time, does not move with the machine's load."""
    from torch.profiler import profile

    counts = {}
    for record in (False, True):
        snn.run(x, wake=4, sleep="auto", mode=mode, record=record)  # warm: the flow trace is not counted
        with profile() as prof:
            snn.run(x, wake=4, sleep="auto", mode=mode, record=record)
        counts[record] = sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))
    return {"mode": mode, "batch": int(x.shape[0]), "off": counts[False], "on": counts[True]}


@torch.no_grad()
def measure_rcnn(batch: int, clock: Clock, repeats: int, model: str, burst: int | None = None) -> list[dict]:
    device = clock.device
    from collections import OrderedDict

    from detector import fold_batchnorm
    from detector.data import open_dataset
    from detector.models.rcnn import MODULE_RULES, RCNNStage1, RCNNStage2, load_float_for_calibration
    from detector.weights import load_detector, load_manifest, resolve

    detector = load_detector(model, device=device)
    entry = resolve(model)
    float_model, _ = load_float_for_calibration(load_manifest()[entry.float_model].path)
    float_model.eval()
    ann1 = RCNNStage1(float_model.backbone, float_model.rpn.head).to(device).eval()
    ann2 = RCNNStage2(float_model.roi_heads.box_head, float_model.roi_heads.box_predictor).to(device).eval()
    for stage in (ann1, ann2):
        fold_batchnorm(stage, rules=MODULE_RULES)  # as deployed
    dataset = open_dataset("bundled", "val")
    image_list = detector.preprocess([dataset.load_image(i % len(dataset)) for i in range(batch)], color="rgb")[0]
    x = image_list.tensors
    features, objectness, deltas = detector.qann_stage1(x)
    features = OrderedDict(features)
    rois = detector.roi_features(features, detector.proposals(image_list, features, objectness, deltas), image_list)
    qann_s = timed(lambda: detector.qann_stage1(x), repeats, clock) + timed(lambda: detector.qann_stage2(rois),
                                                                            repeats, clock)
    wake = detector.levels
    rows = []
    for mode in ("step", "multistep"):
        for record in (False, True):
            stages, ann_s = [], []
            for snn, ann, inputs in ((detector.stage1, ann1, x), (detector.stage2, ann2, rois)):
                wake_s = timed(lambda: snn.run(inputs, wake=wake, sleep=0, mode=mode, record=record), repeats,
                               clock) / wake
                runs = []
                both = timed_alternating({"ann": lambda: ann(inputs), "snn": lambda: runs.append(snn.run(
                    inputs, wake=wake, sleep="auto", mode=mode, record=record, burst=burst))}, repeats, clock)
                ann_s.append(both["ann"])
                stages.append((wake_s, both["snn"], int(runs[-1].steps.max()), runs[-1].steps.double().mean()))
            (w1, s1, t1, m1), (w2, s2, t2, m2) = stages
            rows.append({
                "batch": batch, "imgsz": int(x.shape[-1]), "mode": mode, "record": record, "model": model,
                "burst": burst if burst is not None else wake, "rois": int(rois.shape[0]),
                "ann_forward_s": ann_s[0] + ann_s[1], "qann_forward_s": qann_s,
                "snn_wake_step_s": w1 + w2, "snn_sleep_step_s": (s1 - wake * w1) / max(t1 - wake, 1)
                + (s2 - wake * w2) / max(t2 - wake, 1),
                "steps_auto_mean": float(m1 + m2), "steps_auto_max": t1 + t2, "stage_steps": [t1, t2],
                "snn_total_s": s1 + s2, "ratio_snn_over_T_ann": (s1 + s2) / (t1 * ann_s[0] + t2 * ann_s[1]),
                "sleep_over_wake": ((s1 + s2) - wake * (w1 + w2)) / max(t1 + t2 - 2 * wake, 1) / (w1 + w2),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--burst", type=int, default=None,
                        help="spikes a neuron may emit per sleep step (default: the wake count, burst sleep; 1: the paper's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time this thread's CPU seconds (the minimum of the rounds) instead of wall time (their "
                             "median): steadier on a machine shared with other work; CPU only")
    parser.add_argument("--model", default=None, help="a trained QANN (bundled name, e.g. yolov8n-bundled) measured "
                                                      "on bundled val images; default: random-init YOLOv8n")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device, args.cpu_time)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"timing={'CPU time of this thread, minimum' if args.cpu_time else 'wall time, median'} of {args.repeats}")
    check = fidelity(device, burst=args.burst)
    print(f"fidelity (YOLOv8n QANN L=4, float64, imgsz {check['imgsz']}): max |SNN - QANN| = "
          f"{check['max_abs_error_float64']:.2e}, steps {check['steps']}; {check['random_nets']} random QANNs, "
          f"both modes: max error {check['random_nets_max_abs_error_float64']:.2e}")
    two_stage = args.model is not None and resolve(args.model).family == "rcnn"
    if two_stage:
        rows = [row for batch in args.batch for row in measure_rcnn(batch, clock, args.repeats, args.model, args.burst)]
    else:
        rows = [row for batch in args.batch
                for row in measure(batch, args.imgsz, clock, args.repeats, args.model, args.burst)]
    print(f"network: {args.model or 'random-init YOLOv8n QANN L=4'}, imgsz {rows[0]['imgsz']}, "
          f"sleep burst {rows[0]['burst']}")
    print("| batch | mode | record | ANN ms | QANN ms | wake step ms | sleep step ms | T auto (mean/max) "
          "| SNN ms | SNN / (T x ANN) | sleep / wake |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {'on' if r['record'] else 'off'} | {r['ann_forward_s'] * 1e3:.1f} "
              f"| {r['qann_forward_s'] * 1e3:.1f} | {r['snn_wake_step_s'] * 1e3:.1f} | {r['snn_sleep_step_s'] * 1e3:.1f} "
              f"| {r['steps_auto_mean']:.1f}/{r['steps_auto_max']} | {r['snn_total_s'] * 1e3:.0f} "
              f"| {r['ratio_snn_over_T_ann']:.2f} | {r['sleep_over_wake']:.2f} |")
    for r in rows:
        if r["record"] and "recording_cost" in r:
            eager = r.get("recording_cost_eager_counts")
            counter = (f"fused spike counter; with eager counts {100 * eager:+.1f} %" if eager is not None
                       else "eager counts: no fused spike counter here")
            print(f"recording (batch {r['batch']}, {r['mode']}): adds {100 * r['recording_cost']:+.1f} % to a run "
                  f"(on / off, same rounds; {counter}); a recorded run takes {r['ratio_snn_over_T_ann']:.2f} x T ANN "
                  "forwards")
    operations = None
    if not two_stage:
        _, qann, trained_imgsz, images = networks(args.model)
        detector = SpikingYOLO.from_model(qann, imgsz=trained_imgsz or args.imgsz, device=device)
        x = detector.preprocess(images[:1])[0] if images else torch.rand(1, 3, args.imgsz, args.imgsz, device=device)
        operations = [tensor_operations(detector.snn, x, mode) for mode in ("step", "multistep")]
        for o in operations:
            print(f"tensor operations per run ({o['mode']}, batch {o['batch']}): {o['off']} without recording, "
                  f"{o['on']} with (+{o['on'] - o['off']}; aten calls, the fused spike counter's are not among them)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "fidelity": check, "rows": rows, "operations": operations}, f, indent=1)


if __name__ == "__main__":
    main()
