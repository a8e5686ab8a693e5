"""The detectors of one evaluation: the QANN (ANN-free methods and CASC), the same QANN as QCFS neurons and the
float model's IF baseline, each run on a batch of images at every requested T in one pass (``Detectors``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from detector.families import family_of
from detector.neuron_kinds import neuron_kind
from detector.weights import ModelEntry, load_detector, load_manifest, resolve

from .config import METHOD_NEURONS, PAPER_SLEEP_EXTRA, EvalConfig, stage_budgets


def model_pair(model: str, float_model: str | None) -> tuple[ModelEntry, ModelEntry | None]:
    """The QANN entry and the float model it was fine-tuned from (the ANN and the IF baseline's source)."""
    manifest = load_manifest()
    qann = resolve(model, manifest)
    if qann.kind != "qann":
        raise ValueError(f"--model must be a QANN; {qann.name} is a {qann.kind} model: quantize it first (casc quantize "
                         f"--model {qann.name} --levels 4 --data DATA --out qann.pt), then casc eval --model qann.pt "
                         f"--float-model {qann.name}")
    source = float_model or qann.float_model
    return qann, (resolve(source, manifest) if source else None)


class Detectors:
    """Builds what each method needs and runs one batch of images through it."""

    def __init__(self, qann: ModelEntry, float_entry: ModelEntry | None, config: EvalConfig, device: torch.device,
                 dtype: torch.dtype):
        methods = config.methods
        self.family, self.config, self.methods = qann.family, config, methods
        self.float_entry, self.device, self.dtype = float_entry, device, dtype
        self.needs_float = {"ann", "if"} & set(methods)
        if "qcfs" in methods and config.engine != "pytorch":
            raise ValueError("--methods qcfs runs on the PyTorch engine only (the exported step graphs are the CASC "
                             "network's); drop qcfs or use --engine pytorch")
        engine = {"engine": config.engine, "provider": config.provider, "batch": config.batch,
                  "threads": config.threads} if config.engine != "pytorch" else {}
        # first: a float checkpoint given as --model is refused with what to do, before asking for --float-model
        self.qann = load_detector(_source(qann), device=device, dtype=dtype, **engine)
        self.names = [self.qann.names[i] for i in sorted(self.qann.names)]
        if "qcfs" in methods:  # the same QANN, QCFS neurons
            self.qcfs = load_detector(_source(qann), device=device, dtype=dtype, neuron=METHOD_NEURONS["qcfs"])
        if self.needs_float and float_entry is None:
            raise ValueError(f"methods {sorted(self.needs_float)} need the float model: pass --float-model (or "
                             "--methods qann,casc)")

    def load_float(self, calibration: list) -> None:
        """The float model for ANN and the IF baseline (thresholds from ``calibration`` images' activations, on
        the PyTorch engine), when a method needs it."""
        if self.needs_float:
            self.float = load_detector(_source(self.float_entry), device=self.device, dtype=self.dtype,
                                       neuron=METHOD_NEURONS["if"], calibration=calibration)

    def _flat(self, detector, images) -> list:
        a = self.config
        return detector.qann_predict(images, conf=a.conf, iou=a.iou, max_det=a.max_det, color="rgb")

    def _curve(self, detector, images, budgets: list[int], wake, sleep, burst=None):
        a = self.config
        results, info = detector.detections_at_steps(images, budgets, conf=a.conf, iou=a.iou, max_det=a.max_det,
                                                     wake=wake, sleep=sleep, burst=burst, max_sleep=a.max_sleep,
                                                     color="rgb")
        return results, (self._two_stage_info(info) if len(family_of(detector).stages) > 1 else info)

    @staticmethod
    def _two_stage_info(info: dict) -> dict:
        """The YOLO adapter's info shape for a two-stage run (total steps of both stages)."""
        return {"steps": info["steps"], "settled": info["settled"], "energy_uj": info["energy_uj"],
                "energy_uj_at": info["energy_uj_at"], "steps_at": info["steps_at"],
                **({"workload_at": info["workload_at"]} if "workload_at" in info else {}),
                "stage1_steps_at": info["stage1_steps_at"], "stage2_steps_at": info["stage2_steps_at"],
                "ann_energy_uj": float(np.mean(info["ann_energy_uj"])),
                "firing_rates": info.get("firing_rates", {})}

    def run(self, images: list[np.ndarray], image_ids: list[int], timesteps: list[int], on_method=None) -> dict:
        """{method: {"records": {T or "flat" or "auto": [record per image]}, "info": ..., "seconds": ...}} for one
        batch; ``on_method(name)`` is called as each method starts (progress)."""
        out = {}
        for method in self.methods:
            if on_method:
                on_method(method)
            start = time.perf_counter()
            if method in ("ann", "qann"):
                detector = self.float if method == "ann" else self.qann
                out[method] = {"records": {"flat": self._records(self._flat(detector, images), image_ids)}}
            else:
                out[method] = self._spiking(method, images, image_ids, timesteps)
            out[method]["seconds"] = time.perf_counter() - start
        return out

    def _spiking(self, method: str, images, image_ids, timesteps: list[int]) -> dict:
        """One run serving every T; results and per-T info keyed by total T (and ``auto``)."""
        a = self.config
        budgets = {str(t): b for t, b in stage_budgets(self.family, timesteps).items()}
        if method == "casc" and a.sleep == "auto":  # past the cap every sample has settled (or hit the cap)
            budgets["auto"] = self.auto_key
        detector, wake, sleep, burst = self.schedule(method)
        results, info = self._curve(detector, images, sorted(set(budgets.values())), wake, sleep, burst)
        records = {key: self._records(results[b], image_ids) for key, b in budgets.items()}
        for name in ("energy_uj_at", "workload_at", "steps_at", "stage1_steps_at", "stage2_steps_at"):
            if name in info:
                info[name] = {key: info[name][b] for key, b in budgets.items()}
        return {"records": records, "info": _plain(info)}

    def schedule(self, method: str) -> tuple:
        """(detector, wake, sleep, burst) of a spiking method: CASC as asked; casc-paper one spike per sleep step
        and ``L + PAPER_SLEEP_EXTRA`` sleep steps; the rate-coded QCFS and IF wake = T, no sleep."""
        a = self.config
        if neuron_kind(METHOD_NEURONS[method]).rate_coded:
            return (self.qcfs if method == "qcfs" else self.float), None, 0, None
        if method == "casc-paper":
            return self.qann, a.wake, (a.wake or self.qann.levels) + PAPER_SLEEP_EXTRA, 1
        return self.qann, a.wake, a.sleep, a.burst

    @property
    def auto_key(self) -> int:
        return 10_000 + self.config.max_sleep  # a step count no run reaches

    def probe(self, image: np.ndarray) -> dict[str, float]:
        """Seconds of one QANN forward, of one spiking step and of a spiking run's fixed part (setup, decoding),
        on one image after a warm-up: what the cost estimate prices. Steps from a 1- and a 4-step run."""
        stages = len(family_of(self.qann).stages)
        forward = _best_of(2, lambda: self._flat(self.qann, [image]))
        short, long = (_best_of(2, lambda k=k: self._curve(self.qann, [image], [k], k, 0)) for k in (1, 4))
        step = max(long - short, 0.0) / (3 * stages)
        return {"forward_s": forward, "step_s": step, "run_s": max(short - stages * step, 0.0)}

    @staticmethod
    def _records(results, image_ids) -> list[dict]:
        """Each image's plain form (``Results.to_dict``, boxes as computed) with its dataset image id."""
        return [{**r.to_dict(decimals=None), "image_id": int(i)} for r, i in zip(results, image_ids)]


def _source(entry: ModelEntry):
    """What ``load_detector`` takes for ``entry``: its manifest name (checked against the manifest's sha256), else
    its checkpoint path."""
    return entry.name if entry.sha256 else entry.path


def _best_of(runs: int, work) -> float:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def _plain(value):
    """JSON-ready: tensors to lists, keys to strings."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
