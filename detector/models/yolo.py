"""Ultralytics YOLO adapter: build / train the QANN, convert it, and detect with the spiking network.

Supported: Ultralytics *detection* models with the anchor-free ``Detect`` head built from ``Conv``, ``C2f``,
``C3``, ``C3k2``, ``Bottleneck``, ``SPPF``/``SPP``, ``Concat`` and ``Upsample`` layers: YOLOv8, YOLOv5u and
YOLOv3u at every scale (n-x), and YOLO11 (its ``C2PSA`` attention kept as analog islands, opt-in with
``analog="auto"``). Segment / pose / OBB heads, YOLO-World, YOLOE, RT-DETR, YOLOv9/v10/12/26 are refused
with an error that says so.

    qann = build_qann("yolov8n.yaml", levels=4, act="relu")        # Ultralytics DetectionModel, ClipQuan acts
    det = SpikingYOLO.from_model(qann, imgsz=640)                   # or SpikingYOLO.from_checkpoint(path)
    results = det.predict(["bus.jpg"])                              # list of Results (detector.detect)
    for event in det.stream("bus.jpg"): ...                         # anytime detection, one event per step

The spiking part is the network up to the Detect head's last 1x1 convs (the readouts: the raw per-level
maps Detect returns in training mode). DFL, box decoding and NMS run on the *accumulated* readouts with
Ultralytics' own code (``Detect._inference`` and ``ultralytics.utils.nms.non_max_suppression``).

Checkpoints: ``export_checkpoint`` writes this project's safe format (``torch.load(weights_only=True)``:
state_dict plus plain metadata); ``load_checkpoint`` reads it (verifying a sha256 when given) and also
Ultralytics ``.pt`` files, which are **pickles: load only files you trust** (they go through Ultralytics'
own loader, which can execute code).

Ultralytics runs offline from this module: see ``detector.models._ultralytics_env``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator, Sequence

from . import _ultralytics_env

_ultralytics_env.prepare()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ultralytics.nn.modules.block import (  # noqa: E402
    C2PSA, C3, SPP, SPPF, Attention, Bottleneck, C2f, C3k, C3k2, PSABlock,
)
from ultralytics.nn.modules.conv import Concat, Conv, DWConv  # noqa: E402
from ultralytics.nn.modules.head import Detect  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, yaml_model_load  # noqa: E402

_ultralytics_env.after_import()

from ..convert import convert  # noqa: E402
from ..rules import ModuleRules  # noqa: E402
from ..quant import ClipQuan, activation_references, qann_levels, to_qann, with_legacy_quant_state  # noqa: E402
from ..runtime import RunResult, SpikingNetwork  # noqa: E402
from ..detect import Batch, Boxes, DetectionEvent, Results, Schedule, Selection, SpikingDetector, read_bgr  # noqa: E402
from ..detect.base import source_path  # noqa: E402
from .. import checkpoint  # noqa: E402
from ..checkpoint import UnreadableCheckpoint  # noqa: E402

__all__ = [
    "SpikingYOLO", "UnsupportedModelError", "build_qann", "load_checkpoint",
    "export_checkpoint", "check_supported", "attention_paths", "YOLOReadoutNet", "CHECKPOINT_FORMAT",
    "calibration_inputs", "save_qann", "letterbox", "ultralytics_start_checkpoint", "is_qann_checkpoint",
    "quantize_model", "model_act",
]

CHECKPOINT_FORMAT = "casc-yolo"
CHECKPOINT_VERSION = 2  # 2: ClipQuan levels and rounding per module in the state dict (1: all floor)

# What the converter must know about Ultralytics' modules (their forward it cannot see).
MODULE_RULES = ModuleRules(
    linear=(Concat,),  # torch.cat: linear
    bn_pairs={Conv: (("conv", "bn"),)},  # Conv.forward = act(bn(conv(x))); DWConv is a Conv subclass
    nonlinear=(Attention,),  # q.k softmax products: analog island or refused
)

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    Conv, DWConv, C2f, C3, C3k2, C3k, Bottleneck, SPPF, SPP, Concat, nn.Upsample, C2PSA, PSABlock, nn.Sequential)
SUPPORTED_TEXT = ("supported: Ultralytics detection models with the plain Detect head - YOLOv8, YOLOv5u, YOLOv3u "
                  "(any scale n-x) and YOLO11 (C2PSA attention as analog islands, analog='auto'); not "
                  "segment/pose/OBB/classify heads, YOLO-World/YOLOE, RT-DETR, YOLOv6/v9/v10/12/26 or end-to-end heads")
ACTIVATIONS = {"relu": "nn.ReLU()", "silu": "nn.SiLU()"}


class UnsupportedModelError(ValueError):
    """The model is not a YOLO detection model this adapter can convert (the message says what is)."""


# --- building the QANN ----------------------------------------------------------------------------------

def _yaml_dict(model: str | Path | dict) -> dict:
    if isinstance(model, dict):
        return copy.deepcopy(model)
    name = str(model)
    path = Path(name)
    if path.suffix not in {".yaml", ".yml"}:
        raise ValueError(f"not a model YAML: {name}")
    if path.parent != Path(".") and not path.exists():
        raise FileNotFoundError(f"model YAML not found: {name}")
    try:
        return yaml_model_load(name)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"model YAML not found: {name} (neither a file nor a bundled Ultralytics "
                                f"config such as yolov8n.yaml)") from error


def _check_yaml(d: dict) -> None:
    try:
        head_type = str(d["head"][-1][2])
    except (KeyError, IndexError, TypeError) as error:
        raise UnsupportedModelError(f"not an Ultralytics model YAML (no head); {SUPPORTED_TEXT}") from error
    if head_type != "Detect" or d.get("end2end"):
        what = "end-to-end Detect" if head_type == "Detect" else head_type
        raise UnsupportedModelError(f"unsupported model family: its head is {what}; {SUPPORTED_TEXT}")


def check_supported(model: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` unless ``model`` is a supported Ultralytics detection model."""
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not len(layers):
        raise UnsupportedModelError(f"{type(model).__name__} is not an Ultralytics DetectionModel; {SUPPORTED_TEXT}")
    head = layers[-1]
    if type(head) is not Detect:
        raise UnsupportedModelError(f"unsupported model family: its head is {type(head).__name__}; {SUPPORTED_TEXT}")
    if getattr(head, "one2one_cv2", None) is not None or head.cv2 is None:
        raise UnsupportedModelError(f"unsupported model family: end-to-end (NMS-free) Detect head; {SUPPORTED_TEXT}")
    bad = [f"{i}:{type(m).__name__}" for i, m in enumerate(layers[:-1]) if type(m) not in SUPPORTED_LAYERS]
    if bad:
        raise UnsupportedModelError(f"unsupported layers {', '.join(bad)}; {SUPPORTED_TEXT}")


def _casc_meta(model: nn.Module) -> dict:
    return dict(getattr(model, "yaml", {}).get("casc", {}))


def _set_activation(model: nn.Module, act: str) -> None:
    """Swap every SiLU/ReLU module for ``act`` (a float model only; fine-tune afterwards)."""
    new = {"relu": nn.ReLU, "silu": nn.SiLU}[act]
    for parent, name, _ in activation_references(model, (nn.ReLU, nn.SiLU)):
        if not isinstance(getattr(parent, name), new):
            setattr(parent, name, new())
    model.yaml["activation"] = ACTIVATIONS[act]


def model_act(model: nn.Module) -> str:
    meta = _casc_meta(model)
    if meta.get("act"):
        return meta["act"]
    kinds = {type(m) for m in model.modules()}
    return "relu" if nn.ReLU in kinds and nn.SiLU not in kinds else "silu"


def quantize_model(model: DetectionModel, levels: int | None, act: str, learnable: bool = False,
              calibration: list[torch.Tensor] | None = None) -> DetectionModel:
    """Ultralytics model -> QANN in place (every activation call site gets its own ClipQuan)."""
    existing = qann_levels(model)
    if any(isinstance(m, ClipQuan) for m in model.modules()):
        if levels is not None and existing is not None and levels != existing:
            raise ValueError(f"the model is already quantized with {existing} levels, not {levels}")
        levels = existing
    else:
        if levels is None:
            raise ValueError("a float model needs levels=L to be quantized (then fine-tune it: casc train yolo)")
        to_qann(model, levels, learnable=learnable, inplace=True, calibration=calibration)
    model.yaml["casc"] = {"levels": int(levels), "act": act, "quantized": True}
    return model


def build_qann(model: str | Path | dict | nn.Module = "yolov8n.yaml", levels: int | None = 4, act: str | None = None,
               nc: int | None = None, quantize: bool = True, learnable: bool = False,
               verbose: bool = False) -> DetectionModel:
    """An Ultralytics ``DetectionModel`` whose activations are ``ClipQuan(levels)`` (the QANN).

    ``model``: a YAML name/path (``yolov8n.yaml``, ``yolov5nu.yaml``, ``yolo11s.yaml``, ...; the scale letter
    picks the scale), a YAML dict, a checkpoint (``.pt`` of Ultralytics - a pickle, trusted files only - or
    this project's format), or a ``DetectionModel`` (copied). ``act``: ``"relu"`` or ``"silu"`` for the
    float activation (a YAML's own default is SiLU); ``quantize=False`` returns the float model (e.g. the
    float ReLU network for the IF baseline). ``nc`` overrides the class count of a YAML.
    """
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if isinstance(model, nn.Module):
        net = copy.deepcopy(model)
        if not hasattr(net, "yaml"):
            raise UnsupportedModelError(f"{type(model).__name__} is not an Ultralytics DetectionModel; {SUPPORTED_TEXT}")
    elif isinstance(model, (str, Path)) and Path(str(model)).suffix == ".pt":
        net, _ = load_checkpoint(model)
    else:
        d = _yaml_dict(model)
        _check_yaml(d)
        if act is not None:
            d["activation"] = ACTIVATIONS[act]
        d.pop("casc", None)
        net = DetectionModel(d, ch=int(d.get("channels", 3)), nc=nc, verbose=verbose)
    check_supported(net)
    net.float()
    quantized = any(isinstance(m, ClipQuan) for m in net.modules())
    if act is not None and not quantized and model_act(net) != act:
        _set_activation(net, act)
    act = act or model_act(net)
    if quantize:
        return quantize_model(net, levels, act, learnable)
    if quantized:
        raise ValueError("quantize=False but the model is already a QANN")
    net.yaml["casc"] = {"levels": None, "act": act, "quantized": False}
    return net


# --- checkpoints ------------------------------------------------------------------------------------------

def _plain(value):
    """Metadata as plain Python (dict/list/str/int/float/bool/None) for weights_only loading."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def _names_dict(names) -> dict[int, str]:
    if names is None:
        return {}
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    return {i: str(n) for i, n in enumerate(names)}


def _imgsz_of(value, default: int = 640) -> int:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(max(value))
    return int(value)


def _load_ultralytics(path: Path) -> tuple[DetectionModel, dict]:
    """An Ultralytics ``.pt`` through Ultralytics' loader. These files are pickles: trusted files only."""
    from ultralytics.nn.tasks import load_checkpoint as u_load

    model, ckpt = u_load(str(path), device="cpu", inplace=True, fuse=False)
    if hasattr(model, "fuse") and getattr(model, "is_fused", lambda: False)():
        raise UnsupportedModelError(f"{path}: the checkpoint holds a fused model (BatchNorm removed); "
                                    "use the training checkpoint")
    model = model.float().eval()
    args = ckpt.get("train_args") or {}
    meta = {"names": _names_dict(getattr(model, "names", None)), "imgsz": _imgsz_of(args.get("imgsz")),
            "format": "ultralytics"}
    return model, meta


def load_checkpoint(path: str | Path, sha256: str | None = None, levels: int | None = None,
                    act: str | None = None) -> tuple[DetectionModel, dict]:
    """(model, metadata) from this project's safe format or an Ultralytics ``.pt``.

    ``sha256``: expected hex digest, checked before anything is loaded (a mismatch raises ``ValueError``).
    Our format loads with ``torch.load(weights_only=True)``; an Ultralytics ``.pt`` is a *pickle* and goes
    through Ultralytics' own loader: load only files you trust. The model is returned as stored (a QANN
    if it was trained as one, else float); ``levels``/``act`` are only used by ``build_qann``.
    Metadata: ``names`` (dict), ``imgsz``, ``levels``, ``act``, ``format``.
    """
    path = Path(path)
    try:
        ckpt = checkpoint.load(path, sha256)  # a modified file of ours is refused here
    except UnreadableCheckpoint as error:
        if "PytorchStreamReader" in str(error) or "zip archive" in str(error):
            raise
        ckpt = None  # a pickle: Ultralytics' own format
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        model = _from_safe(ckpt)
        meta = {"names": _names_dict(ckpt.get("names")), "imgsz": _imgsz_of(ckpt.get("imgsz")),
                "format": CHECKPOINT_FORMAT}
    elif path.suffix == ".pt":
        model, meta = _load_ultralytics(path)
    else:
        raise ValueError(f"{path}: neither a {CHECKPOINT_FORMAT} checkpoint nor an Ultralytics .pt")
    check_supported(model)
    info = _casc_meta(model)
    quantized = any(isinstance(m, ClipQuan) for m in model.modules())
    meta.update(levels=qann_levels(model) if quantized else None, act=info.get("act") or model_act(model),
                quantized=quantized)
    return model, meta


def ultralytics_start_checkpoint(path: Path, out: Path) -> Path:
    """Ultralytics' trainer loads only its own checkpoint format: re-save one of ours in it (under ``out``)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an Ultralytics pickle already
        return path
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT):
        return path
    model, _ = load_checkpoint(path)
    out.mkdir(parents=True, exist_ok=True)
    start = out / f"start-{path.stem}.pt"
    torch.save({"model": model.half(), "train_args": {}, "epoch": -1}, start)
    return start


def is_qann_checkpoint(path: Path) -> bool:
    return bool(load_checkpoint(path)[1]["quantized"])


def _from_safe(ckpt: dict) -> DetectionModel:
    if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint format version {ckpt.get('version')} is newer than this library's "
                         f"({CHECKPOINT_VERSION}); update casc-detector")
    d = copy.deepcopy(ckpt["yaml"])
    _check_yaml(d)
    d.pop("casc", None)
    model = DetectionModel(d, ch=int(d.get("channels", 3)), nc=int(d["nc"]), verbose=False)
    state = ckpt["state_dict"]
    if ckpt.get("levels"):
        to_qann(model, int(ckpt["levels"]), learnable=bool(ckpt.get("learnable")), inplace=True)
        state = with_legacy_quant_state(model, state)
    model.yaml["casc"] = {"levels": ckpt.get("levels"), "act": ckpt.get("act"), "quantized": bool(ckpt.get("levels"))}
    model.load_state_dict(state, strict=True)
    model.names = _names_dict(ckpt.get("names")) or model.names
    return model.float().eval()


def export_checkpoint(model_or_pt: nn.Module | str | Path | "SpikingYOLO", path: str | Path,
                      names: dict | Sequence[str] | None = None, imgsz: int | None = None) -> Path:
    """Write ``model_or_pt`` (a QANN / float DetectionModel, a ``SpikingYOLO``, or a checkpoint path) in this
    project's safe format: ``{"format", "version", "state_dict", "yaml", "levels", "learnable", "act",
    "names", "imgsz"}``, loadable with ``torch.load(path, weights_only=True)``. Returns ``path``."""
    meta: dict = {}
    if isinstance(model_or_pt, SpikingYOLO):
        meta = {"names": model_or_pt.names, "imgsz": model_or_pt.imgsz}
        model = model_or_pt.qann
    elif isinstance(model_or_pt, (str, Path)):
        model, meta = load_checkpoint(model_or_pt)
    else:
        model = model_or_pt
    check_supported(model)
    quant = [m for m in model.modules() if isinstance(m, ClipQuan)]
    levels = qann_levels(model)
    yaml = {k: v for k, v in model.yaml.items() if k != "casc"}
    names = _names_dict(names if names is not None else (meta.get("names") or getattr(model, "names", None)))
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_dict": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                       for k, v in model.state_dict().items()},
        "yaml": _plain(yaml),
        "levels": levels,
        "learnable": any(q.learnable for q in quant),
        "act": _casc_meta(model).get("act") or model_act(model),
        "names": [names[i] for i in sorted(names)] if names else None,
        "imgsz": int(imgsz if imgsz is not None else meta.get("imgsz") or 640),
    }
    return checkpoint.save(ckpt, path)


# --- the spiking part: the network up to the Detect head's last 1x1 convs ---------------------------------

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
    return [p for p, m in net.named_modules() if isinstance(m, Attention)]


def letterbox(bgr_images: list[np.ndarray], imgsz: int, stride: int = 32) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Ultralytics' letterbox (gray 114 padding) to imgsz x imgsz: a float [B, 3, H, W] RGB batch in 0..1 and
    the original (h, w) of each image."""
    from ultralytics.data.augment import LetterBox

    boxer = LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=stride)
    shapes = [tuple(image.shape[:2]) for image in bgr_images]
    batch = np.stack([boxer(image=image) for image in bgr_images])[..., ::-1].transpose(0, 3, 1, 2)  # BGR->RGB, BCHW
    return torch.from_numpy(np.ascontiguousarray(batch)).float() / 255.0, shapes


def calibration_inputs(rgb_images: list[np.ndarray], imgsz: int, batch: int = 16) -> list[torch.Tensor]:
    """RGB uint8 images as the letterboxed batches the model takes (what ``detector.calibrate`` runs)."""
    return [letterbox([im[..., ::-1] for im in rgb_images[i:i + batch]], imgsz)[0]
            for i in range(0, len(rgb_images), batch)]


def save_qann(qann: DetectionModel, path: str | Path, names, imgsz: int, act: str) -> Path:
    """Write a quantized ``DetectionModel`` (e.g. from ``detector.calibrate.quantize``) in our safe format."""
    qann.yaml["casc"] = {"levels": qann_levels(qann), "act": act, "quantized": True}
    return export_checkpoint(qann, path, names=names, imgsz=imgsz)


class SpikingYOLO(SpikingDetector):
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
        if neuron == "cif" and not quantized:
            raise ValueError("SpikingYOLO needs a QANN (ClipQuan activations): build_qann(model, levels) or "
                             "from_checkpoint(path, levels=L) for a float checkpoint")
        if neuron == "if" and (quantized or not calibration):
            raise ValueError('neuron="if" (the plain IF baseline) converts a float ReLU model and needs calibration '
                             "batches (letterboxed images, see calibration_inputs / letterbox)")
        self.neuron = neuron
        self.qann = copy.deepcopy(qann).to(device=device, dtype=dtype).eval()
        for p in self.qann.parameters():
            p.requires_grad_(False)
        self.levels = qann_levels(self.qann)
        self.names = _names_dict(names) or _names_dict(getattr(qann, "names", None))
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
        if neuron == "if":
            batches = [b.to(device=device, dtype=dtype) for b in calibration]
            self.snn: SpikingNetwork = convert(self.readout_net, neuron="if", calibration=batches,
                                               percentile=percentile, analog=analog, rules=MODULE_RULES)
        else:
            self.snn = convert(self.readout_net, analog=analog, rules=MODULE_RULES)
        self.decoder: Detect = copy.deepcopy(self.qann.model[-1]).eval()
        self.decoder.dynamic = True  # recompute anchors per call (shape and dtype may change)
        self.decoder.export = False

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
        model becomes the IF baseline with thresholds from ``calibration`` batches."""
        model, meta = load_checkpoint(path, sha256=sha256)
        if neuron == "if":
            return cls(model, names=meta["names"], imgsz=imgsz or meta["imgsz"], analog=analog, device=device,
                       dtype=dtype, neuron="if", calibration=calibration)
        if not meta["quantized"]:
            if levels is None:
                raise ValueError(f"{path} holds a float model: pass levels=L to quantize it (and fine-tune it "
                                 "with `casc train yolo` for accuracy)")
            model = quantize_model(model, levels, meta["act"])
        elif levels is not None and levels != meta["levels"]:
            raise ValueError(f"{path} is a QANN with {meta['levels']} levels, not {levels}")
        return cls(model, names=meta["names"], imgsz=imgsz or meta["imgsz"], analog=analog, device=device,
                   dtype=dtype)

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

    def decode(self, maps: list[torch.Tensor], shapes: list[tuple[int, int]] | None = None, conf: float = 0.25,
               iou: float = 0.7, max_det: int = 300, classes: Sequence[int] | None = None,
               agnostic: bool = False) -> list[Results]:
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

    def _decoded(self, batch: Batch, maps: list[torch.Tensor], keep: Selection) -> list[Results]:
        results = self.decode(maps, batch.shapes, keep.conf, keep.iou, keep.max_det, keep.classes)
        return [batch.result(i, r.boxes, self.names) for i, r in enumerate(results)]

    # -- running --

    @torch.no_grad()
    def raw(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", mode: str = "step",
            burst: int | None = None, max_sleep: int = 256) -> RunResult:
        """The spiking network's run on a preprocessed batch ``x``: ``.readout`` holds the accumulated raw
        per-level maps, ``.steps``/``.settled``/``.stats`` how it went."""
        return self.snn.run(x, wake=wake if wake is not None else self.levels, sleep=sleep, mode=mode, burst=burst,
                            max_sleep=max_sleep)

    @torch.no_grad()
    def qann_raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The QANN's raw per-level maps for a preprocessed batch ``x`` (what the SNN reproduces)."""
        return self.readout_net(x)

    def _infer(self, batch: Batch, schedule: Schedule | None, cancel) -> RunResult | list[torch.Tensor]:
        if schedule is None:
            return self.readout_net(batch.x)
        return self.snn.run(batch.x, mode=schedule.mode, cancel=cancel, **schedule.run_kwargs())

    def _postprocess(self, batch: Batch, out: RunResult | list[torch.Tensor], keep: Selection) -> list[Results]:
        if not isinstance(out, RunResult):
            return self._decoded(batch, out, keep)
        results = self._decoded(batch, out.readout, keep)
        for i, r in enumerate(results):
            r.steps, r.wake, r.settled = int(out.steps[i]), out.wake, bool(out.settled[i])
            if out.stats is not None:  # None: an engine that counts no spikes (ONNX Runtime)
                r.spikes, r.energy_uj = float(out.stats.spikes[i]), float(out.stats.energy_pj[i]) * 1e-6
        return results

    def _events(self, batch: Batch, schedule: Schedule, keep: Selection, cancel) -> Iterator[DetectionEvent]:
        """After every time step, the detections decoded from the readouts so far, with spike counts. The last
        event's detections equal ``predict``'s (step mode)."""
        total = energy = 0.0
        for event in self.snn.stream(batch.x, cancel=cancel, **schedule.run_kwargs()):
            found = self._decoded(batch, event.readout, keep)[0]
            spikes = float(event.spikes[0])
            total += spikes
            energy += float(event.energy_pj[0])
            found.steps, found.wake, found.spikes = event.t, event.wake, total
            found.settled, found.energy_uj = bool(event.settled[0]), energy * 1e-6
            yield DetectionEvent(stage=1, t=event.t, stage_t=event.t, phase=event.phase, wake=event.wake,
                                 spikes=spikes, cumulative_spikes=total, settled=found.settled, detections=found,
                                 final=event.result is not None)

    def _anytime(self, batch: Batch, wanted: list[int], schedule: Schedule,
                 keep: Selection) -> tuple[dict[int, list[Results]], dict]:
        """CASC readouts stop changing once a sample settles, so a ``t`` past the end reuses the final answer;
        the IF baseline runs ``wake=max(t)`` steps and its readout after step ``t`` (summed, divided by ``t``)
        is exactly the ``wake=t`` result. ``info``: per-image steps used, settled, spikes and energy of the full
        run, ``energy_uj_at`` (every requested ``t``), ANN energy, firing rates."""
        readouts, settled_at, last = {}, {}, None
        for event in self.snn.stream(batch.x, **schedule.run_kwargs()):
            last = event
            if event.t in wanted:
                readouts[event.t] = event.readout
                settled_at[event.t] = event.settled.tolist()
        run = last.result
        stats = run.stats
        steps = run.steps.tolist()
        results = {}
        for t in wanted:  # past the run's end (settled) nothing changes any more: the final readout
            found = self._decoded(batch, readouts.get(t, last.readout), keep)
            energy = (stats.energy_pj_until(t) * 1e-6).tolist()
            spikes = stats.spikes_per_step[:t].sum(0).tolist()
            settled = settled_at.get(t, run.settled.tolist())
            for i, r in enumerate(found):  # each image's own figures after step t
                r.steps, r.wake, r.energy_uj = min(t, steps[i]), min(t, schedule.wake), energy[i]
                r.spikes, r.settled = spikes[i], settled[i]
            results[t] = found
        info = {"steps": steps, "settled": run.settled.tolist(),
                "spikes": stats.spikes.tolist(), "energy_uj": (stats.energy_pj * 1e-6).tolist(),
                "energy_uj_at": {t: (stats.energy_pj_until(t) * 1e-6).tolist() for t in wanted},
                "ann_energy_uj": stats.ann_energy_pj * 1e-6, "firing_rates": stats.firing_rates}
        return results, info
