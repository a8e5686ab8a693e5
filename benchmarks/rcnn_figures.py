"""Figures for the spiking Faster R-CNN: sleep steps per stage, seconds per image (step / multistep),
spikes and energy per image, and the ratio to the float model's forward time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rcnn_figures.py [--arch resnet50_fpn] [--sizes 320 512]

Weights are random (no downloads) with randomised BatchNorm statistics and box-predictor biases, so
the spike counts, sleep steps and energy are those of a random network, not of a trained detector;
the timings are representative of the architecture. float32, one image per run.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from detector.energy import PJ_PER_MAC, count_macs
from detector.models.rcnn import SpikingFasterRCNN, build_fasterrcnn, to_qann_fasterrcnn
from detector.randnet import randomise_batchnorm


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    randomise_batchnorm(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        cls = model.roi_heads.box_predictor.cls_score
        cls.bias.copy_(torch.randn(cls.bias.shape, generator=g) * 3)
    return model


def timed(fn, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet50_fpn")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 512])
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--proposals", type=int, default=100, help="RPN proposals kept per image (test time)")
    p.add_argument("--representation-size", type=int, default=1024)
    p.add_argument("--num-classes", type=int, default=91)
    p.add_argument("--modes", nargs="+", default=["step", "multistep"])
    p.add_argument("--bursts", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"arch={args.arch} levels={args.levels} proposals={args.proposals} box head={args.representation_size} "
          f"threads={torch.get_num_threads()} (random weights, randomised BN stats; float32; 1 image)")
    header = (f"{'px':>4} {'mode':>9} {'burst':>5} {'T1 (W+S)':>9} {'T2 (W+S)':>9} {'s/img':>7} {'float s':>7} "
              f"{'ratio':>6} {'ratio/T':>7} {'spikes':>9} {'energy uJ':>10} {'ANN uJ':>8} {'dets':>4}")
    print(header)
    for size in args.sizes:
        float_model = randomise(build_fasterrcnn(args.arch, args.num_classes, min_size=size, max_size=size,
                                                 representation_size=args.representation_size,
                                                 rpn_pre_nms_top_n_test=args.proposals * 2,
                                                 rpn_post_nms_top_n_test=args.proposals)).eval()
        det = SpikingFasterRCNN.from_model(to_qann_fasterrcnn(copy.deepcopy(float_model), args.levels))
        img = torch.rand(3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            float_model([img])  # warm-up
            t_float, _ = timed(lambda: float_model([img]), repeat=2)
            # one ANN forward's conv/linear MACs: stage 1 on the image, stage 2 per RoI ([1, C, 7, 7])
            macs1 = count_macs(det.qann_stage1, det.preprocess([img])[0].tensors)
            macs2 = count_macs(det.qann_stage2, torch.zeros(1, det.qann.backbone.out_channels, 7, 7))
        for mode in args.modes:
            for burst in args.bursts:
                if mode == "multistep" and burst != 1:
                    continue
                t_snn, res = timed(lambda: det.predict([img], mode=mode, burst=burst, conf=0.05))  # torchvision's 0.05
                r = res[0]
                ann_uj = (macs1 + macs2 * r.proposals) * PJ_PER_MAC * 1e-6
                t1, t2, T = r.stage_steps["stage1"], r.stage_steps["stage2"], r.steps
                print(f"{size:>4} {mode:>9} {burst:>5} {t1:>4} (4+{t1 - 4:<2}) {t2:>4} (4+{t2 - 4:<2}) {t_snn:7.2f} "
                      f"{t_float:7.3f} {t_snn / t_float:6.1f} {t_snn / t_float / T:7.2f} {r.spikes:9.3g} "
                      f"{r.energy_uj:10.4g} {ann_uj:8.4g} {len(r):>4}")
    print("T1/T2: total steps of stage 1 (backbone+FPN+RPN) and stage 2 (box head), wake + sleep (sleep='auto');\n"
          "ratio = SNN seconds / float forward seconds (whole torchvision forward, same image);\n"
          "ratio/T divides by the total steps T1+T2. Energy: 0.9 pJ/SOP + 4.6 pJ/MAC (45 nm), both stages; "
          "ANN uJ: one float forward's conv/linear MACs x 4.6 pJ.")


if __name__ == "__main__":
    main()
