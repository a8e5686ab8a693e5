"""Detector families: what the layers above the adapters need to know of each, in one place.

A ``Family`` names its adapter package and detector class, its spiking networks (``stages``, the attributes of
the detector that hold them, in the order they run), its trainer module (the adapter also names the parts of its network, ``layer_part``), the time steps its evaluation curve
uses by default, how its input size is given and the ``format`` its checkpoints carry (how a checkpoint path
finds its family, ``detector.weights.checkpoint_family``). ``FAMILIES`` is a plain dict, filled here and nowhere else
(nothing registers itself at import time); adapters are imported only when a family is used. A new family is
one adapter package and one entry below: the loader, the exporter, the ONNX Runtime engine, eval and the
service work from these fields and the detector's own methods (``export_networks``); ``tests/toy_family`` is such a
package (a one-stage detector over ``detector.randnet``, on ``detector.detect.SingleStageDetector``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "get_family", "family_of"]  # the public API (apps import only these)

# What every family's quantize_checkpoint takes besides its inputs (detector.calibrate.quantize's options, the names).
SHARED_QUANTIZE_OPTIONS = ("theta", "percentile", "rounding", "first_levels", "names")


@dataclass(frozen=True)
class Family:
    name: str
    package: str  # the adapter package
    detector_class: str  # its SpikingDetector subclass
    stages: tuple[str, ...]  # the detector's spiking networks (attributes), in the order they run
    trainer: str | None  # module with add_train_arguments(parser) and train_from_args(args); None: casc train has none
    default_timesteps: str  # the evaluation curve's T list
    sized: bool  # the detector takes an input size (imgsz); False: the model's transform sets it
    checkpoint_format: str  # the "format" entry of this project's checkpoints of the family
    quantize_options: tuple[str, ...] = ()  # options of ``quantize`` that only this family takes

    def adapter(self):
        return importlib.import_module(self.package)

    def detector_type(self) -> type:
        return getattr(self.adapter(), self.detector_class)

    def load(self, path, sha256: str | None = None, imgsz: int | None = None, **kwargs):
        """The detector of checkpoint ``path`` (``imgsz``: only for a family that is ``sized``)."""
        if imgsz is not None and self.sized:
            kwargs["imgsz"] = imgsz
        return self.detector_type().from_checkpoint(path, sha256=sha256, **kwargs)

    def foreign_quantize_options(self, options: dict) -> list[str]:
        """The options set in ``options`` that this family's quantizer does not take."""
        return sorted(k for k, v in options.items() if v and k not in SHARED_QUANTIZE_OPTIONS + self.quantize_options)

    def quantize(self, path, sha256: str | None, rgb_images: list, out, levels: int, batch: int, **options):
        """Write the calibrated QANN of the float checkpoint ``path`` to ``out`` (the adapter's
        ``quantize_checkpoint``); an option this family does not take is refused by name."""
        quantize_checkpoint = getattr(self.adapter(), "quantize_checkpoint", None)
        if quantize_checkpoint is None:
            raise ValueError(f"the {self.name} family has no quantizer (its adapter defines no quantize_checkpoint)")
        foreign = self.foreign_quantize_options(options)
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not an option for a {self.name} model")
        return quantize_checkpoint(path, sha256, rgb_images, out, levels, batch,
                                   **{k: v for k, v in options.items() if v or k in SHARED_QUANTIZE_OPTIONS})

    def layer_part(self, site: str) -> str:
        """The part of the network (e.g. backbone, neck, head) a neuron call site belongs to: the adapter's
        ``layer_part``, which alone knows its module paths."""
        return self.adapter().layer_part(site)

    def steps_per_stage(self, total: int) -> int:
        """Each stage's step budget within a total ``T`` (every stage runs its own schedule)."""
        if total % len(self.stages):
            raise ValueError(f"T = {total}: a {self.name} detector splits T evenly over its {len(self.stages)} "
                             f"spiking stages; give a multiple of {len(self.stages)}")
        return total // len(self.stages)


FAMILIES: dict[str, Family] = {
    "yolo": Family("yolo", "detector.models.yolo", "SpikingYOLO", ("snn",), "detector.train.yolo",
                   "1,2,4,6,8,16,32,64", sized=True, checkpoint_format="casc-yolo"),
    "rcnn": Family("rcnn", "detector.models.rcnn", "SpikingFasterRCNN", ("stage1", "stage2"), "detector.train.rcnn",
                   "2,4,8,12,16,32,64", sized=False, checkpoint_format="casc-fasterrcnn",
                   quantize_options=("spiking_fpn", "min_size", "max_size")),
}


def get_family(name: str) -> Family:
    """The family called ``name``; a ValueError lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown detector family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of(detector) -> Family:
    """The family of a loaded detector (by its class), whatever engine runs its networks."""
    for family in FAMILIES.values():
        if type(detector).__name__ == family.detector_class and type(detector).__module__.startswith(family.package):
            return family
    raise ValueError(f"{type(detector).__name__} is not the detector of any known family ({', '.join(FAMILIES)})")
