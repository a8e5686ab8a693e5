"""The torchvision Faster R-CNN and its QANN form: building, quantizing, checkpoints, calibration inputs.

``build_fasterrcnn`` builds a float torchvision model (never downloading weights), ``to_qann_fasterrcnn``
quantizes it (``TwoMLPHead``, whose ReLUs are functional, becomes ``ReLUTwoMLPHead``: same parameters,
ReLU modules), ``add_spiking_fpn`` quantizes the FPN's signed signals where they enter its output convs,
the RPN head and the box head (so those layers receive spikes), ``model_from_state_dict`` / ``load_float_for_calibration``
read checkpoints back.

``MODULE_RULES`` is what the converter must know about torchvision's detection modules (pass it as
``convert(..., rules=MODULE_RULES)``): the (conv, bn) pairs of BasicBlock / Bottleneck / the ResNet stem,
so that (Frozen)BatchNorm folds; FPN's ``LastLevelMaxPool`` (a stride-2 subsampling) is linear;
squeeze-excitation is non-linear (kept analog or refused).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d, SqueezeExcitation

from ... import checkpoint
from ...calibrate import activation_samples, mse_threshold
from ...quant import ClipQuan, SignedClipQuan, qann_levels, to_qann, with_legacy_quant_state
from ...rules import ModuleRules, resolve

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

# (bottleneck blocks?, blocks per stage) of a torchvision ResNet body -> our arch name, to read a bare state dict
RESNET_LAYOUTS = {(False, (2, 2, 2, 2)): "resnet18_fpn", (False, (3, 4, 6, 3)): "resnet34_fpn",
                  (True, (3, 4, 6, 3)): "resnet50_fpn", (True, (3, 4, 23, 3)): "resnet101_fpn",
                  (True, (3, 8, 36, 3)): "resnet152_fpn"}
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

def _adopt(cls: type[nn.Module], module: nn.Module, **extra: nn.Module | None) -> nn.Module:
    """An instance of ``cls`` (a subclass of ``module``'s class) holding ``module``'s own children, plus ``extra``:
    the same parameters and state-dict keys under another forward."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in module.named_children():
        setattr(new, name, child)
    for name, child in extra.items():
        setattr(new, name, child)
    return new


class ReLUTwoMLPHead(tv_frcnn.TwoMLPHead):
    """torchvision's ``TwoMLPHead`` with its two functional ``F.relu`` as modules (same state dict)."""

    def __init__(self, in_channels: int, representation_size: int):
        super().__init__(in_channels, representation_size)
        self.relu6 = nn.ReLU()
        self.relu7 = nn.ReLU()
        self.input_quant: nn.Module | None = None  # add_spiking_fpn: a SignedClipQuan on the RoI features

    @classmethod
    def from_head(cls, head: tv_frcnn.TwoMLPHead) -> "ReLUTwoMLPHead":
        return _adopt(cls, head, relu6=nn.ReLU(), relu7=nn.ReLU(), input_quant=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        x = x.flatten(start_dim=1)
        return self.relu7(self.fc7(self.relu6(self.fc6(x))))


class QuantizedInputFPN(FeaturePyramidNetwork):
    """torchvision's ``FeaturePyramidNetwork`` with a ``SignedClipQuan`` on the input of each 3x3 output conv (the
    lateral + top-down sum), same FPN parameters."""

    @classmethod
    def from_fpn(cls, fpn: FeaturePyramidNetwork, quantizers: list[nn.Module]) -> "QuantizedInputFPN":
        return _adopt(cls, fpn, layer_input_quants=nn.ModuleList(quantizers))

    def get_result_from_layer_blocks(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        idx = idx + len(self.layer_blocks) if idx < 0 else idx
        return super().get_result_from_layer_blocks(self.layer_input_quants[idx](x), idx)


class QuantizedInputRPNHead(RPNHead):
    """torchvision's ``RPNHead`` with a ``SignedClipQuan`` per feature level on its inputs (same head parameters)."""

    @classmethod
    def from_head(cls, head: RPNHead, quantizers: list[nn.Module]) -> "QuantizedInputRPNHead":
        return _adopt(cls, head, input_quants=nn.ModuleList(quantizers))

    def forward(self, x: list[torch.Tensor]):
        if len(x) != len(self.input_quants):
            raise ValueError(f"the RPN head has input quantizers for {len(self.input_quants)} feature levels, "
                             f"got {len(x)} feature maps")
        return super().forward([quant(f) for quant, f in zip(self.input_quants, x)])


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


def add_spiking_fpn(qann: nn.Module, calibration: list | None = None, fpn_convs: bool = True,
                    inplace: bool = False) -> nn.Module:
    """The spiking-FPN form of a Faster R-CNN QANN: its FPN's signed signals reach the next layers as spikes.

    The FPN has no ReLU, so in the plain QANN its 3x3 output convs (on the lateral + top-down sums), the RPN
    conv (on every level) and the box head's first layer take analog currents and do dense MACs at every time
    step: most of the spiking network's energy. Here a ``SignedClipQuan`` with the QANN's level count (values
    -L..L) sits on each of those inputs, so the layers are driven by signed spikes instead: on the RPN head's
    input levels and on the RoI features, and with ``fpn_convs`` (default) on the FPN output convs' inputs.
    ``calibration``: image batches (lists of CHW tensors, ``calibration_inputs``) whose signals set each new
    threshold to its quantization-MSE optimum, in data-flow order (FPN convs, RPN inputs, then the RoI features,
    which depend on the proposals); without it every threshold is 1 (for a state dict to load into). Needs a
    ``ReLUTwoMLPHead`` box head (the ResNet-FPN archs). A model that already has them is returned as is.
    """
    levels = qann_levels(qann)
    if levels is None:
        raise ValueError("add_spiking_fpn takes a QANN (to_qann_fasterrcnn or casc quantize first)")
    target = qann if inplace else copy.deepcopy(qann)
    if isinstance(target.rpn.head, QuantizedInputRPNHead):
        return target
    box_head = target.roi_heads.box_head
    if not isinstance(box_head, ReLUTwoMLPHead):
        raise ValueError(f"add_spiking_fpn needs the ResNet-FPN archs' two-layer box head, this model has "
                         f"{type(box_head).__name__}")
    fpn = getattr(target.backbone, "fpn", None)
    if fpn_convs and not isinstance(fpn, FeaturePyramidNetwork):
        raise ValueError("add_spiking_fpn(fpn_convs=True) needs a backbone with a torchvision FeaturePyramidNetwork")
    groups = []
    if fpn_convs:
        target.backbone.fpn = QuantizedInputFPN.from_fpn(fpn, [SignedClipQuan(levels) for _ in fpn.layer_blocks])
        groups.append(list(target.backbone.fpn.layer_input_quants))
    target.rpn.head = QuantizedInputRPNHead.from_head(
        target.rpn.head, [SignedClipQuan(levels) for _ in target.rpn.anchor_generator.sizes])
    box_head.input_quant = SignedClipQuan(levels)
    groups += [list(target.rpn.head.input_quants), [box_head.input_quant]]
    if calibration is not None:
        calibration = list(calibration)
        for group in groups:
            paths = {p: m for p, m in target.named_modules() if any(m is q for q in group)}
            samples = activation_samples(target, calibration, types=(SignedClipQuan,), desc="spiking FPN")
            with torch.no_grad():
                for path, quantizer in paths.items():
                    quantizer.threshold_param.fill_(mse_threshold(samples[path], nn.Identity(), levels,
                                                                  quantizer.rounding, signed=True))
    return target


def has_spiking_fpn(model_or_state: nn.Module | dict) -> bool:
    """Whether a Faster R-CNN (or its state dict) has the spiking-FPN quantizers of ``add_spiking_fpn``."""
    if isinstance(model_or_state, dict):
        return any(k.startswith("rpn.head.input_quants.") for k in model_or_state)
    return isinstance(model_or_state.rpn.head, QuantizedInputRPNHead)


def build_qann_fasterrcnn(arch: str = "resnet18_fpn", num_classes: int = 91, levels: int = 4, min_size: int = 800,
                          max_size: int = 1333, representation_size: int | None = None, **kwargs) -> nn.Module:
    """``to_qann_fasterrcnn(build_fasterrcnn(...), levels)``."""
    return to_qann_fasterrcnn(build_fasterrcnn(arch, num_classes, min_size, max_size, representation_size, **kwargs),
                              levels, inplace=True)


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


# --- checkpoints and calibration inputs ------------------------------------------------------

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


def is_qann_state(state: dict) -> bool:
    """Whether a Faster R-CNN state dict is a QANN's (it has ClipQuan thresholds)."""
    return any(k.endswith("threshold_param") for k in state)


def _infer_from_state_dict(state: dict) -> dict:
    info = {}
    w = state.get("roi_heads.box_predictor.cls_score.weight")
    if w is not None:
        info["num_classes"] = int(w.shape[0])
        info["representation_size"] = int(w.shape[1])
    fpn = state.get("backbone.fpn.layer_blocks.0.0.weight")
    if fpn is not None:
        info["fpn_channels"] = int(fpn.shape[0])
    blocks = tuple(len({k.split(".")[3] for k in state if k.startswith(f"backbone.body.layer{i}.")}) for i in range(1, 5))
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state
    if (bottleneck, blocks) in RESNET_LAYOUTS and "backbone.body.layer1.0.conv1.weight" in state:
        info["arch"] = RESNET_LAYOUTS[(bottleneck, blocks)]
    return info


def _load_strict(model: nn.Module, state: dict, arch: str) -> None:
    """``load_state_dict(strict=True)``, its many-line mismatch report as one line that says what to check."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"the checkpoint does not fit a {arch} Faster R-CNN (give its arch and num_classes, or "
                         f"save it with its metadata through save_qann): {detail[:300]}") from None


def model_from_state_dict(state: dict, meta: dict, arch: str | None = None, num_classes: int | None = None,
                          levels: int | None = 4, **build_kwargs) -> nn.Module:
    """Build the model that ``state`` belongs to and load it (strict). Returns a QANN unless ``levels`` is None
    and the checkpoint is a float one."""
    inferred = _infer_from_state_dict(state)
    arch = arch or meta.get("arch") or inferred.get("arch") or "resnet50_fpn"
    num_classes = num_classes or meta.get("num_classes") or inferred.get("num_classes") or 91
    kwargs = {k: meta[k] for k in ("min_size", "max_size", "representation_size") if meta.get(k) is not None}
    if "representation_size" not in kwargs and "representation_size" in inferred and arch != "resnet50_fpn_v2":
        kwargs["representation_size"] = inferred["representation_size"]
    if arch in RESNET_ARCHS and "fpn_channels" in inferred:
        kwargs["fpn_channels"] = inferred["fpn_channels"]
    kwargs.update(build_kwargs)
    model = build_fasterrcnn(arch, num_classes, **kwargs)
    if is_qann_state(state):
        saved = meta.get("levels")
        if saved is not None and levels is not None and saved != levels:
            raise ValueError(f"checkpoint is a QANN with levels={saved}, asked for levels={levels}")
        model = to_qann_fasterrcnn(model, saved or levels or 4, inplace=True)
        if has_spiking_fpn(state):
            model = add_spiking_fpn(model, fpn_convs=any(k.startswith("backbone.fpn.layer_input_quants.") for k in state),
                                    inplace=True)
        _load_strict(model, with_legacy_quant_state(model, state), arch)
    else:
        _load_strict(model, state, arch)
        if levels is not None:
            model = to_qann_fasterrcnn(model, levels, inplace=True)
    return model


def load_float_for_calibration(path: str | Path, sha256: str | None = None) -> tuple[nn.Module, dict]:
    """(float model, metadata) of a Faster R-CNN checkpoint with trainable ``BatchNorm2d`` layers, so that
    ``detector.calibrate`` can re-estimate their statistics after quantization (frozen BatchNorms cannot)."""
    state, meta = _unwrap_state_dict(load_checkpoint(path, sha256))
    if is_qann_state(state):
        raise ValueError(f"{path} is already a QANN; quantize the float checkpoint it came from")
    return float_for_calibration(state, meta)


def float_for_calibration(state: dict, meta: dict) -> tuple[nn.Module, dict]:
    """``load_float_for_calibration`` of a float state dict and its metadata already read."""
    inferred = _infer_from_state_dict(state)
    arch = meta.get("arch") or inferred.get("arch") or "resnet50_fpn"
    frozen = {"frozen_bn": False} if arch in RESNET_ARCHS else {}
    state = dict(state)
    kwargs = {k: meta[k] for k in ("min_size", "max_size", "representation_size") if meta.get(k) is not None}
    if arch in RESNET_ARCHS and "fpn_channels" in inferred:
        kwargs["fpn_channels"] = inferred["fpn_channels"]
    model = build_fasterrcnn(arch, meta.get("num_classes") or inferred.get("num_classes") or 91, **kwargs, **frozen)
    for name, buffer in model.state_dict().items():  # FrozenBatchNorm2d state dicts have no batch counter
        if name.endswith("num_batches_tracked"):
            state.setdefault(name, torch.zeros_like(buffer))
    _load_strict(model, state, arch)
    return model.eval(), dict(meta, arch=arch)


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


def calibration_inputs(rgb_images: list[np.ndarray], batch: int = 8) -> list[list[torch.Tensor]]:
    """RGB uint8 images as the lists of CHW tensors a torchvision detector takes, in batches."""
    tensors = [_to_image_tensor(im) for im in rgb_images]
    return [tensors[i:i + batch] for i in range(0, len(tensors), batch)]


def save_checkpoint(path: Path, model: nn.Module, meta: dict, **extra) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "state_dict": state, "meta": meta,
                     **extra}, path)


def save_qann(qann: nn.Module, path: str | Path, meta: dict) -> Path:
    """Write a quantized Faster R-CNN (e.g. from ``quantize_fasterrcnn``) in our checkpoint format, with the input
    sizes of its own transform (a checkpoint without them would load at torchvision's 800 px)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = {"min_size": int(qann.transform.min_size[0]), "max_size": int(qann.transform.max_size)} \
        if hasattr(qann, "transform") else {}
    save_checkpoint(path, qann, dict(meta, **sizes, levels=qann_levels(qann)))
    return path


def quantize_fasterrcnn(model: nn.Module, levels: int, images: list, batch: int = 8, **options) -> nn.Module:
    """A calibrated QANN of a float torchvision Faster R-CNN, ready for ``SpikingFasterRCNN.from_model``.

    ``images``: RGB uint8 arrays (or CHW tensors), no labels; ``options`` go to ``detector.calibrate.quantize``
    (``theta``, ``rounding``, ``first_levels``, ...). Unlike a plain ``quantize(model, ...)``, the box head's
    functional ReLUs become modules first (``ReLUTwoMLPHead``), so they are quantized too. The model's own input
    sizes (``transform.min_size`` / ``max_size``) are kept. Frozen BatchNorms (torchvision's default) keep their
    statistics; ``float_for_calibration`` gives a model whose BatchNorms are re-estimated."""
    from ...calibrate import quantize

    target = copy.deepcopy(model).eval()
    heads = getattr(target, "roi_heads", None)
    if heads is None or not hasattr(target, "transform"):
        raise TypeError(f"quantize_fasterrcnn takes a torchvision FasterRCNN, got {type(model).__name__}")
    if type(heads.box_head) is tv_frcnn.TwoMLPHead:
        heads.box_head = ReLUTwoMLPHead.from_head(heads.box_head)
    return quantize(target, levels, calibration_inputs(list(images), batch), inplace=True, **options)
