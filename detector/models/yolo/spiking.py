"""The spiking YOLO: the network up to the Detect head's last 1x1 convs, converted, with Ultralytics' pre- and
post-processing.

The spiking part ends in the readouts: the raw per-level maps Detect returns in training mode. DFL, box
decoding and NMS run on the *accumulated* readouts with Ultralytics' own code (``Detect._inference`` and
``ultralytics.utils.nms.non_max_suppression``). The network is converted with the adapter's
``module_rules()``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from ...calibrate import quantize
from ...convert import convert
from ...neuron_kinds import neuron_kind
from ...detect import Batch, Boxes, Results, RunFigures, Selection, SingleStageDetector, read_bgr
from ...detect.base import source_path
from ...options import MAX_SLEEP
from ...quant import ClipQuan, qann_levels
from ...runtime import RunResult, SpikingNetwork
from .model import (UnsupportedModelError, _names_dict, check_supported, load_checkpoint, module_rules, quantize_model,
                    save_qann)
from .ultralytics_env import prepare_ultralytics, ultralytics_api

if TYPE_CHECKING:
    from ultralytics.nn.modules.head import Detect
    from ultralytics.nn.tasks import DetectionModel


class _RawDetectHead(nn.Module):
    """Detect's box and class branches without DFL/decoding: per level ``cat(cv2(x), cv3(x))``."""

    def __init__(self, detect: Detect):
        super().__init__()
        self.cv2, self.cv3, self.nl = detect.cv2, detect.cv3, detect.nl

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1) for i in range(self.nl)]


class YOLOReadoutNet(nn.Module):
    """The layers of an Ultralytics DetectionModel (shared, not copied) routed like ``_predict_once``, ending
    in the raw per-level head maps ``[B, 4*reg_max + nc, H, W]``: what gets converted to spikes."""

    def __init__(self, model: DetectionModel):
        super().__init__()
        check_supported(model)
        layers = list(model.model)
        self.layers = nn.ModuleList(layers[:-1])
        self.head = _RawDetectHead(layers[-1])
        self.routes = [(m.f, m.i) for m in layers[:-1]]
        self.head_from = layers[-1].f
        self.save = set(model.save)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y: list = []
        for (f, i), m in zip(self.routes, self.layers):
            if f != -1:
                x = y[f] if isinstance(f, int) else [x if j == -1 else y[j] for j in f]
            x = m(x)
            y.append(x if i in self.save else None)
        f = self.head_from
        x = y[f] if isinstance(f, int) else [x if j == -1 else y[j] for j in f]
        return self.head(x)


def attention_paths(net: nn.Module) -> list[str]:
    """Paths of the attention modules (YOLO11 C2PSA) inside ``net``."""
    return [p for p, m in net.named_modules() if isinstance(m, ultralytics_api().Attention)]


def letterbox(bgr_images: list[np.ndarray], imgsz: int, stride: int = 32) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Ultralytics' letterbox (gray 114 padding) to imgsz x imgsz: a float [B, 3, H, W] RGB batch in 0..1 and
    the original (h, w) of each image."""
    prepare_ultralytics()
    from ultralytics.data.augment import LetterBox

    boxer = LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=stride)
    shapes = [tuple(image.shape[:2]) for image in bgr_images]
    batch = np.stack([boxer(image=image) for image in bgr_images])[..., ::-1].transpose(0, 3, 1, 2)  # BGR->RGB, BCHW
    return torch.from_numpy(np.ascontiguousarray(batch)).float() / 255.0, shapes


def calibration_inputs(rgb_images: list[np.ndarray], imgsz: int, batch: int = 16) -> list[torch.Tensor]:
    """RGB uint8 images as the letterboxed batches the model takes (what ``detector.calibrate`` runs)."""
    return [letterbox([im[..., ::-1] for im in rgb_images[i:i + batch]], imgsz)[0]
            for i in range(0, len(rgb_images), batch)]


def quantize_checkpoint(path: str | Path, sha256: str | None, rgb_images: list[np.ndarray], out: str | Path,
                        levels: int, batch: int = 16, names: list[str] | None = None, **calibration) -> Path:
    """The QANN of the float checkpoint ``path``, calibrated on ``rgb_images`` (no labels) by
    ``detector.calibrate.quantize`` (``calibration``: theta, percentile, rounding, first_levels) and written to
    ``out`` with ``names`` (default: the checkpoint's)."""
    float_model, meta = load_checkpoint(path, sha256=sha256)
    if meta["quantized"]:
        raise ValueError(f"{path} is already a QANN; quantize the float checkpoint it came from")
    qann = quantize(float_model, levels, calibration_inputs(rgb_images, meta["imgsz"], batch), **calibration)
    return save_qann(qann, out, names=names or meta["names"], imgsz=meta["imgsz"], act=meta["act"])


def _skip_folded_batchnorms(network: nn.Module) -> None:
    """Ultralytics' own fused forward, ``act(conv(x))``, for every ``Conv`` whose BatchNorm the conversion folded
    (an ``nn.Identity`` now): the same result with one module call fewer per layer and time step."""
    conv_type = ultralytics_api().Conv
    for m in network.modules():
        if isinstance(m, conv_type) and type(m).forward is conv_type.forward and isinstance(m.bn, nn.Identity):
            m.forward = m.forward_fuse


BACKBONE_LAST = 9  # YOLOv8's backbone is layers 0..9 (SPPF last); the neck follows, the Detect head is last


def layer_part(site: str) -> str:
    """Backbone, neck or head: the part of a YOLO network a neuron call site (its module path) belongs to."""
    if site.startswith("head") or ".22." in f".{site}":
        return "head"
    index = re.match(r"(?:layers|model)\.(\d+)", site)
    return "backbone" if index and int(index.group(1)) <= BACKBONE_LAST else "neck"


class SpikingYOLO(SingleStageDetector):
    """A YOLO QANN converted to a spiking network, with Ultralytics' pre- and post-processing.

    Attributes: ``qann`` (the DetectionModel QANN, eval), ``snn`` (the ``SpikingNetwork``; its readouts are
    the raw per-level head maps), ``levels``, ``names``, ``imgsz``, ``analog`` (island paths; the fraction of
    one forward's MACs they keep analog is ``raw(x).stats.analog_mac_fraction``).

    Image inputs: file paths and PIL images (through ``detector.images``), or HxWx3 uint8 numpy arrays
    which are taken as **BGR** (OpenCV / Ultralytics convention) unless ``color="rgb"``. Each image is
    letterboxed to ``imgsz`` x ``imgsz`` (gray 114 padding); boxes are returned in original pixels.
    """

    def __init__(self, qann: DetectionModel, names: dict | Sequence[str] | None = None, imgsz: int = 640,
                 analog: str | Sequence[str] | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, neuron: str = "cif",
                 calibration: Sequence[torch.Tensor] | None = None, percentile: float = 99.9):
        check_supported(qann)
        quantized = any(isinstance(m, ClipQuan) for m in qann.modules())
        kind = neuron_kind(neuron)
        if not kind.converts_float and not quantized:
            raise ValueError("SpikingYOLO needs a QANN (ClipQuan activations): build_qann(model, levels) or "
                             "from_checkpoint(path, levels=L) for a float checkpoint")
        if kind.converts_float and (quantized or not calibration):
            raise ValueError('neuron="if" (the plain IF baseline) converts a float ReLU model and needs calibration '
                             "images (anything predict takes) or letterboxed batches (see calibration_inputs)")
        self.neuron = neuron
        self.qann = copy.deepcopy(qann).to(device=device, dtype=dtype).eval()
        for p in self.qann.parameters():
            p.requires_grad_(False)
        self.levels = qann_levels(self.qann)
        self.names = _names_dict(names) or _names_dict(getattr(qann, "names", None))
        classes = getattr(self.qann.model[-1], "nc", None) if hasattr(self.qann, "model") else None
        if names is not None and classes is not None and sorted(self.names) != list(range(classes)):
            raise ValueError(f"names: {len(self.names)} class names for a model with {classes} classes: give one name "
                             f"per class id 0..{classes - 1}")
        self.imgsz = int(imgsz)
        self.stride = int(max(self.qann.stride)) if hasattr(self.qann, "stride") else 32
        if self.imgsz % self.stride:
            raise ValueError(f"imgsz {self.imgsz} must be a multiple of the model stride {self.stride}")
        self.device, self.dtype = torch.device(device), dtype
        self.readout_net = YOLOReadoutNet(self.qann).eval()
        found = attention_paths(self.readout_net)
        if analog == "auto":
            analog = found
        analog = [] if analog is None else ([analog] if isinstance(analog, str) else list(analog))
        missing = [p for p in found if p not in analog]
        if missing:
            raise UnsupportedModelError(
                "this model has attention modules that cannot spike: " + ", ".join(missing)
                + ". Keep them as analog islands (hybrid SNN) with analog='auto' or analog=[those paths]; the "
                "fraction of MACs left analog is reported in the run statistics (analog_mac_fraction)")
        self.analog = analog
        if kind.converts_float:
            batches = [b.to(device=device, dtype=dtype) for b in self._calibration_batches(calibration)]
            self.snn: SpikingNetwork = convert(self.readout_net, neuron=neuron, calibration=batches,
                                               percentile=percentile, analog=analog, rules=module_rules())
        else:  # CASC, or QCFS neurons on the same QANN
            self.snn = convert(self.readout_net, neuron=neuron, analog=analog, rules=module_rules())
        _skip_folded_batchnorms(self.snn)
        self.decoder: Detect = copy.deepcopy(self.qann.model[-1]).eval()
        self.decoder.dynamic = True  # recompute anchors per call (shape and dtype may change)
        self.decoder.export = False

    def _calibration_batches(self, calibration: Sequence) -> list[torch.Tensor]:
        """Letterboxed batches (4-D tensors) as given; images (paths, PIL, arrays in ``color``) letterboxed here."""
        items = list(calibration)
        if all(isinstance(b, torch.Tensor) and b.dim() == 4 for b in items):
            return items
        return [self._prepare(items[i:i + 16], self.color).x for i in range(0, len(items), 16)]

    # -- constructors --

    @classmethod
    def from_model(cls, qann: DetectionModel, names=None, imgsz: int = 640, analog=None, device="cpu",
                   dtype: torch.dtype = torch.float32, neuron: str = "cif", calibration=None) -> "SpikingYOLO":
        """From a QANN ``DetectionModel`` (e.g. ``build_qann(...)``); ``names`` default to the model's.
        ``neuron="if"``: the IF baseline of a float ReLU model, thresholds from ``calibration`` batches."""
        return cls(qann, names=names, imgsz=imgsz, analog=analog, device=device, dtype=dtype, neuron=neuron,
                   calibration=calibration)

    @classmethod
    def from_checkpoint(cls, path: str | Path, sha256: str | None = None, device="cpu",
                        dtype: torch.dtype = torch.float32, levels: int | None = None, analog=None,
                        imgsz: int | None = None, neuron: str = "cif", calibration=None) -> "SpikingYOLO":
        """From our safe checkpoint or an Ultralytics ``.pt`` (a pickle: trusted files only).

        A float checkpoint (SiLU or ReLU) needs ``levels`` and is quantized here (its ClipQuan staircase is
        only accurate after QANN fine-tuning: ``casc train yolo``), unless ``neuron="if"``: then the float ReLU
        model becomes the IF baseline with thresholds from ``calibration`` batches. ``neuron="qcfs"``: the QANN
        with QCFS neurons (run ``wake=T``, no sleep)."""
        model, meta = load_checkpoint(path, sha256=sha256)
        if neuron_kind(neuron).converts_float:
            return cls(model, names=meta["names"], imgsz=imgsz or meta["imgsz"], analog=analog, device=device,
                       dtype=dtype, neuron=neuron, calibration=calibration)
        if not meta["quantized"]:
            if levels is None:
                raise ValueError(f"{path} holds a float model, not a QANN: quantize it first (casc quantize --model "
                                 f"{path} --levels 4 --data DATA --out qann.pt; in Python levels=L), fine-tune it "
                                 "(casc train yolo --qat) and pass the float model as --float-model")
            model = quantize_model(model, levels, meta["act"])
        elif levels is not None and levels != meta["levels"]:
            raise ValueError(f"{path} is a QANN with {meta['levels']} levels, not {levels}")
        return cls(model, names=meta["names"], imgsz=imgsz or meta["imgsz"], analog=analog, device=device,
                   dtype=dtype, neuron=neuron)

    # -- pre / post-processing --

    def _split_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor input is a preprocessed batch [B, 3, imgsz, imgsz] (RGB, 0..1); boxes stay in its pixels."""
        if x.dim() != 4 or tuple(x.shape[2:]) != (self.imgsz, self.imgsz):
            raise ValueError(f"tensor input must be [B, 3, {self.imgsz}, {self.imgsz}], got {tuple(x.shape)}")
        return x

    def _prepare(self, items, color: str) -> Batch:
        """Letterboxed [B, 3, imgsz, imgsz] batch (RGB, 0..1, network dtype) and each image's (h, w)."""
        if isinstance(items, torch.Tensor):
            n = items.shape[0]
            return Batch(items.to(self.device, self.dtype), None, [None] * n, [None] * n)
        images = [read_bgr(image, color) for image in items]
        x, shapes = letterbox(images, self.imgsz, self.stride)
        return Batch(x.to(self.device, self.dtype), shapes, images, [source_path(i) for i in items])

    def decode(self, maps: list[torch.Tensor], shapes: list[tuple[int, int]] | None = None,
               conf: float = Selection.conf, iou: float = Selection.iou, max_det: int = Selection.max_det,
               classes: Sequence[int] | None = None, agnostic: bool = False) -> list[Results]:
        """Raw head maps (accumulated readouts or QANN output) -> ``Results``, with Ultralytics' decoding
        (DFL + ``Detect._inference``) and ``non_max_suppression``; boxes scaled back to ``shapes``."""
        from ultralytics.utils import ops
        from ultralytics.utils.nms import non_max_suppression

        detect = self.decoder
        b = maps[0].shape[0]
        reg = 4 * detect.reg_max
        boxes = torch.cat([m[:, :reg].reshape(b, reg, -1) for m in maps], -1)
        scores = torch.cat([m[:, reg:].reshape(b, detect.nc, -1) for m in maps], -1)
        with torch.no_grad():
            pred = detect._inference({"boxes": boxes, "scores": scores, "feats": maps})
            out = non_max_suppression(pred, conf, iou, classes=None if classes is None else list(classes),
                                      agnostic=agnostic, max_det=max_det, nc=detect.nc, max_time_img=1e9)
        input_hw = (self.imgsz, self.imgsz)
        results = []
        for i, det in enumerate(out):
            shape = shapes[i] if shapes else input_hw
            xyxy = ops.scale_boxes(input_hw, det[:, :4].clone(), shape) if shapes else det[:, :4]
            boxes = Boxes(xyxy.cpu(), det[:, 4].cpu(), det[:, 5].long().cpu(),
                          (int(shape[0]), int(shape[1])))
            results.append(Results(boxes, self.names))
        return results

    def _decoded(self, batch: Batch, maps: list[torch.Tensor], keep: Selection,
                 runs: Sequence[RunFigures] | None = None) -> list[Results]:
        """Each image's ``Results`` with its spiking run's figures (``runs``; None: the QANN's)."""
        results = self.decode(maps, batch.shapes, keep.conf, keep.iou, keep.max_det, keep.classes)
        return [batch.result(i, r.boxes, self.names, runs[i] if runs else None) for i, r in enumerate(results)]

    # -- running --

    @torch.no_grad()
    def raw(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", mode: str = "step",
            burst: int | None = None, max_sleep: int = MAX_SLEEP) -> RunResult:
        """The spiking network's run on a preprocessed batch ``x``: ``.readout`` holds the accumulated raw
        per-level maps, ``.steps``/``.settled``/``.stats`` how it went."""
        return self.snn.run(x, wake=wake if wake is not None else self.levels, sleep=sleep, mode=mode, burst=burst,
                            max_sleep=max_sleep)

    # -- input geometry and description (what a server needs to size and describe its work) --

    @property
    def architecture(self) -> str:
        yaml = getattr(self.qann, "yaml", {}) or {}
        return str(yaml.get("yaml_file") or yaml.get("arch") or "yolo")

    def fit_box(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (w, h) box an image of ``size`` is resized into: the letterbox, longest side -> imgsz."""
        return self.imgsz, self.imgsz

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) of an image of ``size`` once letterboxed, before padding."""
        r = min(self.imgsz / size[0], self.imgsz / size[1])
        return int(round(size[0] * r)), int(round(size[1] * r))

    def export_networks(self, imgsz: int | None, batch: int, dtype: torch.dtype) -> tuple[int, dict]:
        """(input size, {network: (spiking network, the QANN part it reproduces, example input)}) for ``casc
        export``: the one network on letterboxed ``imgsz`` images (this detector's size; another is refused)."""
        if imgsz is not None and imgsz != self.imgsz:
            raise ValueError(f"this detector runs at imgsz {self.imgsz}; load it with imgsz={imgsz} to export that")
        example = torch.zeros(batch, 3, self.imgsz, self.imgsz, dtype=dtype)
        return self.imgsz, {"snn": (self.snn, self.readout_net, example)}

    @torch.no_grad()
    def qann_raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The QANN's raw per-level maps for a preprocessed batch ``x`` (what the SNN reproduces)."""
        return self.readout_net(x)
