"""torchvision Faster R-CNN -> quantized ANN -> two-stage spiking detector (DESIGN §1 "Detection heads").

    from detector.models.rcnn import SpikingFasterRCNN
    det = SpikingFasterRCNN.from_checkpoint("fasterrcnn.pth", arch="resnet50_fpn", levels=4)
    results = det.predict(["street.jpg"])          # [{"boxes", "scores", "labels", "steps", "spikes", ...}]
    for event in det.stream("street.jpg"):         # stage-1 steps, then stage-2 steps with detections
        ...
    dets, info = det.detections_at_steps(images, [1, 2, 4, 8, 16, 32])  # anytime detections, one pass
    base = SpikingFasterRCNN.from_model(float_model, neuron="if", calibration=images)  # IF baseline
    base.predict(images, wake=32)                  # wake=T, no sleep; base.qann_predict = the float ANN

Pipeline of one image batch:

1. ``model.transform`` (GeneralizedRCNNTransform: resize + normalize + pad) — analog preprocessing.
2. **Stage 1** (one SpikingNetwork): ResNet body + FPN + RPN head. Its readouts are the FPN
   feature maps, the objectness maps and the box deltas of every level (accumulated over the
   wake and sleep steps, divided by the wake count).
3. Proposals from those readouts with torchvision's own code (``rpn.anchor_generator``,
   ``rpn.box_coder``, ``rpn.filter_proposals``).
4. ``roi_heads.box_roi_pool`` (RoIAlign, linear) on the stage-1 readout features.
5. **Stage 2** (a second SpikingNetwork, its own wake/sleep schedule): box head + box predictor on
   the RoI features, one row per proposal.
6. ``roi_heads.postprocess_detections`` and ``transform.postprocess``: boxes, scores and labels in
   original image coordinates, torchvision's output format (labels 1-based, 0 is background).

With ``wake = L`` and ``sleep="auto"`` in both stages, every readout equals the QANN's output, so
proposals and detections equal the QANN's (float64; see DESIGN "Float precision").

Adapter work done here: (conv, bn) pairs of torchvision's BasicBlock / Bottleneck / ResNet stem are
registered so that (Frozen)BatchNorm folds; ``TwoMLPHead`` (functional ``F.relu``) is replaced by
``ReLUTwoMLPHead`` (same parameters, ReLU modules); FPN's ``LastLevelMaxPool`` (a stride-2
subsampling) is registered linear; squeeze-excitation is registered non-linear.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d, SqueezeExcitation

from ..convert import UnsupportedModuleError, convert, register_linear_module, register_nonlinear_module
from ..fuse import register_bn_pairs
from ..quant import ClipQuan, qann_levels, to_qann, with_legacy_quant_state
from ..energy import PJ_PER_MAC, count_macs
from ..runtime import RunResult, SpikingNetwork
from .. import checkpoint

# --- registrations (what the converter must know about torchvision's detection modules) -------

# BasicBlock / Bottleneck apply bn_i directly to conv_i's output; the ResNet stem (kept as
# children "conv1", "bn1", ... of IntermediateLayerGetter, which runs its children in order) too.
register_bn_pairs(tv_resnet.BasicBlock, [("conv1", "bn1"), ("conv2", "bn2")])
register_bn_pairs(tv_resnet.Bottleneck, [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")])
register_bn_pairs(IntermediateLayerGetter, [("conv1", "bn1")])
# F.max_pool2d(kernel_size=1, stride=2): a subsampling, linear in its input.
register_linear_module(LastLevelMaxPool)
# x * hardsigmoid(fc(avgpool(x))): a product of signals, cannot spike (keep it analog).
register_nonlinear_module(SqueezeExcitation)

RESNET_ARCHS = {
    "resnet18_fpn": "resnet18",
    "resnet34_fpn": "resnet34",
    "resnet50_fpn": "resnet50",
    "resnet101_fpn": "resnet101",
    "resnet152_fpn": "resnet152",
}
ARCHS = (*RESNET_ARCHS, "resnet50_fpn_v2", "mobilenet_v3_large_fpn", "mobilenet_v3_large_320_fpn")
CHECKPOINT_FORMAT = "casc-fasterrcnn"
CHECKPOINT_VERSION = 2  # 2: ClipQuan levels and rounding per module in the state dict (1: all floor)


# --- the model ------------------------------------------------------------------------------

class ReLUTwoMLPHead(tv_frcnn.TwoMLPHead):
    """torchvision's ``TwoMLPHead`` with its two functional ``F.relu`` as modules (same state dict)."""

    def __init__(self, in_channels: int, representation_size: int):
        super().__init__(in_channels, representation_size)
        self.relu6 = nn.ReLU()
        self.relu7 = nn.ReLU()

    @classmethod
    def from_head(cls, head: tv_frcnn.TwoMLPHead) -> "ReLUTwoMLPHead":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.fc6, new.fc7 = head.fc6, head.fc7
        new.relu6, new.relu7 = nn.ReLU(), nn.ReLU()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=1)
        return self.relu7(self.fc7(self.relu6(self.fc6(x))))


def build_fasterrcnn(arch: str = "resnet18_fpn", num_classes: int = 91, min_size: int = 800, max_size: int = 1333,
                     representation_size: int | None = None, frozen_bn: bool = True, trainable_layers: int = 3,
                     fpn_channels: int = 256, **kwargs) -> tv_frcnn.FasterRCNN:
    """A float torchvision Faster R-CNN, randomly initialised (never downloads weights).

    ``arch``: resnet18_fpn ... resnet152_fpn (``resnet_fpn_backbone``; FrozenBatchNorm2d unless
    ``frozen_bn=False``), resnet50_fpn_v2, mobilenet_v3_large_fpn, mobilenet_v3_large_320_fpn
    (torchvision builders with ``weights=None, weights_backbone=None``). ``representation_size``:
    width of the box head (1024 in torchvision; 256 or 512 make a slim head). ``fpn_channels``: width of
    the ResNet FPN (256 in torchvision; 128 halves the FPN, RPN and box-head input). Other keyword
    arguments go to ``FasterRCNN`` (e.g. ``rpn_pre_nms_top_n_test``, ``rpn_post_nms_top_n_test``,
    ``box_detections_per_img``, ``box_score_thresh``).
    """
    kwargs = dict(kwargs, min_size=min_size, max_size=max_size)
    if arch in RESNET_ARCHS:
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        backbone = resnet_fpn_backbone(backbone_name=RESNET_ARCHS[arch], weights=None, norm_layer=norm,
                                       trainable_layers=trainable_layers)
        if fpn_channels != backbone.out_channels:
            in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
            backbone.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
            backbone.out_channels = fpn_channels
        rep = representation_size or 1024
        resolution = 7
        box_head = ReLUTwoMLPHead(backbone.out_channels * resolution**2, rep)
        predictor = tv_frcnn.FastRCNNPredictor(rep, num_classes)
        return tv_frcnn.FasterRCNN(backbone, num_classes=None, box_head=box_head, box_predictor=predictor, **kwargs)
    if arch == "resnet50_fpn_v2":
        model = tv_frcnn.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        if representation_size and representation_size != 1024:
            model.roi_heads.box_head = tv_frcnn.FastRCNNConvFCHead(
                (model.backbone.out_channels, 7, 7), [256, 256, 256, 256], [representation_size],
                norm_layer=nn.BatchNorm2d)
            model.roi_heads.box_predictor = tv_frcnn.FastRCNNPredictor(representation_size, num_classes)
        return model
    if arch in ("mobilenet_v3_large_fpn", "mobilenet_v3_large_320_fpn"):
        builder = getattr(tv_frcnn, f"fasterrcnn_{arch}")
        kwargs.pop("min_size"), kwargs.pop("max_size")  # these builders fix their own sizes
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        model.transform.min_size, model.transform.max_size = (min_size,), max_size
        return model
    raise ValueError(f"unknown Faster R-CNN arch {arch!r}; choose from {', '.join(ARCHS)}")


def to_qann_fasterrcnn(model: nn.Module, levels: int = 4, threshold: float = 1.0, learnable: bool = False,
                       inplace: bool = False) -> nn.Module:
    """Quantize a float torchvision Faster R-CNN: ``TwoMLPHead`` -> ``ReLUTwoMLPHead``, every ReLU -> ClipQuan.

    Returns a copy unless ``inplace``. A model that is already a QANN is returned as is.
    """
    target = model if inplace else copy.deepcopy(model)
    heads = getattr(target, "roi_heads", None)
    if heads is not None and type(heads.box_head) is tv_frcnn.TwoMLPHead:
        heads.box_head = ReLUTwoMLPHead.from_head(heads.box_head)
    has_relu = any(isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.LeakyReLU)) for m in target.modules())
    if not has_relu and any(isinstance(m, ClipQuan) for m in target.modules()):
        return target
    return to_qann(target, levels, threshold=threshold, learnable=learnable, inplace=True)


def build_qann_fasterrcnn(arch: str = "resnet18_fpn", num_classes: int = 91, levels: int = 4, min_size: int = 800,
                          max_size: int = 1333, representation_size: int | None = None, **kwargs) -> nn.Module:
    """``to_qann_fasterrcnn(build_fasterrcnn(...), levels)``."""
    return to_qann_fasterrcnn(build_fasterrcnn(arch, num_classes, min_size, max_size, representation_size, **kwargs),
                              levels, inplace=True)


class RCNNStage1(nn.Module):
    """Backbone + FPN + RPN head: image tensor -> (features, objectness per level, deltas per level)."""

    def __init__(self, backbone: nn.Module, rpn_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.rpn_head = rpn_head

    def forward(self, images: torch.Tensor):
        features = self.backbone(images)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        objectness, deltas = self.rpn_head(list(features.values()))
        return features, objectness, deltas


class RCNNStage2(nn.Module):
    """Box head + box predictor: RoI features [R, C, 7, 7] -> (class logits, box regression)."""

    def __init__(self, box_head: nn.Module, box_predictor: nn.Module):
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor

    def forward(self, roi_features: torch.Tensor):
        return self.box_predictor(self.box_head(roi_features))


def analog_candidates(model: nn.Module) -> list[str]:
    """Paths (in the Faster R-CNN's own naming) of the modules that cannot spike: pass them as ``analog``.

    Outermost non-linear modules only (e.g. a whole SqueezeExcitation, not its Hardsigmoid).
    """
    from ..convert import _NONLINEAR  # the registry convert() checks

    found: list[str] = []
    for path, module in model.named_modules():
        if path and isinstance(module, tuple(_NONLINEAR)) and not any(path.startswith(p + ".") for p in found):
            found.append(path)
    return found


def _split_analog(analog: Iterable[str]) -> tuple[list[str], list[str]]:
    """Model paths -> (stage-1 paths, stage-2 paths)."""
    stage1, stage2 = [], []
    for path in analog:
        if path.startswith("backbone."):
            stage1.append(path)
        elif path.startswith("rpn.head."):
            stage1.append("rpn_head." + path[len("rpn.head."):])
        elif path.startswith("roi_heads.box_head.") or path.startswith("roi_heads.box_predictor."):
            stage2.append(path[len("roi_heads."):])
        else:
            raise ValueError(f"analog path {path!r} is not inside backbone, rpn.head, roi_heads.box_head or "
                             "roi_heads.box_predictor (the spiking parts of Faster R-CNN)")
    return stage1, stage2


# --- results and events ---------------------------------------------------------------------

@dataclass
class RCNNEvent:
    """One time step of ``SpikingFasterRCNN.stream``."""

    stage: int  # 1 (backbone/FPN/RPN) or 2 (box head)
    t: int  # steps of this stage so far (wake + sleep)
    t_total: int  # steps of both stages so far
    phase: str  # "wake" or "sleep"
    wake: int
    spikes: float | None  # spike events in this step
    settled: bool  # has this stage reached its fixed point
    detections: dict | None = None  # stage 2: detections decoded from the readouts so far
    final: bool = False  # the last event; its detections equal predict()'s


def load_checkpoint(path: str | Path, sha256: str | None = None) -> dict:
    """``torch.load(weights_only=True)`` after the file check and the optional sha256 check."""
    data = checkpoint.load(path, sha256)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a state dict or a checkpoint dict, got {type(data).__name__}")
    return data


def _unwrap_state_dict(data: dict) -> tuple[dict, dict]:
    """(state dict, metadata) from our checkpoint, torchvision reference checkpoints or a bare state dict."""
    if data.get("format") == CHECKPOINT_FORMAT:
        return data["state_dict"], dict(data.get("meta", {}))
    if "model" in data and isinstance(data["model"], dict):  # torchvision detection reference
        return data["model"], {}
    if "state_dict" in data and isinstance(data["state_dict"], dict):
        return data["state_dict"], dict(data.get("meta", {}))
    return data, {}


def _infer_from_state_dict(state: dict) -> dict:
    info = {}
    w = state.get("roi_heads.box_predictor.cls_score.weight")
    if w is not None:
        info["num_classes"] = int(w.shape[0])
        info["representation_size"] = int(w.shape[1])
    fpn = state.get("backbone.fpn.layer_blocks.0.0.weight")
    if fpn is not None:
        info["fpn_channels"] = int(fpn.shape[0])
    return info


def model_from_state_dict(state: dict, meta: dict, arch: str | None = None, num_classes: int | None = None,
                          levels: int | None = 4, **build_kwargs) -> nn.Module:
    """Build the model that ``state`` belongs to and load it (strict). Returns a QANN unless ``levels`` is None
    and the checkpoint is a float one."""
    inferred = _infer_from_state_dict(state)
    arch = arch or meta.get("arch") or "resnet50_fpn"
    num_classes = num_classes or meta.get("num_classes") or inferred.get("num_classes") or 91
    kwargs = {k: meta[k] for k in ("min_size", "max_size", "representation_size") if meta.get(k) is not None}
    if "representation_size" not in kwargs and "representation_size" in inferred and arch != "resnet50_fpn_v2":
        kwargs["representation_size"] = inferred["representation_size"]
    if arch in RESNET_ARCHS and "fpn_channels" in inferred:
        kwargs["fpn_channels"] = inferred["fpn_channels"]
    kwargs.update(build_kwargs)
    model = build_fasterrcnn(arch, num_classes, **kwargs)
    is_qann = any(k.endswith("threshold_param") for k in state)
    if is_qann:
        saved = meta.get("levels")
        if saved is not None and levels is not None and saved != levels:
            raise ValueError(f"checkpoint is a QANN with levels={saved}, asked for levels={levels}")
        model = to_qann_fasterrcnn(model, saved or levels or 4, inplace=True)
        model.load_state_dict(with_legacy_quant_state(model, state), strict=True)
    else:
        model.load_state_dict(state, strict=True)
        if levels is not None:
            model = to_qann_fasterrcnn(model, levels, inplace=True)
    return model


def load_float_for_calibration(path: str | Path, sha256: str | None = None) -> tuple[nn.Module, dict]:
    """(float model, metadata) of a Faster R-CNN checkpoint with trainable ``BatchNorm2d`` layers, so that
    ``detector.calibrate`` can re-estimate their statistics after quantization (frozen BatchNorms cannot)."""
    state, meta = _unwrap_state_dict(load_checkpoint(path, sha256))
    if any(k.endswith("threshold_param") for k in state):
        raise ValueError(f"{path} is already a QANN; quantize the float checkpoint it came from")
    arch = meta.get("arch") or "resnet50_fpn"
    frozen = {"frozen_bn": False} if arch in RESNET_ARCHS else {}
    state = dict(state)
    inferred = _infer_from_state_dict(state)
    kwargs = {k: meta[k] for k in ("min_size", "max_size", "representation_size") if meta.get(k) is not None}
    if arch in RESNET_ARCHS and "fpn_channels" in inferred:
        kwargs["fpn_channels"] = inferred["fpn_channels"]
    model = build_fasterrcnn(arch, meta.get("num_classes") or inferred.get("num_classes") or 91, **kwargs, **frozen)
    for name, buffer in model.state_dict().items():  # FrozenBatchNorm2d state dicts have no batch counter
        if name.endswith("num_batches_tracked"):
            state.setdefault(name, torch.zeros_like(buffer))
    model.load_state_dict(state, strict=True)
    return model.eval(), dict(meta, arch=arch)


def calibration_inputs(rgb_images: list[np.ndarray], batch: int = 8) -> list[list[torch.Tensor]]:
    """RGB uint8 images as the lists of CHW tensors a torchvision detector takes, in batches."""
    tensors = [_to_image_tensor(im) for im in rgb_images]
    return [tensors[i:i + batch] for i in range(0, len(tensors), batch)]


def save_qann(qann: nn.Module, path: str | Path, meta: dict) -> Path:
    """Write a quantized Faster R-CNN (e.g. from ``detector.calibrate.quantize``) in our checkpoint format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_checkpoint(path, qann, dict(meta, levels=qann_levels(qann)))
    return path


# --- the spiking detector -------------------------------------------------------------------

def _to_image_tensor(image: Any) -> torch.Tensor:
    from PIL import Image

    from ..images import from_pil, read_image

    if isinstance(image, (str, Path)):  # the project's one reader: EXIF orientation, 16-bit, alpha, CMYK
        image = read_image(image)
    elif isinstance(image, Image.Image):
        image = from_pil(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be HxWx3 RGB, got shape {image.shape}")
        t = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
        return t.float() / 255.0 if image.dtype == np.uint8 else t.float()
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"tensor images must be CHW with 1 or 3 channels, got shape {tuple(image.shape)}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image.float() / 255.0 if image.dtype == torch.uint8 else image
    raise TypeError(f"unsupported image type {type(image).__name__}: give a CHW float tensor in [0, 1], "
                    "an HxWx3 uint8 RGB array, a PIL image, or a path")


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    return [images]


class SpikingFasterRCNN(nn.Module):
    """Two spiking stages around torchvision's own Faster R-CNN decoding code.

    ``qann``: a quantized torchvision Faster R-CNN (``build_qann_fasterrcnn``, ``to_qann_fasterrcnn``),
    converted with CIF neurons and the wake-sleep schedule (``neuron="cif"``, CASC). With
    ``neuron="if"`` it is the **IF baseline** (DESIGN §1 "Baseline to compare with"): ``qann`` is then
    normally a *float* ReLU Faster R-CNN (a QANN is accepted too: its ClipQuan sites get IF neurons with
    calibrated thresholds, like ReLUs), every ReLU call site gets a plain IF neuron (soft reset) whose
    threshold is the ``percentile`` of that site's activations on the ``calibration`` images (a list of
    images, anything ``preprocess`` accepts); stage 2 is calibrated on the RoI features that the float
    network itself computes on those images (same proposal / RoIAlign path). Its schedule is ``wake=T``,
    no sleep; ``levels`` is None, so ``wake`` must be given. ``TwoMLPHead`` is swapped for
    ``ReLUTwoMLPHead`` (on a copy) so that its ReLUs get IF neurons.
    ``analog``: module paths of the Faster R-CNN (e.g. ``"backbone.body.features.1.block.1"``) to keep
    as analog islands (MobileNetV3's Hardswish / squeeze-excitation; see ``analog_candidates``).
    ``self.qann`` is the network converted from (the QANN, or the float model for the IF baseline).
    """

    def __init__(self, qann: nn.Module, analog: Iterable[str] = (), classes: list[str] | None = None,
                 meta: dict | None = None, neuron: str = "cif", calibration: Iterable[Any] | None = None,
                 percentile: float = 99.9, calibration_batch: int = 4):
        super().__init__()
        for attr in ("transform", "backbone", "rpn", "roi_heads"):
            if not hasattr(qann, attr):
                raise TypeError(f"expected a torchvision GeneralizedRCNN (FasterRCNN), got {type(qann).__name__}")
        if neuron not in ("cif", "if"):
            raise ValueError(f'neuron must be "cif" (CASC) or "if" (the IF baseline), got {neuron!r}')
        if neuron == "cif":
            if type(qann.roi_heads.box_head) is tv_frcnn.TwoMLPHead or qann_levels(qann) is None:
                raise ValueError("SpikingFasterRCNN needs a QANN: build it with to_qann_fasterrcnn(model, levels) "
                                 "(it also replaces TwoMLPHead's functional ReLUs); for the IF baseline on a float "
                                 'model pass neuron="if", calibration=images')
        else:
            if calibration is None:
                raise ValueError('neuron="if" (the IF baseline) needs calibration=images: a few images whose '
                                 "activations set each call site's threshold (the percentile)")
            if type(qann.roi_heads.box_head) is tv_frcnn.TwoMLPHead:  # functional ReLUs -> modules, on a copy
                qann = copy.deepcopy(qann)
                qann.roi_heads.box_head = ReLUTwoMLPHead.from_head(qann.roi_heads.box_head)
        self.qann = qann.eval()
        self.neuron = neuron
        self.levels = qann_levels(qann) if neuron == "cif" else None
        self.percentile = percentile if neuron == "if" else None
        self.classes = list(classes) if classes else None
        self.meta = dict(meta or {})
        analog = list(analog)
        a1, a2 = _split_analog(analog)
        self.analog = analog
        self.qann_stage1 = RCNNStage1(qann.backbone, qann.rpn.head)
        self.qann_stage2 = RCNNStage2(qann.roi_heads.box_head, qann.roi_heads.box_predictor)
        try:
            if neuron == "cif":
                self.stage1: SpikingNetwork = convert(self.qann_stage1, analog=a1)
                self.stage2: SpikingNetwork = convert(self.qann_stage2, analog=a2)
            else:
                batches1, batches2 = self._calibration_batches(calibration, calibration_batch)
                self.stage1 = convert(self.qann_stage1, neuron="if", calibration=batches1, percentile=percentile,
                                      analog=a1)
                self.stage2 = convert(self.qann_stage2, neuron="if", calibration=batches2, percentile=percentile,
                                      analog=a2)
        except UnsupportedModuleError as error:
            hint = ""
            if any("mobilenet" in type(m).__name__.lower() or isinstance(m, SqueezeExcitation) for m in qann.modules()):
                hint = ("\nMobileNetV3 backbones use Hardswish and squeeze-excitation, which cannot spike. Keep them "
                        "as analog islands: SpikingFasterRCNN.from_model(qann, analog=analog_candidates(qann)) "
                        "(the fraction of MACs left analog is reported in the run statistics).")
            raise UnsupportedModuleError(error.problems, "Faster R-CNN: these modules cannot spike; name them in "
                                         "analog=[...] (paths of the Faster R-CNN) to keep them analog." + hint) from None

    @torch.no_grad()
    def _calibration_batches(self, images, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(preprocessed image batches for stage 1, RoI feature batches for stage 2), the latter computed by
        the float network through the same proposal / RoIAlign path."""
        images = _as_list(images)
        if not images:
            raise ValueError('neuron="if": calibration=images is empty')
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"calibration_batch must be an integer >= 1, got {batch_size!r}")
        was = self.qann.training
        self.qann.eval()
        batches1, batches2 = [], []
        try:
            for i in range(0, len(images), batch_size):
                image_list, _ = self.preprocess(images[i:i + batch_size])
                features, objectness, deltas = self.qann_stage1(image_list.tensors)
                features = OrderedDict(features)
                proposals = self.proposals(image_list, features, objectness, deltas)
                rois = self.roi_features(features, proposals, image_list)
                batches1.append(image_list.tensors)
                if rois.shape[0]:
                    batches2.append(rois)
        finally:
            self.qann.train(was)
        if not batches2:
            raise ValueError('neuron="if": the calibration images gave no proposals, so stage 2 (box head) '
                             "cannot be calibrated; give other / more images")
        return batches1, batches2

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, levels: int | None = None, analog: Iterable[str] = (),
                   classes: list[str] | None = None, neuron: str = "cif", calibration: Iterable[Any] | None = None,
                   percentile: float = 99.9) -> "SpikingFasterRCNN":
        """From a QANN Faster R-CNN, or from a float one when ``levels`` is given (quantized on a copy).

        ``neuron="if"``: the IF baseline of a float ReLU model (or of a QANN), thresholds = ``percentile`` of
        each call site's activations on the ``calibration`` images; ``levels`` must then be None.
        """
        if neuron == "if":
            if levels is not None:
                raise ValueError('from_model(neuron="if"): the IF baseline converts the float model as it is; '
                                 "levels=... (quantization) applies to CASC only")
            return cls(model, analog=analog, classes=classes, neuron="if", calibration=calibration,
                       percentile=percentile)
        if qann_levels(model) is None:
            if levels is None:
                raise ValueError("from_model: the model is not a QANN; pass levels=... to quantize it "
                                 '(or use to_qann_fasterrcnn), or neuron="if", calibration=images for the IF baseline')
            model = to_qann_fasterrcnn(model, levels)
        return cls(model, analog=analog, classes=classes, neuron=neuron)

    @classmethod
    def from_checkpoint(cls, path: str | Path, arch: str | None = None, num_classes: int | None = None,
                        levels: int | None = None, sha256: str | None = None, analog: Iterable[str] = (),
                        classes: list[str] | None = None, neuron: str = "cif",
                        calibration: Iterable[Any] | None = None, percentile: float = 99.9,
                        **build_kwargs) -> "SpikingFasterRCNN":
        """From a state-dict file: our training checkpoint (arch, classes, sizes, levels from its metadata), a
        torchvision float state dict (``arch`` / ``num_classes`` as given or inferred from the box predictor;
        quantized with ``levels``, default 4), or a torchvision reference checkpoint (``{"model": ...}``).
        A QANN checkpoint keeps its own levels (asking for other ``levels`` is an error).
        ``neuron="if"``: the IF baseline; a float checkpoint is not quantized (``levels`` must be None) and
        ``calibration`` images set the thresholds (see the class docstring).
        ``sha256`` is checked before loading. ``build_kwargs`` go to ``build_fasterrcnn``
        (e.g. ``min_size``, ``max_size``, ``rpn_post_nms_top_n_test``).
        """
        if neuron == "if" and levels is not None:
            raise ValueError('from_checkpoint(neuron="if"): levels=... (quantization) applies to CASC only')
        if neuron == "if" and calibration is None:  # fail before loading
            raise ValueError('neuron="if" (the IF baseline) needs calibration=images: a few images whose '
                             "activations set each call site's threshold (the percentile)")
        data = load_checkpoint(path, sha256)
        state, meta = _unwrap_state_dict(data)
        is_qann = any(k.endswith("threshold_param") for k in state)
        if not is_qann and levels is None and neuron != "if":
            levels = 4
        qann = model_from_state_dict(state, meta, arch=arch, num_classes=num_classes, levels=levels, **build_kwargs)
        return cls(qann, analog=analog, classes=classes or meta.get("classes"), meta=meta, neuron=neuron,
                   calibration=calibration, percentile=percentile)

    # --- pipeline pieces ---------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.qann.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.qann.parameters()).device

    def preprocess(self, images):
        """Images -> (ImageList after GeneralizedRCNNTransform, original sizes)."""
        tensors = [_to_image_tensor(im).to(device=self.device, dtype=self.dtype) for im in _as_list(images)]
        if not tensors:
            raise ValueError("no images given")
        original_sizes = [tuple(t.shape[-2:]) for t in tensors]
        transform = self.qann.transform
        was_training = transform.training
        transform.eval()
        try:
            image_list, _ = transform(tensors)
        finally:
            transform.train(was_training)
        return image_list, original_sizes

    def proposals(self, image_list, features, objectness, deltas) -> list[torch.Tensor]:
        """torchvision's RPN decoding (anchors, box coder, filter_proposals) on given head outputs."""
        rpn = self.qann.rpn
        feature_list = list(features.values())
        anchors = rpn.anchor_generator(image_list, feature_list)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        obj, pred = concat_box_prediction_layers(list(objectness), list(deltas))
        boxes = rpn.box_coder.decode(pred.detach(), anchors).view(num_images, -1, 4)
        was_training = rpn.training
        rpn.eval()
        try:
            kept, _ = rpn.filter_proposals(boxes, obj, image_list.image_sizes, num_anchors_per_level)
        finally:
            rpn.train(was_training)
        return kept

    def roi_features(self, features, proposals, image_list) -> torch.Tensor:
        return self.qann.roi_heads.box_roi_pool(features, proposals, image_list.image_sizes)

    def decode(self, class_logits, box_regression, proposals, image_list, original_sizes,
               score_thresh: float | None = None) -> list[dict]:
        heads = self.qann.roi_heads
        saved = heads.score_thresh
        if score_thresh is not None:
            heads.score_thresh = score_thresh
        try:
            boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals,
                                                                 image_list.image_sizes)
        finally:
            heads.score_thresh = saved
        result = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        return self.qann.transform.postprocess(result, image_list.image_sizes, original_sizes)

    def _empty_stage2(self, like: torch.Tensor):
        n = self.qann.roi_heads.box_predictor.cls_score.out_features
        return like.new_zeros((0, n)), like.new_zeros((0, 4 * n))

    def _annotate(self, results: list[dict], proposals: list[torch.Tensor], run1: RunResult,
                  run2: RunResult | None) -> list[dict]:
        """Each image's steps, settled flag, spikes, SOPs and energy from the two stages' runs (``run2`` is
        None when no image had a proposal; stage-2 rows are the images' RoIs, in order)."""
        s1, s2 = run1.stats, run2.stats if run2 is not None else None
        rows = [len(p) for p in proposals]
        starts = np.cumsum([0] + rows)
        for i, res in enumerate(results):
            a, b = int(starts[i]), int(starts[i + 1])
            t2 = int(run2.steps[a:b].max()) if run2 is not None and b > a else 0
            spikes2 = float(s2.spikes[a:b].sum()) if s2 is not None else 0.0
            energy2 = float(s2.energy_pj[a:b].sum()) if s2 is not None else 0.0
            sops2 = float(s2.sops[a:b].sum()) if s2 is not None else 0.0
            res["steps"] = {"stage1": int(run1.steps[i]), "stage2": t2, "total": int(run1.steps[i]) + t2}
            res["settled"] = bool(run1.settled[i]) and (run2 is None or b == a or bool(run2.settled[a:b].all()))
            res["spikes"] = float(s1.spikes[i]) + spikes2
            res["sops"] = float(s1.sops[i]) + sops2
            res["energy_uj"] = (float(s1.energy_pj[i]) + energy2) * 1e-6
            res["spikes_stage"] = {"stage1": float(s1.spikes[i]), "stage2": spikes2}
            res["proposals"] = rows[i]
            if self.classes:
                res["names"] = [self.classes[int(k) - 1] if 0 < int(k) <= len(self.classes) else str(int(k))
                                for k in res["labels"]]
        return results

    def _schedule(self, wake, sleep, sleep2=None):
        """(wake, sleep, sleep2) checked for this neuron: the IF baseline needs ``wake`` and does not sleep."""
        if self.neuron == "if":
            if wake is None:
                raise ValueError('the IF baseline (neuron="if") has no quantization levels: give wake=T, its number '
                                 "of time steps (no sleep)")
            sleep = 0 if sleep == "auto" else sleep
            sleep2 = 0 if sleep2 == "auto" else sleep2
        return wake, sleep, sleep2

    @staticmethod
    def _truncated(wake: int, sleep, max_sleep: int, last: int) -> tuple[int, Any, int]:
        """A schedule whose first ``last`` steps are those of (wake, sleep) and that stops there (a stream of
        wake W' <= W has the same first W' steps: wake steps do not depend on how many follow)."""
        if last <= wake:
            return last, 0, max_sleep
        if sleep == "auto":
            return wake, "auto", min(max_sleep, last - wake)
        return wake, min(int(sleep), last - wake), max_sleep

    def _readouts_at(self, net: SpikingNetwork, x: torch.Tensor, timesteps: list[int], wake: int, sleep,
                     burst: int | None, max_sleep: int) -> Iterator[tuple]:
        """One stream of ``net`` on ``x``; yields ``(ts, readout, steps used, energy so far, settled, run)`` per sample for the
        readout after step ``t`` of the schedule, grouping every requested ``t`` that shares it: once the stream
        ends (settled, or out of sleep steps) every larger ``t`` gets its final readout. A sample that settled
        at step ``s`` (the silent step included, as ``predict`` counts it) uses ``min(t, s)`` steps. ``run``: the
        stream's ``RunResult`` on the group served by its last step, else None."""
        ts = sorted(set(timesteps))
        w, s, ms = self._truncated(wake, sleep, max_sleep, ts[-1])
        settle = torch.zeros(x.shape[0], dtype=torch.long)
        energy = torch.zeros(x.shape[0], dtype=torch.float64)
        pending, last, i = None, None, 0
        for ev in net.stream(x, wake=w, sleep=s, burst=burst, max_sleep=ms):
            settled = ev.settled.cpu()
            settle[settled & (settle == 0)] = ev.t
            energy = energy + ev.energy_pj.cpu()
            if i < len(ts) and ev.t == ts[i]:
                if pending is not None:
                    yield pending
                pending = ([ev.t], ev.readout, torch.where(settle > 0, settle, torch.full_like(settle, ev.t)), energy,
                           settle > 0, ev.result)
                i += 1
            last = ev
        rest = ts[i:]
        if rest:
            if pending is not None and pending[0][-1] == last.t:
                pending[0].extend(rest)
            else:
                if pending is not None:
                    yield pending
                pending = (rest, last.readout, torch.where(settle > 0, settle, torch.full_like(settle, last.t)), energy,
                           settle > 0, last.result)
        yield pending

    def _stage2_schedule(self, wake, sleep, burst, wake2, sleep2, burst2):
        return (wake2 or wake, sleep if sleep2 is None else sleep2, burst2 or burst)

    # --- public API ----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images, wake: int | None = None, sleep: int | str = "auto", mode: str = "step",
                burst: int | None = None, score_thresh: float | None = None, max_sleep: int = 256,
                wake2: int | None = None, sleep2: int | str | None = None, burst2: int | None = None,
                cancel: threading.Event | None = None) -> list[dict]:
        """Detections per image, torchvision's format plus ``steps`` (stage 1, stage 2, total T),
        ``spikes``, ``sops``, ``energy_uj`` (estimate, both stages), ``settled``, ``proposals``.

        ``wake``/``sleep``/``burst`` apply to both stages unless ``wake2``/``sleep2``/``burst2`` are given
        (``burst`` defaults to the wake count). IF baseline (``neuron="if"``): ``wake`` (= T) is required and
        ``sleep="auto"`` means no sleep. ``cancel``: an event checked between steps (``RunCancelled``).
        """
        wake, sleep, sleep2 = self._schedule(wake, sleep, sleep2)
        image_list, original_sizes = self.preprocess(images)
        run1 = self.stage1.run(image_list.tensors, wake=wake, sleep=sleep, mode=mode, burst=burst,
                               max_sleep=max_sleep, cancel=cancel)
        features, objectness, deltas = run1.readout
        features = OrderedDict(features)
        proposals = self.proposals(image_list, features, objectness, deltas)
        rois = self.roi_features(features, proposals, image_list)
        run2 = None
        if rois.shape[0] > 0:
            w2, s2, b2 = self._stage2_schedule(wake, sleep, burst, wake2, sleep2, burst2)
            run2 = self.stage2.run(rois, wake=w2, sleep=s2, mode=mode, burst=b2, max_sleep=max_sleep, cancel=cancel)
            logits, regression = run2.readout
        else:
            logits, regression = self._empty_stage2(rois)
        results = self.decode(logits, regression, proposals, image_list, original_sizes, score_thresh)
        return self._annotate(results, proposals, run1, run2)

    @torch.no_grad()
    def internals(self, images, spiking: bool = True, **schedule) -> dict:
        """The intermediate outputs of one image batch: ``features``, ``objectness``, ``deltas``, ``proposals``,
        ``class_logits``, ``box_regression`` of the spiking stages (``spiking=True``, with ``schedule`` as for
        ``predict``) or of the network converted from (``spiking=False``), plus ``runs`` (the stages'
        ``RunResult``s; empty for the QANN)."""
        image_list, _ = self.preprocess(images)
        runs = []
        if spiking:
            wake, sleep, sleep2 = self._schedule(schedule.get("wake"), schedule.get("sleep", "auto"),
                                                 schedule.get("sleep2"))
            run1 = self.stage1.run(image_list.tensors, wake=wake, sleep=sleep, burst=schedule.get("burst"),
                                   mode=schedule.get("mode", "step"), max_sleep=schedule.get("max_sleep", 256))
            features, objectness, deltas = run1.readout
            runs.append(run1)
        else:
            features, objectness, deltas = self.qann_stage1(image_list.tensors)
        features = OrderedDict(features)
        proposals = self.proposals(image_list, features, objectness, deltas)
        rois = self.roi_features(features, proposals, image_list)
        if not rois.shape[0]:
            logits, regression = self._empty_stage2(rois)
        elif spiking:
            w2, s2, b2 = self._stage2_schedule(wake, sleep, schedule.get("burst"), schedule.get("wake2"), sleep2,
                                               schedule.get("burst2"))
            run2 = self.stage2.run(rois, wake=w2, sleep=s2, burst=b2, mode=schedule.get("mode", "step"),
                                   max_sleep=schedule.get("max_sleep", 256))
            logits, regression = run2.readout
            runs.append(run2)
        else:
            logits, regression = self.qann_stage2(rois)
        return {"features": features, "objectness": objectness, "deltas": deltas, "proposals": proposals,
                "class_logits": logits, "box_regression": regression, "runs": runs}

    @torch.no_grad()
    def stream(self, image, wake: int | None = None, sleep: int | str = "auto", burst: int | None = None,
               score_thresh: float | None = None, max_sleep: int = 256, wake2: int | None = None,
               sleep2: int | str | None = None, burst2: int | None = None,
               cancel: threading.Event | None = None) -> Iterator[RCNNEvent]:
        """Events for one image: every stage-1 step, then every stage-2 step with the detections decoded
        from stage 2's readouts so far. The last event (``final=True``) equals ``predict(image)``'s result."""
        images = _as_list(image)
        if len(images) != 1:
            raise ValueError("stream takes one image")
        wake, sleep, sleep2 = self._schedule(wake, sleep, sleep2)
        image_list, original_sizes = self.preprocess(images)
        last1 = None
        for ev in self.stage1.stream(image_list.tensors, wake=wake, sleep=sleep, burst=burst, max_sleep=max_sleep,
                                     cancel=cancel):
            last1 = ev
            yield RCNNEvent(stage=1, t=ev.t, t_total=ev.t, phase=ev.phase, wake=ev.wake, spikes=float(ev.spikes.sum()),
                            settled=bool(ev.settled.all()))
        run1 = last1.result
        features, objectness, deltas = run1.readout
        features = OrderedDict(features)
        proposals = self.proposals(image_list, features, objectness, deltas)
        rois = self.roi_features(features, proposals, image_list)
        pending, run2 = None, None
        if rois.shape[0] > 0:
            w2, s2, b2 = self._stage2_schedule(wake, sleep, burst, wake2, sleep2, burst2)
            for ev in self.stage2.stream(rois, wake=w2, sleep=s2, burst=b2, max_sleep=max_sleep, cancel=cancel):
                logits, regression = ev.readout
                dets = self.decode(logits, regression, proposals, image_list, original_sizes, score_thresh)[0]
                if pending is not None:
                    yield pending
                pending = RCNNEvent(stage=2, t=ev.t, t_total=run1.steps.item() + ev.t, phase=ev.phase, wake=ev.wake,
                                    spikes=float(ev.spikes.sum()), settled=bool(ev.settled.all()), detections=dets)
                run2 = ev.result
        else:
            logits, regression = self._empty_stage2(rois)
            dets = self.decode(logits, regression, proposals, image_list, original_sizes, score_thresh)[0]
            pending = RCNNEvent(stage=2, t=0, t_total=run1.steps.item(), phase="sleep", wake=0, spikes=0.0,
                                settled=True, detections=dets)
        pending.detections = self._annotate([pending.detections], proposals, run1, run2)[0]
        pending.final = True
        yield pending

    @torch.no_grad()
    def detections_at_steps(self, images, timesteps: Iterable[int], wake: int | None = None, sleep: int | str = "auto",
                            burst: int | None = None, score_thresh: float | None = None,
                            max_sleep: int = 256) -> tuple[dict[int, list[dict]], dict]:
        """Anytime detections for evaluation: for every ``t`` in ``timesteps``, the detections (one dict per image,
        ``predict``'s format: boxes, scores, labels, plus ``steps`` and ``names``) when *each* stage gets a budget
        of ``t`` steps of its own schedule.

        Stage 1's readout after its step ``t`` (a sample that settled earlier keeps its settled readout), the
        proposals from it, stage 2 on those RoI features and its readout after *its* step ``t``. One stage-1
        stream up to ``max(timesteps)`` (or until settled) serves every ``t``; stage 2 runs once per distinct
        stage-1 readout, up to the largest ``t`` that shares it, so after both stages settle every larger ``t``
        reuses one result (the same dicts). Schedules: CASC ``wake`` (default ``levels``) + ``sleep``; the IF
        baseline ``wake=t, sleep=0`` (its stream's readout after step ``t`` is the wake=``t`` result; ``wake``
        and ``sleep`` must be left at their defaults).

        Returns ``(detections, info)``: ``detections[t]`` a list per image (``steps`` per stage and total);
        ``info``: per image ``steps`` and ``settled`` of the run serving the largest ``t`` (total of both
        stages), ``energy_uj_at[t]`` (both stages, each to its budget ``t``), ``energy_uj``, ``stage1_steps_at``
        / ``stage2_steps_at`` / ``steps_at`` (per image, at each ``t``), ``ann_energy_uj`` (per image: stage 1
        plus stage 2 once per RoI) and stage 1's ``firing_rates``.
        """
        ts = sorted({int(t) for t in timesteps}) if timesteps is not None else []
        if not ts or any(isinstance(t, bool) or t < 1 for t in timesteps):
            raise ValueError(f"timesteps must be a non-empty list of integers >= 1, got {timesteps!r}")
        if self.neuron == "if":
            if wake is not None or sleep not in ("auto", 0):
                raise ValueError('detections_at_steps on the IF baseline: its schedule at t is wake=t, sleep=0; '
                                 "leave wake and sleep at their defaults")
            wake, sleep = ts[-1], 0
        elif wake is None:
            wake = self.levels
        image_list, original_sizes = self.preprocess(images)
        n_images = image_list.tensors.shape[0]
        detections: dict[int, list[dict]] = {}
        info: dict[str, Any] = {"energy_uj_at": {}, "stage1_steps_at": {}, "stage2_steps_at": {}, "steps_at": {}}
        settled_at: dict[int, list[bool]] = {}
        ann_macs1 = ann_macs2 = None
        for group1, readout, used1, energy1, settled1, run1 in self._readouts_at(self.stage1, image_list.tensors, ts, wake, sleep,
                                                                 burst, max_sleep):
            features, objectness, deltas = readout
            features = OrderedDict(features)
            proposals = self.proposals(image_list, features, objectness, deltas)
            rois = self.roi_features(features, proposals, image_list)
            rows = [len(p) for p in proposals]
            starts = np.cumsum([0] + rows)
            if rois.shape[0]:
                wake2 = group1[-1] if self.neuron == "if" else wake
                stage2 = self._readouts_at(self.stage2, rois, group1, wake2, sleep, burst, max_sleep)
            else:
                logits, regression = self._empty_stage2(rois)
                stage2 = [(group1, (logits, regression), torch.zeros(0, dtype=torch.long),
                           torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), None)]
            for group2, (logits, regression), used2, energy2, settled2, _ in stage2:
                dets = self.decode(logits, regression, proposals, image_list, original_sizes, score_thresh)
                per_image = [(int(starts[i]), int(starts[i + 1])) for i in range(n_images)]
                s1 = [int(used1[i]) for i in range(n_images)]
                s2 = [int(used2[a:b].max()) if b > a else 0 for a, b in per_image]
                e = [float(energy1[i]) + float(energy2[a:b].sum()) for i, (a, b) in enumerate(per_image)]
                settled = [bool(settled1[i]) and bool(settled2[a:b].all()) for i, (a, b) in enumerate(per_image)]
                for det, a, b in zip(dets, s1, s2):
                    det["steps"] = {"stage1": a, "stage2": b, "total": a + b}
                    if self.classes:
                        det["names"] = [self.classes[int(k) - 1] if 0 < int(k) <= len(self.classes) else str(int(k))
                                        for k in det["labels"]]
                for t in group2:
                    detections[t] = dets
                    info["energy_uj_at"][t] = [v * 1e-6 for v in e]
                    info["stage1_steps_at"][t], info["stage2_steps_at"][t] = s1, s2
                    info["steps_at"][t] = [a + b for a, b in zip(s1, s2)]
                    settled_at[t] = settled
            if ann_macs2 is None and rois.shape[0]:
                ann_macs2 = self._ann_macs(self.qann_stage2, rois[:1])
            ann_macs1 = ann_macs1 or self._ann_macs(self.qann_stage1, image_list.tensors[:1])
            final_rows = rows
            if run1 is not None:
                info["firing_rates"] = run1.stats.firing_rates
        last = ts[-1]
        info["steps"] = info["steps_at"][last]
        info["energy_uj"] = info["energy_uj_at"][last]
        info["settled"] = settled_at[last]
        info["ann_energy_uj"] = [(ann_macs1 + (ann_macs2 or 0) * n) * PJ_PER_MAC * 1e-6 for n in final_rows]
        info["proposals"] = final_rows
        return detections, info

    @staticmethod
    def _ann_macs(stage: nn.Module, x: torch.Tensor) -> int:
        """MACs of one forward of an ANN stage for one sample (one image, or one RoI for stage 2)."""
        return count_macs(stage, x)

    @torch.no_grad()
    def qann_predict(self, images, score_thresh: float | None = None) -> list[dict]:
        """The network it was converted from (``self.qann``) through the same pipeline (same decoding code), for
        comparison: the QANN for CASC, the float ANN (the ANN baseline) for ``neuron="if"``."""
        image_list, original_sizes = self.preprocess(images)
        was = self.qann.training
        self.qann.eval()
        try:
            out = self.internals(images, spiking=False)
        finally:
            self.qann.train(was)
        return self.decode(out["class_logits"], out["box_regression"], out["proposals"], image_list, original_sizes,
                           score_thresh)

    def forward(self, images, **kwargs):
        return self.predict(images, **kwargs)


# --- training (casc train rcnn) ------------------------------------------------------------------

def _open_dataset(spec: str, split: str):
    path = Path(spec)
    if ":" not in spec.split("/")[0] and path.is_dir():  # a bare directory: detect the layout
        if (path / "annotations").is_dir():
            spec = f"coco:{spec}"
        elif (path / "Annotations").is_dir():
            spec = f"voc:{spec}"
    from ..data import open_dataset  # the project's readers

    return open_dataset(spec, split=split)


class _TorchvisionTargets(torch.utils.data.Dataset):
    """Dataset contract -> (CHW float tensor in [0, 1], torchvision target with 1-based labels)."""

    def __init__(self, ds, drop_difficult: bool = False):
        self.ds = ds
        self.drop_difficult = drop_difficult

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, target = self.ds[i]
        boxes = torch.as_tensor(np.asarray(target["boxes"], dtype=np.float32)).reshape(-1, 4)
        labels = torch.as_tensor(np.asarray(target["labels"], dtype=np.int64)).reshape(-1) + 1
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if self.drop_difficult and "difficult" in target:
            keep &= ~torch.as_tensor(np.asarray(target["difficult"], dtype=np.bool_)).reshape(-1)
        image = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / 255.0
        return image, {"boxes": boxes[keep], "labels": labels[keep]}


def _collate(batch):
    return tuple(zip(*batch))


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``casc train rcnn``."""
    parser.add_argument("--arch", default="resnet50_fpn", choices=ARCHS)
    parser.add_argument("--weights", default=None, help="start from this state-dict file (torchvision float "
                        "weights, a reference checkpoint, or one of ours); default: random init")
    parser.add_argument("--sha256", default=None, help="expected sha256 of --weights")
    parser.add_argument("--data", required=True, help="coco:DIR | voc:DIR | COCO or VOC directory | data.yaml | bundled")
    parser.add_argument("--split", default="train")
    parser.add_argument("--levels", type=int, default=4, help="quantization levels L of the QANN")
    parser.add_argument("--float", action="store_true", help="train the float model (no quantization)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="default 0.02 * batch / 16 (torchvision reference)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=1000)
    parser.add_argument("--lr-steps", type=int, nargs="*", default=None, help="epochs where lr *= lr-gamma "
                        "(default: 2/3 and 11/12 of --epochs)")
    parser.add_argument("--lr-gamma", type=float, default=0.1)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--representation-size", type=int, default=None, help="box head width (slim head)")
    parser.add_argument("--fpn-channels", type=int, default=256, help="ResNet FPN width (128: slim)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after the epoch in which this much training time has passed")
    parser.add_argument("--trainable-layers", type=int, default=3)
    parser.add_argument("--train-bn", action="store_true",
                        help="trainable BatchNorm in the backbone (training from scratch); a QANN fine-tuned "
                             "from such weights freezes the learnt statistics again")
    parser.add_argument("--out", default="runs/rcnn")
    parser.add_argument("--resume", default=None, help="continue from this checkpoint (model, optimizer, scheduler, epoch)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def _save_checkpoint(path: Path, model: nn.Module, meta: dict, **extra) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "state_dict": state, "meta": meta,
                     **extra}, path)


def train_from_args(args: argparse.Namespace) -> Path:
    """Fine-tune a Faster R-CNN QANN (or the float model with ``--float``); returns the checkpoint path."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    ds = _open_dataset(args.data, args.split)
    if len(ds) == 0:
        raise ValueError(f"dataset {args.data} ({args.split}) is empty")
    classes = list(ds.classes)
    num_classes = len(classes) + 1
    levels = None if args.float else args.levels
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = args.arch
    build = dict(min_size=args.min_size, max_size=args.max_size, trainable_layers=args.trainable_layers)
    if args.train_bn and not args.weights and not args.resume:
        build["frozen_bn"] = False
    if args.representation_size:
        build["representation_size"] = args.representation_size
    if args.fpn_channels != 256 and not args.weights and not args.resume:
        build["fpn_channels"] = args.fpn_channels

    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        state, meta = _unwrap_state_dict(resume)
        arch = meta.get("arch", arch)
        levels = meta.get("levels")
        model = model_from_state_dict(state, meta, arch=arch, levels=levels,
                                      trainable_layers=args.trainable_layers)
        if meta.get("num_classes") != num_classes:
            raise ValueError(f"--resume checkpoint has {meta.get('num_classes')} classes, the dataset {num_classes}")
    elif args.weights:
        state, meta = _unwrap_state_dict(load_checkpoint(args.weights, args.sha256))
        arch = meta.get("arch", arch)
        model = model_from_state_dict(state, meta, arch=arch, levels=None,
                                      **{k: v for k, v in build.items() if k != "representation_size"})
        model.transform.min_size, model.transform.max_size = (args.min_size,), args.max_size
        predictor = model.roi_heads.box_predictor
        if predictor.cls_score.out_features != num_classes:  # new label set: a fresh predictor
            model.roi_heads.box_predictor = tv_frcnn.FastRCNNPredictor(predictor.cls_score.in_features, num_classes)
        if levels is not None:
            model = to_qann_fasterrcnn(model, levels, inplace=True)
        elif qann_levels(model) is not None:
            levels = qann_levels(model)
    else:
        model = build_fasterrcnn(arch, num_classes, **build)
        if levels is not None:
            model = to_qann_fasterrcnn(model, levels, inplace=True)
    rep = model.roi_heads.box_predictor.cls_score.in_features
    meta = {"arch": arch, "num_classes": num_classes, "levels": levels, "classes": classes,
            "min_size": int(model.transform.min_size[0]), "max_size": int(model.transform.max_size),
            "representation_size": int(rep), "fpn_channels": int(model.backbone.out_channels), "data": str(args.data)}
    model.to(device)

    loader = torch.utils.data.DataLoader(
        _TorchvisionTargets(ds), batch_size=args.batch, shuffle=True, num_workers=args.workers,
        collate_fn=_collate, drop_last=False, persistent_workers=False)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else 0.02 * args.batch / 16
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    steps = args.lr_steps if args.lr_steps else sorted({max(1, round(args.epochs * 2 / 3)),
                                                        max(1, round(args.epochs * 11 / 12))})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=args.lr_gamma)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start = int(resume["epoch"]) + 1
    path = out / "last.pt"
    if start >= args.epochs:
        print(f"already trained {start} epochs (--epochs {args.epochs}); nothing to do", file=sys.stderr)
        return Path(args.resume)

    started = time.monotonic()
    for epoch in range(start, args.epochs):
        if args.max_minutes is not None and time.monotonic() - started > args.max_minutes * 60:
            print(f"stopping before epoch {epoch + 1}: --max-minutes {args.max_minutes} reached", file=sys.stderr)
            break
        model.train()
        warmup = None
        if epoch == 0 and args.warmup_iters > 0:
            iters = min(args.warmup_iters, len(loader) - 1)
            if iters > 0:
                factor = 1.0 / 1000
                warmup = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda it: factor + (1 - factor) * min(it, iters) / iters)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr, dynamic_ncols=True)
        running = 0.0
        for i, (images, targets) in enumerate(bar):
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with torch.autocast(device_type="cuda", enabled=use_amp):
                losses = model(images, targets)
                loss = sum(losses.values())
            if not math.isfinite(float(loss.detach())):
                raise ValueError(f"loss is {float(loss.detach())} at epoch {epoch + 1}, batch {i}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if warmup is not None:
                warmup.step()
            running += float(loss.detach())
            bar.set_postfix(loss=f"{running / (i + 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if warmup is not None:  # leave the base lr for the multi-step schedule
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"]
        scheduler.step()
        model.eval()
        _save_checkpoint(path, model, meta, epoch=epoch, optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                         loss=running / max(len(loader), 1))
    return path


__all__ = [
    "SpikingFasterRCNN", "RCNNEvent", "RCNNStage1", "RCNNStage2", "ReLUTwoMLPHead", "ARCHS",
    "build_fasterrcnn", "build_qann_fasterrcnn", "to_qann_fasterrcnn", "analog_candidates", "load_checkpoint",
    "model_from_state_dict", "add_train_arguments", "train_from_args",
]
