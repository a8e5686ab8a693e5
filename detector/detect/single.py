"""What a detector with one spiking network shares, whatever its family: ``SingleStageDetector``.

Its network ``snn`` reads the prepared batch and its readouts decode straight to detections, so running,
streaming, video sessions and anytime detections need only the family's decoding (``_decoded``) and the network it
was converted from (``qann_raw``). ``SpikingYOLO`` is one; ``tests/toy_family`` shows a third family built on it.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Iterator, Sequence

import torch

from ..runtime import RunResult, SpikingNetwork
from .base import Batch, Schedule, Selection, SpikingDetector
from .results import DetectionEvent, Results, RunFigures


class SingleStageDetector(SpikingDetector):
    """A ``SpikingDetector`` with one spiking network, ``snn``. Besides ``_split_tensor`` and ``_prepare`` a family
    states ``qann_raw(x)`` (the converted network's readouts of a prepared batch) and ``_decoded(batch, readout, keep,
    runs)`` (readouts -> one ``Results`` per image, with each image's ``RunFigures``)."""

    snn: SpikingNetwork

    @abstractmethod
    def qann_raw(self, x: torch.Tensor) -> Any:
        """The readouts of the network ``snn`` was converted from (the QANN) for a prepared batch ``x``."""

    @abstractmethod
    def _decoded(self, batch: Batch, readout: Any, keep: Selection,
                 runs: Sequence[RunFigures] | None = None) -> list[Results]:
        """Each image's ``Results`` from ``readout`` with its spiking run's figures (``runs``; None: the QANN's)."""

    def _infer(self, batch: Batch, schedule: Schedule | None, cancel, session=None) -> RunResult | Any:
        if schedule is None:
            return self.qann_raw(batch.x)
        if session is not None:
            return session.run(batch.x, cancel=cancel)
        return self.snn.run(batch.x, mode=schedule.mode, cancel=cancel, **schedule.run_kwargs())

    def _video_session(self, schedule: Schedule, keyframe_every: int | None):
        return self.snn.session(wake=schedule.wake, burst=schedule.burst, max_sleep=schedule.max_sleep,
                                mode=schedule.mode, keyframe_every=keyframe_every)

    def _postprocess(self, batch: Batch, out: RunResult | Any, keep: Selection) -> list[Results]:
        if not isinstance(out, RunResult):
            return self._decoded(batch, out, keep)
        counted = out.stats is not None  # False: an engine that counts no spikes (ONNX Runtime)
        runs = [RunFigures(steps=int(out.steps[i]), wake=out.wake, settled=bool(out.settled[i]),
                           spikes=float(out.stats.spikes[i]) if counted else None,
                           energy_uj=float(out.stats.energy_pj[i]) * 1e-6 if counted else None, keyframe=out.keyframe)
                for i in range(len(out.steps))]
        return self._decoded(batch, out.readout, keep, runs)

    def _events(self, batch: Batch, schedule: Schedule, keep: Selection, cancel) -> Iterator[DetectionEvent]:
        """After every time step, the detections decoded from the readouts so far, with spike counts. The last
        event's detections equal ``predict``'s (step mode)."""
        total = energy = 0.0
        for event in self.snn.stream(batch.x, cancel=cancel, **schedule.run_kwargs()):
            spikes = None if event.spikes is None else float(event.spikes[0])  # None: the engine counts none
            if spikes is None:
                total = energy = None
            else:
                total += spikes
                energy += float(event.energy_pj[0])
            settled = bool(event.settled[0])
            run = RunFigures(steps=event.t, wake=event.wake, settled=settled, spikes=total,
                             energy_uj=None if energy is None else energy * 1e-6)
            yield DetectionEvent(stage=1, t=event.t, stage_t=event.t, phase=event.phase, wake=event.wake,
                                 spikes=spikes, cumulative_spikes=total, settled=settled,
                                 detections=self._decoded(batch, event.readout, keep, [run])[0],
                                 final=event.result is not None)

    def _anytime(self, batch: Batch, wanted: list[int], schedule: Schedule,
                 keep: Selection) -> tuple[dict[int, list[Results]], dict]:
        """CASC readouts stop changing once a sample settles, so a ``t`` past the end reuses the final answer;
        the IF baseline runs ``wake=max(t)`` steps and its readout after step ``t`` (summed, divided by ``t``)
        is exactly the ``wake=t`` result. ``info``: per-image steps used, settled, spikes and energy of the full
        run, ``energy_uj_at`` and ``workload_at`` (every requested ``t``; ``RunStats.workload_until``), ANN energy,
        firing rates."""
        readouts, settled_at, last = {}, {}, None
        for event in self.snn.stream(batch.x, **schedule.run_kwargs()):
            last = event
            if event.t in wanted:
                readouts[event.t] = event.readout
                settled_at[event.t] = event.settled.tolist()
        run = last.result
        stats = run.stats  # None: an engine that counts no spikes (ONNX Runtime), so no spikes or energy
        steps = run.steps.tolist()
        nothing = [None] * len(steps)
        results = {}
        for t in wanted:  # past the run's end (settled) nothing changes any more: the final readout
            energy = nothing if stats is None else (stats.energy_pj_until(t) * 1e-6).tolist()
            spikes = nothing if stats is None else stats.spikes_per_step[:t].sum(0).tolist()
            settled = settled_at.get(t, run.settled.tolist())
            figures = [RunFigures(steps=min(t, steps[i]), wake=min(t, schedule.wake), settled=settled[i],
                                  spikes=spikes[i], energy_uj=energy[i]) for i in range(len(steps))]  # after step t
            results[t] = self._decoded(batch, readouts.get(t, last.readout), keep, figures)
        info = {"steps": steps, "settled": run.settled.tolist()}
        if stats is not None:
            info.update({"spikes": stats.spikes.tolist(), "energy_uj": (stats.energy_pj * 1e-6).tolist(),
                         "energy_uj_at": {t: (stats.energy_pj_until(t) * 1e-6).tolist() for t in wanted},
                         "workload_at": {t: {k: v.tolist() for k, v in stats.workload_until(t).items()}
                                         for t in wanted},
                         "ann_energy_uj": stats.ann_energy_pj * 1e-6, "firing_rates": stats.firing_rates})
        return results, info
