"""The wake-sleep schedule, written once above the step engines that run it.

A *step engine* advances a converted network by one stack of time steps and keeps its states and
readout totals; it knows nothing of wake phases, sleep-until-quiet or cancellation. The PyTorch
runtime (``runtime.TorchStepEngine``) and the ONNX Runtime engine (``export.engine.OrtSpikingNetwork``)
are the two engines. This module drives either of them:

- ``run_schedule``: ``W`` wake steps that feed the input with biases on (``k = 1..W``), then sleep
  steps with zero input and biases off until one in which no neuron fires (``sleep="auto"``, each
  sample on its own, at most ``max_sleep``) or a fixed count. Readouts are the totals divided by ``W``.
- delta frames (``DeltaSession``): a later frame of a video keeps the previous frame's states and
  feeds only its change, ``W * (x_t - x_{t-1})``, as one sleep-type step (biases off, ``k = W``),
  then sleeps until quiet. A quiet CIF neuron's count is ``clip(round(total charge / theta), 0, cap)``
  and LIPool and islands emit ``f(cumulative input) - previous output``: every unit ends where a
  fresh run on the new frame would, so the readouts equal the QANN's outputs on it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

from .energy import RunStats
from .options import AUTO, MAX_SLEEP, Schedule, bounds_of


class RunCancelled(RuntimeError):
    """Raised between two time steps when the run's ``cancel`` event was set (a timed-out request)."""


@dataclass
class RunResult:
    """What one run (or one frame of a delta session) returns: its readouts and, per sample, how it went."""

    readout: Any  # readouts summed over every step, divided by the wake count (the model's structure)
    wake: int  # wake count W the readouts are divided by
    steps: torch.Tensor  # [batch] steps this run took: W + sleep steps (a delta frame: its delta and sleep steps)
    settled: torch.Tensor  # [batch] bool: a silent sleep step confirmed the fixed point
    stats: RunStats | None  # spikes, SOPs, MACs, energy (per step too); None when not recording
    keyframe: bool = True  # False: a delta frame, which fed only the change of its input


@dataclass
class StepEvent:
    """One time step of a streamed run."""

    t: int  # steps so far in this run (1-based)
    phase: str  # "wake", "sleep", or "delta" (the step that feeds a frame's change)
    wake: int  # wake steps so far (k)
    readout: Any  # readouts accumulated so far divided by k: the network's current answer
    spikes: torch.Tensor | None  # [batch] spike events of each sample in this step (None when not recording)
    energy_pj: torch.Tensor | None  # [batch] estimated energy of each sample in this step (None when not recording)
    settled: torch.Tensor  # per sample: has a silent sleep step confirmed its fixed point
    result: RunResult | None = None  # the whole run's result, on the last event only


class StepEngine(Protocol):
    """What the schedule needs of an engine. Inputs are ``[rows, ...]``; activity is ``[steps, rows]``."""

    max_stack: int  # most steps one ``step`` call may stack (1: one step per call)
    runs: int  # ``start`` and ``resume`` calls so far: a delta session sees whether someone else ran in between

    def check_input(self, x) -> None:
        """Refuse, with a ValueError or TypeError naming the problem, an input this engine cannot run."""

    def start(self, x: torch.Tensor, record: bool) -> None:
        """Fresh states and readout totals for a run on ``x`` (its shape, dtype and device)."""

    def resume(self, record: bool) -> None:
        """Keep states and totals (a delta frame); only this run's counters start anew."""

    def step(self, x: torch.Tensor | None, sleeping: bool, wake_counts: list[int], burst: int) -> torch.Tensor | None:
        """Run ``len(wake_counts)`` steps fed ``x`` each (None: zeros). A sleeping stack returns which (step, row)
        saw a neuron or island emit, as a CPU bool tensor ``[steps, rows]``; a wake stack returns None (only a
        silent sleep step settles, so nothing is copied to the host in the wake phase)."""

    def readout(self, k: int) -> Any:
        """The readout totals divided by ``k``, in the network's output structure (new tensors)."""

    def step_figures(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(spikes, energy in pJ) per row of the last step; (None, None) when not counting."""

    def finish(self, wake_steps: int, steps: torch.Tensor) -> RunStats | None:
        """This run's statistics (None when not counting); ends the recording."""

    def save(self) -> Any | None:
        """A handle on the current states and totals that later runs cannot change, or None if the engine
        cannot keep one (a delta session then refreshes with a keyframe after another run)."""

    def load(self, saved: Any) -> None:
        """Put back what ``save`` returned; called only with a handle, never with None."""


def check_int(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def check_schedule(wake: int | None, sleep: int | str, burst: int | None, max_sleep: int,
                   levels: int | None) -> tuple[int, int]:
    """``(wake, burst)`` with their defaults (the network's level count L; ``burst = wake``), or a ValueError
    naming the parameter that is out of its declared bounds (``detector.options.Schedule``)."""
    if wake is None:
        if levels is None:
            raise ValueError("wake is required: this network has no single quantization level count")
        wake = levels
    burst = wake if burst is None else burst
    for name, value in (("wake", wake), ("sleep", sleep), ("burst", burst), ("max_sleep", max_sleep)):
        bounds_of(Schedule, name).check(name, value)
    return wake, burst


def run_schedule(engine: StepEngine, x: torch.Tensor, wake: int, sleep: int | str, burst: int, max_sleep: int,
                 *, stack_wake: bool = False, sleep_chunk: int = 1, record: bool = True,
                 cancel: threading.Event | None = None, every_step: bool = False,
                 delta: torch.Tensor | None = None) -> Iterator[StepEvent]:
    """Drive ``engine`` through one run on ``x``; yield a ``StepEvent`` after every step (``every_step``) or only
    the last, which carries the ``RunResult``.

    ``delta``: a delta frame: keep the engine's states, feed ``delta`` (the frame's change times ``wake``) as one
    sleep-type step, then sleep until quiet. ``stack_wake``: all wake steps in one stack (multistep mode);
    ``sleep_chunk``: most sleep steps per stack (a stack of fixed sleep; ``sleep="auto"`` grows stacks 1, 2, 4, ...
    so that a network that settles in a couple of steps does not compute a long stack of silent ones)."""
    rows = x.shape[0]
    auto = sleep == AUTO
    limit = max_sleep if auto else sleep
    settled_at = torch.zeros(rows, dtype=torch.long)  # sleep steps up to the silent one; 0: not yet
    keyframe = delta is None
    t = done = 0  # steps of this run, sleep steps (a delta step counts as one)
    k = 0  # wake count reached

    def finished() -> bool:
        return k == wake and (done >= limit or (auto and bool((settled_at > 0).all())))

    def event(phase: str) -> StepEvent:
        spikes, energy = engine.step_figures()
        ev = StepEvent(t=t, phase=phase, wake=k, readout=engine.readout(k), spikes=spikes, energy_pj=energy,
                       settled=settled_at > 0)
        if finished():
            used = torch.full_like(settled_at, done)
            if auto:
                used = torch.where(settled_at > 0, settled_at, used)
            steps = used + (wake if keyframe else 0)
            ev.result = RunResult(readout=ev.readout, wake=wake, steps=steps, settled=settled_at > 0,
                                  stats=engine.finish(wake if keyframe else 0, steps), keyframe=keyframe)
        return ev

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise RunCancelled(f"run cancelled after {t} time steps")

    def settle(silent: torch.Tensor) -> None:
        nonlocal done
        for s in range(silent.shape[0]):
            done += 1
            settled_at[silent[s] & (settled_at == 0)] = done

    if keyframe:
        engine.start(x, record)
        if stack_wake and engine.max_stack > 1:
            check_cancel()
            engine.step(x, False, list(range(1, wake + 1)), burst)
            t = k = wake
            if every_step or finished():
                yield event("wake")
        else:
            for step in range(1, wake + 1):
                check_cancel()
                engine.step(x, False, [step], burst)
                t = k = step
                if every_step or finished():
                    yield event("wake")
    else:
        engine.resume(record)
        check_cancel()
        settle(~engine.step(delta, True, [wake], burst))
        t, k = 1, wake
        if every_step or finished():
            yield event("delta")

    chunk = 1 if auto else min(sleep_chunk, engine.max_stack)
    while not finished():
        check_cancel()
        steps = min(chunk, limit - done)
        if auto:
            chunk = min(2 * chunk, sleep_chunk, engine.max_stack)
        settle(~engine.step(None, True, [wake] * steps, burst))
        t += steps
        if every_step or finished():
            yield event("sleep")


def last_result(events: Iterator[StepEvent]) -> RunResult:
    event = None
    for event in events:
        pass
    return event.result


class DeltaSession:
    """A video's frames through one network: the first frame (and every keyframe) runs the whole schedule, each
    later frame feeds only its change and sleeps until quiet. ``run(frame)`` returns that frame's ``RunResult``:
    its readouts equal the QANN's outputs on the frame, its ``steps`` and ``stats`` count that frame alone.

    The session owns its states: a run of the same network by anyone else in between is undone before the next
    frame (the PyTorch engine keeps a handle on the session's states; an engine that cannot makes that frame a
    keyframe). A frame of another shape, dtype or device, a cancelled or failed frame, ``reset()``, and every
    ``keyframe_every``-th frame start from fresh states."""

    def __init__(self, engine: StepEngine, wake: int, burst: int, max_sleep: int = MAX_SLEEP, stack: bool = False,
                 sleep_chunk: int = 8, record: bool = True, keyframe_every: int | None = None):
        if keyframe_every is not None:
            check_int("keyframe_every", keyframe_every, 1)
        self.engine, self.wake, self.burst, self.max_sleep = engine, wake, burst, max_sleep
        self.stack, self.sleep_chunk, self.record, self.keyframe_every = stack, sleep_chunk, record, keyframe_every
        self.frames = 0  # frames run since the last keyframe (1 right after it)
        self._previous: torch.Tensor | None = None
        self._saved = None
        self._mark = None

    def reset(self) -> None:
        """Forget the previous frame: the next one is a keyframe."""
        self._previous, self._saved, self.frames = None, None, 0

    def _delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The input of the next frame's delta step, or None when it must be a keyframe."""
        prev = self._previous
        if prev is None or (self.keyframe_every is not None and self.frames >= self.keyframe_every):
            return None
        if (prev.shape, prev.dtype, prev.device) != (x.shape, x.dtype, x.device):
            return None
        if self.engine.runs != self._mark:  # someone else ran the network since our last frame
            if self._saved is None:
                return None
            self.engine.load(self._saved)
        return (x - prev).mul_(self.wake)

    def stream(self, x: torch.Tensor, cancel: threading.Event | None = None) -> Iterator[StepEvent]:
        """One ``StepEvent`` per step of this frame, as ``SpikingNetwork.stream``; the last carries the result."""
        yield from self._frame(x, cancel, every_step=True)

    def run(self, x: torch.Tensor, cancel: threading.Event | None = None) -> RunResult:
        """This frame's ``RunResult`` (``result.keyframe``: whether it ran the whole schedule)."""
        return last_result(self._frame(x, cancel, every_step=False))

    def _frame(self, x: torch.Tensor, cancel: threading.Event | None, every_step: bool) -> Iterator[StepEvent]:
        self.engine.check_input(x)
        delta = self._delta(x)
        self._previous = None  # a frame that does not finish (cancelled, failed, abandoned) leaves a keyframe next
        for ev in run_schedule(self.engine, x, self.wake, AUTO, self.burst, self.max_sleep, stack_wake=self.stack,
                               sleep_chunk=self.sleep_chunk if self.stack else 1, record=self.record, cancel=cancel,
                               every_step=every_step, delta=delta):
            if ev.result is not None:
                self._previous = x.detach().clone()
                self.frames = 1 if delta is None else self.frames + 1
                self._saved, self._mark = self.engine.save(), self.engine.runs
            yield ev
