"""The run parameters, declared once: ``Schedule`` (how a spiking network runs) and ``Selection`` (which
detections are kept), each field with its default, bounds and help text.

    from detector.options import Schedule, Selection, add_arguments, values_of
    add_arguments(parser, Schedule, Selection)           # --wake --sleep --burst --max-sleep --conf ...
    results = detector.predict(images, **values_of(parser.parse_args(), Schedule, Selection))

``casc predict``, ``casc eval`` and the service (``service/params.py``) make their command-line options and
request parameters from these declarations, so a default or a bound is written here only. The library checks a
schedule against the same bounds (``detector.schedule.check_schedule``). Imports nothing heavy: ``casc --help``
reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AUTO", "MAX_SLEEP", "Bounds", "Schedule", "Selection", "add_arguments", "bounds_of", "options_of",
           "parse_value", "values_of"]  # the public API (apps import only these)

AUTO = "auto"  # sleep until the network is quiet (a silent step), at most max_sleep


@dataclass(frozen=True)
class Bounds:
    """What the apps know of one field: the type of a value (int or float), inclusive bounds (None: open), help
    text, and whether the field also takes the word ``auto`` (sleep) or, on a command line, several values
    (classes)."""

    help: str
    kind: type = int
    minimum: float | None = None
    maximum: float | None = None
    auto: bool = False
    many: bool = False

    def check(self, name: str, value):
        """``value`` if it is within the bounds ("auto" where allowed), else a ValueError naming ``name`` and the
        bounds."""
        if self.auto and value == AUTO:
            return value
        if isinstance(value, bool) or not isinstance(value, (int,) if self.kind is int else (int, float)) or \
                not self._contains(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def _contains(self, v: float) -> bool:
        return (self.minimum is None or v >= self.minimum) and (self.maximum is None or v <= self.maximum)

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        span = f">= {self.minimum:g}" if self.maximum is None else f"in {self.minimum:g}..{self.maximum:g}"
        return f"{what} {span}" + (' or "auto"' if self.auto else "")


def _option(default, help: str, **bounds) -> Any:
    return field(default=default, metadata={"bounds": Bounds(help, **bounds)})


@dataclass(frozen=True)
class Schedule:
    """How a spiking stage runs: ``wake`` steps with input and biases, then ``sleep`` steps ("auto": until a
    silent step, at most ``max_sleep``); ``burst`` spikes per neuron per sleep step (None: the wake count).
    ``mode="multistep"`` runs each layer over all steps at once (a library choice, no app option)."""

    wake: int | None = _option(None, "wake steps (None: the model's levels L)", minimum=1)
    sleep: int | str = _option(AUTO, "sleep steps, or 'auto': until the network is quiet, at most max_sleep",
                               minimum=0, auto=True)
    burst: int | None = _option(None, "burst γ: spikes a neuron may emit per sleep step (None: the wake count, which "
                                      "settles in about 2 sleep steps; 1: one spike per step, tens of sleep steps)",
                                minimum=1)
    max_sleep: int = _option(256, "the cap of sleep 'auto'", minimum=1)
    mode: str = "step"

    def run_kwargs(self) -> dict:
        return {"wake": self.wake, "sleep": self.sleep, "burst": self.burst, "max_sleep": self.max_sleep}


@dataclass(frozen=True)
class Selection:
    """Which decoded detections are kept: score at least ``conf``, NMS at ``iou``, at most ``max_det``, only
    ``classes`` (0-based ids) when given."""

    conf: float = _option(0.25, "minimum score", kind=float, minimum=0.0, maximum=1.0)
    iou: float = _option(0.7, "NMS IoU threshold", kind=float, minimum=0.0, maximum=1.0)
    max_det: int = _option(300, "detections per image at most", minimum=1)
    classes: tuple[int, ...] | None = _option(None, "only these class ids (0-based), e.g. --classes 1 5 or "
                                                    "--classes 1,5", minimum=0, many=True)


MAX_SLEEP = Schedule.max_sleep  # the library's default cap of sleep "auto", for the signatures that take it


def options_of(*declarations: type) -> dict[str, tuple[dataclasses.Field, Bounds]]:
    """The app options of ``declarations`` by name: every field with bounds (``Schedule.mode`` has none)."""
    return {f.name: (f, f.metadata["bounds"]) for d in declarations for f in dataclasses.fields(d)
            if "bounds" in f.metadata}


def bounds_of(declaration: type, name: str) -> Bounds:
    return options_of(declaration)[name][1]


def parse_value(declaration: type, name: str, text: str):
    """One option as written on a command line or in a request (text) -> its value within its bounds (sleep: "auto"
    or an integer); a ValueError naming the option otherwise. The one parser of every app."""
    bounds = bounds_of(declaration, name)
    if bounds.auto and text == AUTO:
        return AUTO
    try:
        value = bounds.kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {bounds.describe()}, got {text!r}") from None
    return bounds.check(name, value)


def _argument_type(declaration: type, name: str):
    """argparse's ``type``: a bad value is argparse's one-line usage error naming the option."""

    def parse(text: str):
        try:
            return parse_value(declaration, name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name
    return parse


def add_arguments(parser: argparse.ArgumentParser, *declarations: type, defaults: dict | None = None,
                  skip: tuple[str, ...] = ()) -> None:
    """``--name`` for each option of ``declarations`` (not those in ``skip``), its default (or ``defaults``'),
    bounds and help. ``classes`` takes ids as text (``detector.predict.split_classes`` splits them from the
    sources that may follow)."""
    defaults = defaults or {}
    for declaration in declarations:
        for name, (f, bounds) in options_of(declaration).items():
            if name in skip:
                continue
            flag, default = "--" + name.replace("_", "-"), defaults.get(name, f.default)
            if bounds.many:
                parser.add_argument(flag, nargs="+", default=default, metavar="ID", help=bounds.help)
            else:
                parser.add_argument(flag, type=_argument_type(declaration, name), default=default, help=bounds.help)


def values_of(args: argparse.Namespace, *declarations: type) -> dict:
    """The options of ``declarations`` as parsed into ``args``, by name (the library's keyword arguments)."""
    return {name: getattr(args, name) for name in options_of(*declarations)}
