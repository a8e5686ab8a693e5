"""Where a spiking Faster R-CNN's energy goes: dense MACs (layers with analog input) against synaptic operations.

    OMP_NUM_THREADS=1 python benchmarks/rcnn_energy.py --models rcnn-r18-bundled runs/sfpn/model.pt --images 8

For each model (a bundled name or a checkpoint path), on the first ``--images`` bundled val images at the default
schedule (wake = L, sleep="auto"): the ANN's MACs per layer group (its share of one float forward), and per stage
of the spiking network the energy of its synaptic operations (0.9 pJ each) and of its dense MACs (4.6 pJ each),
per image, against the ANN's (all MACs). The plain QANN's FPN has no ReLU, so its output convs, the RPN conv and
the box head's first layer take analog currents at every step; the spiking FPN (``add_spiking_fpn``) gives them
spikes.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch import nn

from detector.data import open_dataset
from detector.energy import PJ_PER_MAC, PJ_PER_SOP, layer_macs
from detector.weights import load_detector


def layer_group(path: str) -> str:
    """A readable group for a conv / linear path of a torchvision Faster R-CNN."""
    parts = path.split(".")
    if path.startswith("backbone.body."):
        return "backbone " + ("stem conv (image input)" if parts[2] == "conv1" else parts[2])
    if path.startswith("backbone.fpn."):
        return "FPN " + {"inner_blocks": "lateral 1x1 convs", "layer_blocks": "output 3x3 convs"}.get(parts[2], parts[2])
    if path.startswith("rpn.head."):
        return "RPN " + ("3x3 conv" if parts[2] == "conv" else "1x1 outputs")
    if path.startswith("roi_heads.box_head."):
        return f"box head {parts[2]}"
    return "box predictor"


@torch.no_grad()
def ann_macs_by_group(det, images) -> dict[str, float]:
    """MACs per image of the network converted from, by layer group (stage 2 once per proposal, as it runs)."""
    macs: dict[str, float] = defaultdict(float)
    hooks = [m.register_forward_hook(lambda mod, i, o, p=p: macs.__setitem__(layer_group(p), macs[layer_group(p)]
                                                                              + layer_macs(mod, o)))
             for p, m in det.qann.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        det.qann_predict(images, color="rgb")
    finally:
        for h in hooks:
            h.remove()
    return {k: v / len(images) for k, v in macs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["rcnn-r18-bundled"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = open_dataset("bundled", "val")
    images = [dataset.load_image(i) for i in range(min(args.images, len(dataset)))]
    rows, shown = [], None
    for name in args.models:
        det = load_detector(name)
        groups = ann_macs_by_group(det, images)
        ann_uj = sum(groups.values()) * PJ_PER_MAC * 1e-6
        runs = det.internals(images)["runs"]  # RGB arrays: the Faster R-CNN adapter's colour order
        stage = [(float(r.stats.sops.sum()) * PJ_PER_SOP * 1e-6 / len(images),
                  float(r.stats.analog_macs.sum()) * PJ_PER_MAC * 1e-6 / len(images)) for r in runs]
        steps = [float(r.stats.steps.double().mean()) for r in runs]
        rows.append((name, ann_uj, stage, steps))
        if groups == shown:  # the same architecture as the table above
            continue
        shown = groups
        print(f"\n{name}: ANN MACs per image by layer group ({sum(groups.values()) / 1e9:.2f} G in all)")
        print("| layer group | GMACs / image | share of the ANN |\n|---|---|---|")
        for group, value in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {group} | {value / 1e9:.3f} | {100 * value / sum(groups.values()):.1f} % |")
    print(f"\nSpiking network energy per image, default schedule ({len(images)} bundled val images; µJ)")
    print("| model | ANN | stage 1 SOPs | stage 1 dense MACs | stage 2 SOPs | stage 2 dense MACs | SNN / ANN | steps "
          "(stage 1 + stage 2) |\n|---|---|---|---|---|---|---|---|")
    for name, ann_uj, stage, steps in rows:
        (s1, m1), (s2, m2) = stage if len(stage) == 2 else (stage[0], (0.0, 0.0))
        total = s1 + m1 + s2 + m2
        print(f"| {name} | {ann_uj:.0f} | {s1:.0f} | {m1:.0f} | {s2:.0f} | {m2:.0f} | {total / ann_uj:.2f} | "
              f"{' + '.join(f'{s:.1f}' for s in steps)} |")


if __name__ == "__main__":
    main()
