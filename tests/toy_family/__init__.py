"""A third detector family, for tests: what one new package and one ``FAMILIES`` entry make work.

``ToyDetector`` is a one-stage detector over a seeded random detector-like QANN (``detector.randnet``): its dense
readout map (one channel per class) decodes to at most one box per class, around the map's peak. Its checkpoint holds
the seed, the levels and the class names in this project's checkpoint format (``detector.checkpoint``), with the
``format`` that ``detector.weights.checkpoint_family`` reads. Everything else (the schedule, predict, stream,
anytime detections, video sessions, ``Results``) comes from ``detector.detect.SingleStageDetector``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from detector import checkpoint, convert
from detector.detect import Batch, Boxes, Results, RunFigures, Selection, SingleStageDetector, read_bgr
from detector.detect.base import source_path
from detector.families import Family
from detector.quant import qann_levels
from detector.randnet import random_qann

CHECKPOINT_FORMAT = "casc-toy"


def layer_part(site: str) -> str:
    """One part: the toy network has no backbone / head split."""
    return "network"

BOX_HALF_SIDE = 2.0  # pixels either side of a class's peak
# The entry a test puts into detector.families.FAMILIES (nothing registers itself at import time).
TOY = Family("toy", __name__, "ToyDetector", ("snn",), trainer=None, default_timesteps="1,2,4,8", sized=False,
             checkpoint_format=CHECKPOINT_FORMAT)


def save_toy(path: str | Path, seed: int = 0, levels: int = 4, names: Sequence[str] = ("a", "b", "c")) -> Path:
    """A toy checkpoint: the random QANN of ``seed`` with ``levels`` and one readout channel per name."""
    return checkpoint.save({"format": CHECKPOINT_FORMAT, "seed": seed, "levels": levels, "names": list(names)}, path)


class ToyDetector(SingleStageDetector):
    """The random QANN converted (``neuron`` as ``detector.convert`` takes it); images are HxWx3 uint8 arrays (BGR
    unless ``color="rgb"``) or a [B, 3, H, W] tensor, fed as they are (scaled to [0, 1])."""

    def __init__(self, qann: torch.nn.Module, names: Sequence[str], neuron: str = "cif", device="cpu",
                 dtype: torch.dtype = torch.float32):
        self.qann = qann.to(device=device, dtype=dtype).eval()
        self.names, self.levels, self.neuron = dict(enumerate(names)), qann_levels(qann), neuron
        self.device, self.dtype = torch.device(device), dtype
        self.snn = convert(self.qann, neuron=neuron)

    @classmethod
    def from_checkpoint(cls, path: str | Path, sha256: str | None = None, device="cpu",
                        dtype: torch.dtype = torch.float32, neuron: str = "cif") -> "ToyDetector":
        meta = checkpoint.load(path, sha256)
        qann = random_qann(meta["seed"], levels=meta["levels"], classes=len(meta["names"]))
        return cls(qann, meta["names"], neuron=neuron, device=device, dtype=dtype)

    def _split_tensor(self, x: torch.Tensor) -> Sequence:
        return list(x)

    def _prepare(self, items: Sequence, color: str) -> Batch:
        images = [None if isinstance(item, torch.Tensor) else read_bgr(item, color) for item in items]
        planes = [item if image is None else torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1) / 255.0
                  for item, image in zip(items, images)]
        x = torch.stack(planes).to(device=self.device, dtype=self.dtype)
        return Batch(x, [tuple(x.shape[-2:])] * len(items), images, [source_path(item) for item in items])

    @torch.no_grad()
    def qann_raw(self, x: torch.Tensor):
        return self.qann(x)

    def _decoded(self, batch: Batch, readout, keep: Selection,
                 runs: Sequence[RunFigures] | None = None) -> list[Results]:
        maps = readout[0].flatten(2)  # [B, classes, H * W]
        width = readout[0].shape[-1]
        peaks, where = maps.max(2)
        results = []
        for i, shape in enumerate(batch.shapes):
            y, x = (where[i] // width).to(self.dtype), (where[i] % width).to(self.dtype)
            xyxy = torch.stack([x - BOX_HALF_SIDE, y - BOX_HALF_SIDE, x + BOX_HALF_SIDE, y + BOX_HALF_SIDE], 1)
            boxes = Boxes(xyxy.cpu(), peaks[i].sigmoid().cpu(), torch.arange(len(self.names)), shape)
            if keep.classes is not None:
                boxes = boxes.select(torch.isin(boxes.cls, torch.tensor(keep.classes)))
            boxes = boxes.select(boxes.conf >= keep.conf)
            boxes = boxes.select(boxes.conf.argsort(descending=True)[:keep.max_det])
            results.append(batch.result(i, boxes, self.names, runs[i] if runs else None))
        return results
