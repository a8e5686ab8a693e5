"""Figures for the YOLO adapter: steps, fidelity, time, spikes and energy of a YOLOv8n QANN (L=4).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/yolo_figures.py --images 20 --imgsz 320 --threads 1

The network is a *random-init* ReLU YOLOv8n QANN with randomised BatchNorm statistics (so activations
spread over the levels; no trained weights are used), which is fine for fidelity, steps and timing but
not for accuracy. Images: Ultralytics' bus.jpg and zidane.jpg plus random crops / resizes of them.
Prints one markdown table (means over images; "max" where stated) and the settings.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch import nn

from detector.randnet import randomise_batchnorm, randomise_class_biases

CONF = 0.15  # with the randomised class biases this leaves some boxes per image (reported below)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    randomise_batchnorm(model, seed)
    randomise_class_biases([seq[-1] for seq in model.model[-1].cv3], seed + 1, -3.5, -2.0)
    return model


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    import cv2

    from pathlib import Path

    from detector.models.yolo import prepare_ultralytics

    prepare_ultralytics()  # offline, before ultralytics is imported
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    base = [cv2.imread(str(assets / name)) for name in ("bus.jpg", "zidane.jpg")]
    rng = np.random.default_rng(seed)
    out = list(base)
    while len(out) < n:
        img = base[len(out) % 2]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y:y + ch, x:x + cw]
        s = rng.uniform(0.5, 1.5)
        out.append(cv2.resize(crop, (max(32, int(cw * s)), max(32, int(ch * s)))))
    return out[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None,
                        help="a trained QANN (bundled name or path); default: the random-init network")
    parser.add_argument("--data", default="bundled", help="images for --model (its val split)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from detector.models.yolo import SpikingYOLO, build_qann, load_checkpoint

    global CONF
    if args.model:
        from detector.data import open_dataset
        from detector.weights import resolve

        qann, meta = load_checkpoint(resolve(args.model).path)
        L, args.imgsz, CONF = meta["levels"], meta["imgsz"], 0.25
        dataset = open_dataset(args.data, "val")
        imgs = [dataset.load_image(i)[..., ::-1].copy() for i in range(min(args.images, len(dataset)))]  # BGR
        source = f"trained QANN {args.model}, {len(imgs)} images of {dataset.name}"
    else:
        L = args.levels
        qann = randomize(build_qann("yolov8n.yaml", levels=L, act="relu"))
        imgs = images(args.images)
        source = f"random-init weights with randomised BN stats (no trained weights), {len(imgs)} images (bus/zidane + crops/resizes)"
    det64 = SpikingYOLO.from_model(qann, imgsz=args.imgsz, dtype=torch.float64, device=args.device)
    det32 = SpikingYOLO.from_model(qann, imgsz=args.imgsz, dtype=torch.float32, device=args.device)

    rows: dict[str, list[float]] = {k: [] for k in (
        "err64", "err32", "steps", "steps_burst", "spikes", "spikes_burst", "energy_uj", "sops", "analog_macs",
        "ann_uj", "t_step", "t_multi", "t_ann", "t_burst", "same_dets64", "same_dets32", "ndet")}

    def sync():
        if det32.device.type == "cuda":
            torch.cuda.synchronize()

    for img in imgs:
        x64, _ = det64.preprocess([img])
        ref64 = det64.qann_raw(x64)
        out64 = det64.raw(x64, wake=L, sleep="auto", burst=1).readout
        rows["err64"].append(max(float((a - b).abs().max()) for a, b in zip(out64, ref64)))
        rows["same_dets64"].append(float(all(
            torch.equal(a.boxes.xyxy, b.boxes.xyxy) and torch.equal(a.boxes.cls, b.boxes.cls)
            for a, b in zip(det64.decode(out64, conf=CONF), det64.decode(ref64, conf=CONF)))))

        x32, _ = det32.preprocess([img])
        sync(); t = time.perf_counter()
        ref32 = det32.qann_raw(x32)
        sync(); rows["t_ann"].append(time.perf_counter() - t)
        t = time.perf_counter()
        run32 = det32.raw(x32, wake=L, sleep="auto", mode="step", burst=1)
        sync(); rows["t_step"].append(time.perf_counter() - t)
        out32, stats, steps = run32.readout, run32.stats, run32.steps
        rows["err32"].append(max(float((a - b).abs().max()) for a, b in zip(out32, ref32)))
        a, b = det32.decode(out32, conf=CONF)[0], det32.decode(ref32, conf=CONF)[0]
        # float32: same classes and boxes within 0.5 px (summation order makes bitwise equality meaningless)
        rows["same_dets32"].append(float(len(a) == len(b) and torch.equal(a.boxes.cls, b.boxes.cls)
                                         and (len(a) == 0 or float((a.boxes.xyxy - b.boxes.xyxy).abs().max()) < 0.5)))
        rows["ndet"].append(float(len(b)))
        rows["steps"].append(float(steps[0]))
        rows["spikes"].append(float(stats.spikes[0]))
        rows["sops"].append(float(stats.sops[0]))
        rows["analog_macs"].append(float(stats.analog_macs[0]))
        rows["energy_uj"].append(float(stats.energy_pj[0]) * 1e-6)
        rows["ann_uj"].append(stats.ann_energy_pj * 1e-6)
        t = time.perf_counter()
        det32.raw(x32, wake=L, sleep="auto", mode="multistep", burst=1)
        sync(); rows["t_multi"].append(time.perf_counter() - t)
        t = time.perf_counter()
        burst = det32.raw(x32, wake=L, sleep="auto", burst=L)
        sync(); rows["t_burst"].append(time.perf_counter() - t)
        rows["steps_burst"].append(float(burst.steps[0]))
        rows["spikes_burst"].append(float(burst.stats.spikes[0]))

    m = {k: float(np.mean(v)) for k, v in rows.items()}
    print(f"# YOLOv8n ReLU QANN L={L}, {source}, "
          f"imgsz {args.imgsz}, batch 1, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print("| quantity | value |\n|---|---|")
    print(f"| total steps T (wake {L} + sleep, sleep='auto', burst 1): mean / max | {m['steps']:.2f} / "
          f"{max(rows['steps']):.0f} |")
    print(f"| total steps T with burst={L}: mean / max | {m['steps_burst']:.2f} / {max(rows['steps_burst']):.0f} |")
    print(f"| max abs(readout - QANN), float64 (max over images) | {max(rows['err64']):.2e} |")
    print(f"| max abs(readout - QANN), float32 (max over images) | {max(rows['err32']):.2e} |")
    print(f"| images with a float32 flip (max err > 1e-4) | {sum(e > 1e-4 for e in rows['err32'])}/{len(imgs)} |")
    print(f"| QANN detections per image at conf {CONF} | {m['ndet']:.1f} |")
    print(f"| images whose SNN detections match the QANN's (float64: bitwise; float32: classes equal, boxes "
          f"< 0.5 px) | "
          f"{sum(rows['same_dets64']):.0f}/{len(imgs)} / {sum(rows['same_dets32']):.0f}/{len(imgs)} |")
    print(f"| QANN forward (float32), s/image | {m['t_ann']:.3f} |")
    print(f"| SNN step mode, s/image at T (burst 1) | {m['t_step']:.3f} ({m['t_step'] / m['t_ann'] / m['steps']:.2f}"
          f" x T x ANN) |")
    print(f"| SNN multistep mode, s/image at T (burst 1) | {m['t_multi']:.3f} "
          f"({m['t_multi'] / m['t_ann'] / m['steps']:.2f} x T x ANN) |")
    print(f"| SNN step mode, burst {L}, s/image | {m['t_burst']:.3f} |")
    print(f"| spikes per image (burst 1 / burst {L}) | {m['spikes']:.3e} / {m['spikes_burst']:.3e} |")
    print(f"| SOPs per image / dense MACs (first conv) per image | {m['sops']:.3e} / {m['analog_macs']:.3e} |")
    print(f"| energy estimate per image (burst 1), uJ | {m['energy_uj']:.1f} (ANN: {m['ann_uj']:.1f}, "
          f"ratio {m['energy_uj'] / m['ann_uj']:.2f}) |")


if __name__ == "__main__":
    main()
