"""The two stages of ``SpikingFasterRCNN`` step by step: the stream's events and anytime detections at many T.

``TwoStageSteps`` holds what ``SpikingDetector.stream`` and ``detections_at_steps`` ask of a two-stage
detector (``_events``, ``_anytime``) and the per-image ``RunFigures`` both stages' runs add up to. It is mixed into
``SpikingFasterRCNN``, which provides the stages (``stage1`` / ``stage2`` and the networks they were converted
from, ``qann_stage1`` / ``qann_stage2``) and the glue between them (``proposals``, ``roi_features``,
``_results``, ``_empty_stage2``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import torch

from ...detect import Batch, Boxes, DetectionEvent, Results, RunFigures, Schedule, Selection
from ...energy import PJ_PER_MAC, count_macs
from ...runtime import RunResult, SpikingNetwork


class TwoStageSteps:
    """Stage 1 then stage 2, step by step (mixed into ``SpikingFasterRCNN``; see the module docstring)."""

    def _figures(self, proposals: list[torch.Tensor], run1: RunResult, run2: RunResult | None,
                 wake: int | None) -> list[RunFigures]:
        """Each image's steps (total and per stage), settled flag, spikes, energy and proposal count from the
        two stages' runs of ``wake`` wake steps each (``run2`` is None when no image had a proposal; its rows are the
        images' RoIs). Spikes and energy are None when the runs have no ``stats`` (an engine that counts no spikes:
        ONNX Runtime)."""
        s1, s2 = run1.stats, run2.stats if run2 is not None else None
        figures = []
        for i, (a, b) in enumerate(row_ranges(proposals)):
            t1 = int(run1.steps[i])
            t2 = int(run2.steps[a:b].max()) if run2 is not None and b > a else 0
            spikes = energy = None
            if s1 is not None:
                spikes = float(s1.spikes[i]) + (float(s2.spikes[a:b].sum()) if s2 is not None else 0.0)
                energy = (float(s1.energy_pj[i]) + (float(s2.energy_pj[a:b].sum()) if s2 is not None else 0.0)) * 1e-6
            figures.append(RunFigures(
                steps=t1 + t2, stage_steps={"stage1": t1, "stage2": t2}, wake=wake,
                settled=bool(run1.settled[i]) and (run2 is None or b == a or bool(run2.settled[a:b].all())),
                spikes=spikes, energy_uj=energy, proposals=b - a, keyframe=run1.keyframe))
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
            if ev.energy_pj is None:  # an engine that counts no spikes (ONNX Runtime)
                energy = spikes = None
            else:
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

    def _events(self, batch: Batch, schedule: Schedule, keep: Selection, cancel) -> Iterator[DetectionEvent]:
        """Every stage-1 step (no detections yet), then every stage-2 step with the detections decoded from
        stage 2's readouts so far. The last event (``final=True``) carries ``predict``'s result."""
        image_list, total, energy = batch.x, 0.0, 0.0
        last1 = None
        for ev in self.stage1.stream(image_list.tensors, cancel=cancel, **schedule.run_kwargs()):
            last1 = ev
            spikes, total, energy = _counted(ev, total, energy)
            empty = batch.result(0, Boxes.empty(batch.shapes[0]), self.names, RunFigures(
                steps=ev.t, stage_steps={"stage1": ev.t, "stage2": 0}, wake=ev.wake, settled=False, spikes=total,
                energy_uj=_uj(energy)))
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
                spikes, total, energy = _counted(ev, total, energy)
                settled = bool(ev.settled.all())
                run = RunFigures(steps=t1 + ev.t, stage_steps={"stage1": t1, "stage2": ev.t}, wake=ev.wake,
                                 settled=settled and bool(run1.settled.all()), spikes=total, energy_uj=_uj(energy),
                                 proposals=int(rois.shape[0]))
                found = self._results(batch, dict(out, class_logits=ev.readout[0], box_regression=ev.readout[1]),
                                      keep, [run])[0]
                pending = DetectionEvent(stage=2, t=t1 + ev.t, stage_t=ev.t, phase=ev.phase, wake=ev.wake,
                                         spikes=spikes, cumulative_spikes=total, settled=settled, detections=found)
                run2 = ev.result
        else:
            logits, regression = self._empty_stage2(rois)
            found = self._results(batch, dict(out, class_logits=logits, box_regression=regression), keep)[0]
            pending = DetectionEvent(stage=2, t=t1, stage_t=0, phase="sleep", wake=0, spikes=0.0,
                                     cumulative_spikes=total, settled=True, detections=found)
        # only now is it known to be the last step: its detections get the figures of both whole runs
        pending.detections = replace(pending.detections, run=self._figures(proposals, run1, run2, schedule.wake)[0])
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
        / ``stage2_steps_at`` / ``steps_at`` / ``workload_at`` (per image, at each ``t``; both stages, see
        ``_image_workloads``), ``ann_energy_uj`` (per image: stage 1
        plus stage 2 once per RoI), ``proposals`` and both stages' ``firing_rates`` (of the largest ``t``)."""
        image_list = batch.x
        detections: dict[int, list[Results]] = {}
        info: dict[str, Any] = {"energy_uj_at": {}, "stage1_steps_at": {}, "stage2_steps_at": {}, "steps_at": {}}
        settled_at: dict[int, list[bool]] = {}
        work2_at: dict[int, tuple] = {}
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
                wake2 = group1[-1] if self.neuron_kind.rate_coded else schedule.wake
                stage2 = list(self._readouts_at(self.stage2, rois, group1, schedule, wake2))
                ann_macs2 = ann_macs2 or count_macs(self.qann_stage2, rois[:1])
            else:
                stage2 = [(group1, self._empty_stage2(rois), *none)]
            last2 = stage2[-1][-1]  # the stage-2 run serving these t (None: no RoIs, or not recorded)
            stats2 = None if last2 is None else last2.stats
            rates2: dict[str, float] = {}
            ranges = row_ranges(proposals)
            for group2, (logits, regression), used2, energy2, spikes2, settled2, run2 in stage2:
                if run2 is not None and run2.stats is not None:
                    rates2 = run2.stats.firing_rates
                counted = energy1 is not None and (rois.shape[0] == 0 or energy2 is not None)
                figures = _group_figures(ranges, schedule.wake, (used1, energy1, spikes1, settled1),
                                         (used2, energy2, spikes2, settled2), counted)
                dets = self._results(batch, {"class_logits": logits, "box_regression": regression,
                                             "proposals": proposals}, keep, figures)
                for t in group2:
                    detections[t] = dets
                    info["energy_uj_at"][t] = [f.energy_uj for f in figures]
                    info["stage1_steps_at"][t] = [f.stage_steps["stage1"] for f in figures]
                    info["stage2_steps_at"][t] = [f.stage_steps["stage2"] for f in figures]
                    info["steps_at"][t] = [f.steps for f in figures]
                    settled_at[t] = [f.settled for f in figures]
                    work2_at[t] = (None if stats2 is None else stats2.workload_until(t), ranges)
            final_rows = [len(p) for p in proposals]
            if run1 is not None and run1.stats is not None:  # stage 2's sites are box_head.* / box_predictor.*
                info["firing_rates"] = {**run1.stats.firing_rates, **rates2}
        if run1 is not None and run1.stats is not None:
            info["workload_at"] = {t: _image_workloads(run1.stats.workload_until(t), *work2_at[t]) for t in ts}
        last = ts[-1]
        info["steps"] = info["steps_at"][last]
        info["energy_uj"] = info["energy_uj_at"][last]
        info["settled"] = settled_at[last]
        info["ann_energy_uj"] = [(ann_macs1 + (ann_macs2 or 0) * n) * PJ_PER_MAC * 1e-6 for n in final_rows]
        info["proposals"] = final_rows
        return detections, info


def _group_figures(ranges: list[tuple[int, int]], wake: int, stage1: tuple, stage2: tuple,
                   counted: bool) -> list[RunFigures]:
    """Each image's figures at a budget of both stages: ``stage1`` (steps used, energy, spikes, settled per image)
    and ``stage2`` (the same per RoI, ``ranges`` each image's rows); spikes and energy only when ``counted``."""
    (used1, energy1, spikes1, settled1), (used2, energy2, spikes2, settled2) = stage1, stage2
    figures = []
    for i, (a, b) in enumerate(ranges):
        s1, s2 = int(used1[i]), int(used2[a:b].max()) if b > a else 0
        energy = float(energy1[i]) + float(energy2[a:b].sum()) if counted else None
        figures.append(RunFigures(
            steps=s1 + s2, stage_steps={"stage1": s1, "stage2": s2}, wake=wake,
            settled=bool(settled1[i]) and bool(settled2[a:b].all()),
            spikes=float(spikes1[i]) + float(spikes2[a:b].sum()) if counted else None, energy_uj=_uj(energy),
            proposals=b - a))
    return figures


def _image_workloads(stage1: dict[str, torch.Tensor], stage2: dict[str, torch.Tensor] | None,
                     ranges: list[tuple[int, int]]) -> dict[str, list[float]]:
    """Both stages' ``RunStats.workload_until`` per image: stage 1's row plus its RoIs' stage-2 rows (the stages
    run one after the other, the RoIs side by side: steps and binary-equivalent steps add stage 1's to the
    longest RoI's, every count adds all of them)."""
    out = {}
    for name, first in stage1.items():
        values = []
        for i, (a, b) in enumerate(ranges):
            rows = stage2[name][a:b] if stage2 is not None and b > a else None
            extra = 0.0 if rows is None else float(rows.max() if name in ("steps", "binary_steps") else rows.sum())
            values.append(float(first[i]) + extra)
        out[name] = values
    return out


def _counted(event, total: float | None, energy: float | None) -> tuple:
    """(spikes of this step, spikes so far, energy so far in pJ) after a streamed step; all None from an engine
    that counts no spikes (ONNX Runtime)."""
    if event.spikes is None:
        return None, None, None
    spikes = float(event.spikes.sum())
    return spikes, total + spikes, energy + float(event.energy_pj.sum())


def _uj(picojoules: float | None) -> float | None:
    return None if picojoules is None else picojoules * 1e-6


def row_ranges(proposals: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Each image's rows [a, b) among the stage-2 RoIs (the images' proposals, in order)."""
    starts = np.cumsum([0] + [len(p) for p in proposals])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

