"""torchvision Faster R-CNN -> quantized ANN -> two-stage spiking detector (DESIGN §1 "Detection heads").

    from detector.models.rcnn import SpikingFasterRCNN
    det = SpikingFasterRCNN.from_checkpoint("fasterrcnn.pth", arch="resnet50_fpn", levels=4)
    results = det.predict(["street.jpg"])          # [Results]: .boxes (0-based cls), .steps, .stage_steps, ...
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
   original image coordinates (torchvision's labels are 1-based, 0 the background; ``Results`` classes
   are 0-based), then ``conf`` / an extra class-wise NMS at ``iou`` / ``max_det`` / ``classes``.

With ``wake = L`` and ``sleep="auto"`` in both stages, every readout equals the QANN's output, so
proposals and detections equal the QANN's (float64; see DESIGN "Float precision").

Adapter work done here: ``MODULE_RULES`` (passed to every ``convert``) declares the (conv, bn) pairs of
torchvision's BasicBlock / Bottleneck / ResNet stem so that (Frozen)BatchNorm folds, FPN's
``LastLevelMaxPool`` (a stride-2 subsampling) linear and squeeze-excitation non-linear; ``TwoMLPHead``
(functional ``F.relu``) is replaced by ``ReLUTwoMLPHead`` (same parameters, ReLU modules).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from contextlib import contextmanager
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
from torchvision.ops import batched_nms
from torchvision.ops.misc import FrozenBatchNorm2d, SqueezeExcitation

from ..convert import UnsupportedModuleError, convert
from ..rules import ModuleRules, resolve
from ..quant import ClipQuan, qann_levels, to_qann, with_legacy_quant_state
from ..energy import PJ_PER_MAC, count_macs
from ..runtime import RunResult, SpikingNetwork
from ..detect import Batch, Boxes, DetectionEvent, Results, Schedule, Selection, SpikingDetector, read_bgr
from ..detect.base import source_path
from .. import checkpoint

# --- what the converter must know about torchvision's detection modules (convert(..., rules=)) -------

MODULE_RULES = ModuleRules(
    # BasicBlock / Bottleneck apply bn_i directly to conv_i's output; the ResNet stem (kept as
    # children "conv1", "bn1", ... of IntermediateLayerGetter, which runs its children in order) too.
    bn_pairs={
        tv_resnet.BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
        tv_resnet.Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
        IntermediateLayerGetter: (("conv1", "bn1"),),
    },
    # F.max_pool2d(kernel_size=1, stride=2): a subsampling, linear in its input.
    linear=(LastLevelMaxPool,),
    # x * hardsigmoid(fc(avgpool(x))): a product of signals, cannot spike (keep it analog).
    nonlinear=(SqueezeExcitation,),
)

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
    nonlinear = resolve(MODULE_RULES).nonlinear  # what convert(..., rules=MODULE_RULES) refuses
    found: list[str] = []
    for path, module in model.named_modules():
        if path and isinstance(module, nonlinear) and not any(path.startswith(p + ".") for p in found):
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
    save_checkpoint(path, qann, dict(meta, levels=qann_levels(qann)))
    return path


# --- the spiking detector -------------------------------------------------------------------

def _to_image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An HxWx3 RGB array (uint8, or floats in [0, 1]) or a CHW tensor (1 or 3 channels) -> CHW float in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be HxWx3 RGB, got shape {image.shape}")
        t = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
        return t.float() / 255.0 if image.dtype == np.uint8 else t.float()
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"tensor images must be CHW with 1 or 3 channels, got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.float() / 255.0 if image.dtype == torch.uint8 else image


class SpikingFasterRCNN(SpikingDetector, nn.Module):
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
    Numpy images are RGB (torchvision's convention) unless ``color="bgr"``; tensors are CHW in [0, 1].
    """

    color = "rgb"

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
        self.names = class_names(self.classes, qann.roi_heads.box_predictor.cls_score.out_features - 1)
        self.meta = dict(meta or {})
        analog = list(analog)
        a1, a2 = _split_analog(analog)
        self.analog = analog
        self.qann_stage1 = RCNNStage1(qann.backbone, qann.rpn.head)
        self.qann_stage2 = RCNNStage2(qann.roi_heads.box_head, qann.roi_heads.box_predictor)
        try:
            if neuron == "cif":
                self.stage1: SpikingNetwork = convert(self.qann_stage1, analog=a1, rules=MODULE_RULES)
                self.stage2: SpikingNetwork = convert(self.qann_stage2, analog=a2, rules=MODULE_RULES)
            else:
                batches1, batches2 = self._calibration_batches(calibration, calibration_batch)
                self.stage1 = convert(self.qann_stage1, neuron="if", calibration=batches1, percentile=percentile,
                                      analog=a1, rules=MODULE_RULES)
                self.stage2 = convert(self.qann_stage2, neuron="if", calibration=batches2, percentile=percentile,
                                      analog=a2, rules=MODULE_RULES)
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
        if isinstance(images, (list, tuple)) and not images:
            raise ValueError('neuron="if": calibration=images is empty')
        images = self._items(images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"calibration_batch must be an integer >= 1, got {batch_size!r}")
        batches1, batches2 = [], []
        with _eval_mode(self.qann):
            for i in range(0, len(images), batch_size):
                image_list, _ = self.preprocess(images[i:i + batch_size])
                features, objectness, deltas = self.qann_stage1(image_list.tensors)
                features = OrderedDict(features)
                proposals = self.proposals(image_list, features, objectness, deltas)
                rois = self.roi_features(features, proposals, image_list)
                batches1.append(image_list.tensors)
                if rois.shape[0]:
                    batches2.append(rois)
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

    def _split_tensor(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() == 4:
            return list(x)
        return [x]

    def _prepare(self, items, color: str) -> Batch:
        """Images -> ``Batch`` whose ``x`` is the ImageList after GeneralizedRCNNTransform."""
        images = [None if isinstance(item, torch.Tensor) else read_bgr(item, color) for item in items]
        tensors = [_to_image_tensor(item if bgr is None else bgr[..., ::-1]).to(device=self.device, dtype=self.dtype)
                   for item, bgr in zip(items, images)]
        with _eval_mode(self.qann.transform) as transform:
            image_list, _ = transform(tensors)
        return Batch(image_list, [tuple(t.shape[-2:]) for t in tensors], images, [source_path(i) for i in items])

    def proposals(self, image_list, features, objectness, deltas) -> list[torch.Tensor]:
        """torchvision's RPN decoding (anchors, box coder, filter_proposals) on given head outputs."""
        rpn = self.qann.rpn
        feature_list = list(features.values())
        anchors = rpn.anchor_generator(image_list, feature_list)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        obj, pred = concat_box_prediction_layers(list(objectness), list(deltas))
        boxes = rpn.box_coder.decode(pred.detach(), anchors).view(num_images, -1, 4)
        with _eval_mode(rpn):
            kept, _ = rpn.filter_proposals(boxes, obj, image_list.image_sizes, num_anchors_per_level)
        return kept

    def roi_features(self, features, proposals, image_list) -> torch.Tensor:
        return self.qann.roi_heads.box_roi_pool(features, proposals, image_list.image_sizes)

    def decode(self, class_logits, box_regression, proposals, image_list, original_sizes,
               score_thresh: float | None = None) -> list[dict]:
        """torchvision's box decoding: per image ``{"boxes", "scores", "labels"}`` (labels 1-based, 0 the
        background) in original pixels; ``score_thresh`` None keeps the model's own."""
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

    def _stages(self, image_list, schedule: Schedule | None, cancel: threading.Event | None = None) -> dict:
        """Both stages and the glue between them (proposals, RoIAlign): spiking with ``schedule``, else the
        network converted from. ``runs``: the stages' ``RunResult``s (none for the QANN; stage 2 runs only
        when some image has a proposal)."""
        runs = []
        if schedule is None:
            features, objectness, deltas = self.qann_stage1(image_list.tensors)
        else:
            runs.append(self.stage1.run(image_list.tensors, mode=schedule.mode, cancel=cancel, **schedule.run_kwargs()))
            features, objectness, deltas = runs[0].readout
        features = OrderedDict(features)
        proposals = self.proposals(image_list, features, objectness, deltas)
        rois = self.roi_features(features, proposals, image_list)
        if not rois.shape[0]:
            logits, regression = self._empty_stage2(rois)
        elif schedule is None:
            logits, regression = self.qann_stage2(rois)
        else:
            runs.append(self.stage2.run(rois, mode=schedule.mode, cancel=cancel, **schedule.run_kwargs()))
            logits, regression = runs[1].readout
        return {"features": features, "objectness": objectness, "deltas": deltas, "proposals": proposals,
                "class_logits": logits, "box_regression": regression, "runs": runs}

    def _infer(self, batch: Batch, schedule: Schedule | None, cancel) -> dict:
        with _eval_mode(self.qann):
            return {**self._stages(batch.x, schedule, cancel), "wake": schedule.wake if schedule else None}

    def _results(self, batch: Batch, out: dict, keep: Selection) -> list[Results]:
        """Decoded detections as ``Results``: score above ``conf``, an extra class-wise NMS at ``iou`` (on top
        of the model's own), at most ``max_det``, only ``classes``; classes 0-based."""
        dets = self.decode(out["class_logits"], out["box_regression"], out["proposals"], batch.x, batch.shapes,
                           keep.conf)
        results = []
        for i, det in enumerate(dets):
            boxes = Boxes(det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu() - 1, batch.shapes[i])
            if keep.classes is not None:
                boxes = boxes.select(torch.isin(boxes.cls, torch.tensor(keep.classes)))
            boxes = boxes.select(batched_nms(boxes.xyxy, boxes.conf, boxes.cls, keep.iou)[:keep.max_det])
            results.append(batch.result(i, boxes, self.names))
        return results

    def _postprocess(self, batch: Batch, out: dict, keep: Selection) -> list[Results]:
        results = self._results(batch, out, keep)
        if out["runs"]:
            run1, run2 = (out["runs"] + [None])[:2]
            for r, figures in zip(results, self._figures(out["proposals"], run1, run2)):
                _set(r, figures, wake=out["wake"])
        return results

    def _figures(self, proposals: list[torch.Tensor], run1: RunResult, run2: RunResult | None) -> list[dict]:
        """Each image's steps (total and per stage), settled flag, spikes, energy and proposal count from the
        two stages' runs (``run2`` is None when no image had a proposal; its rows are the images' RoIs). Spikes
        and energy are None when the runs have no ``stats`` (an engine that counts no spikes: ONNX Runtime)."""
        s1, s2 = run1.stats, run2.stats if run2 is not None else None
        figures = []
        for i, (a, b) in enumerate(_row_ranges(proposals)):
            t1 = int(run1.steps[i])
            t2 = int(run2.steps[a:b].max()) if run2 is not None and b > a else 0
            spikes = energy = None
            if s1 is not None:
                spikes = float(s1.spikes[i]) + (float(s2.spikes[a:b].sum()) if s2 is not None else 0.0)
                energy = (float(s1.energy_pj[i]) + (float(s2.energy_pj[a:b].sum()) if s2 is not None else 0.0)) * 1e-6
            figures.append({
                "steps": t1 + t2, "stage_steps": {"stage1": t1, "stage2": t2},
                "settled": bool(run1.settled[i]) and (run2 is None or b == a or bool(run2.settled[a:b].all())),
                "spikes": spikes, "energy_uj": energy, "proposals": b - a})
        return figures

    @staticmethod
    def _truncated(wake: int, sleep, max_sleep: int, last: int) -> tuple[int, Any, int]:
        """A schedule whose first ``last`` steps are those of (wake, sleep) and that stops there (a stream of
        wake W' <= W has the same first W' steps: wake steps do not depend on how many follow)."""
        if last <= wake:
            return last, 0, max_sleep
        if sleep == "auto":
            return wake, "auto", min(max_sleep, last - wake)
        return wake, min(int(sleep), last - wake), max_sleep

    def _readouts_at(self, net: SpikingNetwork, x: torch.Tensor, timesteps: list[int], schedule: Schedule,
                     wake: int) -> Iterator[tuple]:
        """One stream of ``net`` on ``x``; yields ``(ts, readout, steps used, energy so far, spikes so far, settled,
        run)`` per sample for the readout after step ``t`` of the schedule, grouping every requested ``t`` that
        shares it: once the stream ends (settled, or out of sleep steps) every larger ``t`` gets its final
        readout. A sample that settled at step ``s`` (the silent step included, as ``predict`` counts it) uses
        ``min(t, s)`` steps. ``run``: the stream's ``RunResult`` on the group served by its last step, else None."""
        ts = sorted(set(timesteps))
        w, s, ms = self._truncated(wake, schedule.sleep, schedule.max_sleep, ts[-1])
        settle = torch.zeros(x.shape[0], dtype=torch.long)
        energy = torch.zeros(x.shape[0], dtype=torch.float64)
        spikes = torch.zeros(x.shape[0], dtype=torch.float64)
        pending, last, i = None, None, 0
        for ev in net.stream(x, wake=w, sleep=s, burst=schedule.burst, max_sleep=ms):
            settled = ev.settled.cpu()
            settle[settled & (settle == 0)] = ev.t
            energy = energy + ev.energy_pj.cpu()
            spikes = spikes + ev.spikes.cpu().double()
            if i < len(ts) and ev.t == ts[i]:
                if pending is not None:
                    yield pending
                pending = ([ev.t], ev.readout, torch.where(settle > 0, settle, torch.full_like(settle, ev.t)), energy,
                           spikes, settle > 0, ev.result)
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
                           spikes, settle > 0, last.result)
        yield pending

    # --- public API ----------------------------------------------------------------------------

    @torch.no_grad()
    def internals(self, images, spiking: bool = True, **schedule) -> dict:
        """The intermediate outputs of one image batch: ``features``, ``objectness``, ``deltas``, ``proposals``,
        ``class_logits``, ``box_regression`` of the spiking stages (``spiking=True``, with ``schedule`` as for
        ``predict``) or of the network converted from (``spiking=False``), plus ``runs`` (the stages'
        ``RunResult``s; empty for the QANN)."""
        image_list, _ = self.preprocess(images)
        with _eval_mode(self.qann):
            return self._stages(image_list, self.schedule(**schedule) if spiking else None)

    def _events(self, batch: Batch, schedule: Schedule, keep: Selection, cancel) -> Iterator[DetectionEvent]:
        """Every stage-1 step (no detections yet), then every stage-2 step with the detections decoded from
        stage 2's readouts so far. The last event (``final=True``) carries ``predict``'s result."""
        image_list, total, energy = batch.x, 0.0, 0.0
        last1 = None
        for ev in self.stage1.stream(image_list.tensors, cancel=cancel, **schedule.run_kwargs()):
            last1 = ev
            spikes, energy = float(ev.spikes.sum()), energy + float(ev.energy_pj.sum())
            total += spikes
            empty = batch.result(0, Boxes.empty(batch.shapes[0]), self.names)
            _set(empty, {"steps": ev.t, "stage_steps": {"stage1": ev.t, "stage2": 0}, "settled": False,
                         "spikes": total, "energy_uj": energy * 1e-6}, wake=ev.wake)
            yield DetectionEvent(stage=1, t=ev.t, stage_t=ev.t, phase=ev.phase, wake=ev.wake, spikes=spikes,
                                 cumulative_spikes=total, settled=bool(ev.settled.all()), detections=empty)
        run1 = last1.result
        t1 = int(run1.steps.item())
        features = OrderedDict(run1.readout[0])
        proposals = self.proposals(image_list, features, *run1.readout[1:])
        rois = self.roi_features(features, proposals, image_list)
        out = {"proposals": proposals, "wake": schedule.wake}
        pending, run2 = None, None
        if rois.shape[0] > 0:
            for ev in self.stage2.stream(rois, cancel=cancel, **schedule.run_kwargs()):
                if pending is not None:
                    yield pending
                spikes, energy = float(ev.spikes.sum()), energy + float(ev.energy_pj.sum())
                total += spikes
                found = self._results(batch, dict(out, class_logits=ev.readout[0], box_regression=ev.readout[1]),
                                      keep)[0]
                settled = bool(ev.settled.all())
                _set(found, {"steps": t1 + ev.t, "stage_steps": {"stage1": t1, "stage2": ev.t},
                             "settled": settled and bool(run1.settled.all()), "spikes": total,
                             "energy_uj": energy * 1e-6, "proposals": int(rois.shape[0])}, wake=ev.wake)
                pending = DetectionEvent(stage=2, t=t1 + ev.t, stage_t=ev.t, phase=ev.phase, wake=ev.wake,
                                         spikes=spikes, cumulative_spikes=total, settled=settled, detections=found)
                run2 = ev.result
        else:
            logits, regression = self._empty_stage2(rois)
            found = self._results(batch, dict(out, class_logits=logits, box_regression=regression), keep)[0]
            pending = DetectionEvent(stage=2, t=t1, stage_t=0, phase="sleep", wake=0, spikes=0.0,
                                     cumulative_spikes=total, settled=True, detections=found)
        _set(pending.detections, self._figures(proposals, run1, run2)[0], wake=schedule.wake)
        pending.final = True
        yield pending

    def _anytime(self, batch: Batch, ts: list[int], schedule: Schedule,
                 keep: Selection) -> tuple[dict[int, list[Results]], dict]:
        """Anytime detections for evaluation: for every ``t`` in ``ts``, the detections when *each* stage gets a
        budget of ``t`` steps of its own schedule (so ``steps`` at ``t`` is up to ``2 t``).

        Stage 1's readout after its step ``t`` (a sample that settled earlier keeps its settled readout), the
        proposals from it, stage 2 on those RoI features and its readout after *its* step ``t``. One stage-1
        stream up to ``max(ts)`` (or until settled) serves every ``t``; stage 2 runs once per distinct stage-1
        readout, up to the largest ``t`` that shares it, so after both stages settle every larger ``t`` reuses
        one result (the same objects).

        ``info``: per image ``steps`` and ``settled`` of the run serving the largest ``t`` (total of both
        stages), ``energy_uj_at[t]`` (both stages, each to its budget ``t``), ``energy_uj``, ``stage1_steps_at``
        / ``stage2_steps_at`` / ``steps_at`` (per image, at each ``t``), ``ann_energy_uj`` (per image: stage 1
        plus stage 2 once per RoI), ``proposals`` and stage 1's ``firing_rates``."""
        image_list = batch.x
        n_images = image_list.tensors.shape[0]
        detections: dict[int, list[Results]] = {}
        info: dict[str, Any] = {"energy_uj_at": {}, "stage1_steps_at": {}, "stage2_steps_at": {}, "steps_at": {}}
        settled_at: dict[int, list[bool]] = {}
        ann_macs2, final_rows = None, []
        ann_macs1 = count_macs(self.qann_stage1, image_list.tensors[:1])
        none = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), None)
        for group1, readout, used1, energy1, spikes1, settled1, run1 in self._readouts_at(
                self.stage1, image_list.tensors, ts, schedule, schedule.wake):
            features = OrderedDict(readout[0])
            proposals = self.proposals(image_list, features, *readout[1:])
            rois = self.roi_features(features, proposals, image_list)
            if rois.shape[0]:
                wake2 = group1[-1] if self.neuron == "if" else schedule.wake
                stage2 = self._readouts_at(self.stage2, rois, group1, schedule, wake2)
                ann_macs2 = ann_macs2 or count_macs(self.qann_stage2, rois[:1])
            else:
                stage2 = [(group1, self._empty_stage2(rois), *none)]
            for group2, (logits, regression), used2, energy2, spikes2, settled2, _ in stage2:
                dets = self._results(batch, {"class_logits": logits, "box_regression": regression,
                                             "proposals": proposals}, keep)
                ranges = _row_ranges(proposals)
                s1 = [int(used1[i]) for i in range(n_images)]
                s2 = [int(used2[a:b].max()) if b > a else 0 for a, b in ranges]
                e = [float(energy1[i]) + float(energy2[a:b].sum()) for i, (a, b) in enumerate(ranges)]
                settled = [bool(settled1[i]) and bool(settled2[a:b].all()) for i, (a, b) in enumerate(ranges)]
                for i, (det, (a, b)) in enumerate(zip(dets, ranges)):
                    _set(det, {"steps": s1[i] + s2[i], "stage_steps": {"stage1": s1[i], "stage2": s2[i]},
                               "settled": settled[i], "spikes": float(spikes1[i]) + float(spikes2[a:b].sum()),
                               "energy_uj": e[i] * 1e-6, "proposals": b - a}, wake=schedule.wake)
                for t in group2:
                    detections[t] = dets
                    info["energy_uj_at"][t] = [v * 1e-6 for v in e]
                    info["stage1_steps_at"][t], info["stage2_steps_at"][t] = s1, s2
                    info["steps_at"][t] = [a + b for a, b in zip(s1, s2)]
                    settled_at[t] = settled
            final_rows = [len(p) for p in proposals]
            if run1 is not None:
                info["firing_rates"] = run1.stats.firing_rates
        last = ts[-1]
        info["steps"] = info["steps_at"][last]
        info["energy_uj"] = info["energy_uj_at"][last]
        info["settled"] = settled_at[last]
        info["ann_energy_uj"] = [(ann_macs1 + (ann_macs2 or 0) * n) * PJ_PER_MAC * 1e-6 for n in final_rows]
        info["proposals"] = final_rows
        return detections, info

    def forward(self, images, **kwargs):
        return self.predict(images, **kwargs)


def class_names(classes: list[str] | None, n: int) -> dict[int, str]:
    """0-based class id -> name for ``n`` classes (torchvision's label ``k`` is class ``k - 1``; 0 is the
    background); ids without a name are named by their number."""
    return {i: str(classes[i]) if classes and i < len(classes) else str(i) for i in range(n)}


def _row_ranges(proposals: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Each image's rows [a, b) among the stage-2 RoIs (the images' proposals, in order)."""
    starts = np.cumsum([0] + [len(p) for p in proposals])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def _set(results: Results, figures: dict, wake: int | None) -> None:
    for name, value in figures.items():
        setattr(results, name, value)
    results.wake = wake


@contextmanager
def _eval_mode(module: nn.Module):
    """``module`` in eval mode for the block (torchvision's transform and RPN behave differently in training)."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def save_checkpoint(path: Path, model: nn.Module, meta: dict, **extra) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "state_dict": state, "meta": meta,
                     **extra}, path)



__all__ = [
    "SpikingFasterRCNN", "RCNNStage1", "RCNNStage2", "ReLUTwoMLPHead", "ARCHS",
    "build_fasterrcnn", "build_qann_fasterrcnn", "to_qann_fasterrcnn", "analog_candidates", "load_checkpoint",
    "model_from_state_dict", "save_checkpoint", "load_float_for_calibration", "calibration_inputs", "save_qann",
]
