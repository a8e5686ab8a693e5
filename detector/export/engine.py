"""ONNX Runtime engine: an exported network stepped with its three graphs, a step engine of ``detector.schedule``.

The schedule (wake, sleep until quiet, delta frames, cancel, events) is ``schedule.run_schedule``, the same as
the PyTorch runtime's in step mode; this engine only runs one step: ``first`` (k = 1, fresh states), ``wake``
(k = 2..W) or ``sleep`` (biases off; fed zeros, or a delta frame's change). States and readout totals live in
two sets of ONNX Runtime buffers on the execution provider's device, bound with IO binding and swapped every
step, so nothing but the input, the scalars ``k`` / ``burst`` and the per-sample ``active`` flags crosses to
the host until the run ends.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented
from torch.utils import _pytree as pytree

from ..options import MAX_SLEEP
from ..schedule import DeltaSession, RunResult, StepEvent, check_schedule, last_result, run_schedule

# provider name -> ONNX Runtime execution providers, in order of preference
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def execution_providers(provider: str) -> list[str]:
    """The ONNX Runtime providers for ``provider`` (cpu, cuda, tensorrt); refuses ones this build lacks."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
    wanted = PROVIDERS[provider]
    if wanted[0] not in ort.get_available_providers():
        raise ValueError(f"ONNX Runtime {ort.__version__} here has no {wanted[0]} (available: "
                         f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for cuda / tensorrt")
    return wanted


class OrtSpikingNetwork:
    """One exported spiking network (``first``/``wake``/``sleep`` graphs) run with ONNX Runtime.

    ``info`` is the network's entry of ``export.json`` (``graphs.export_steps``); ``folder`` holds its
    graphs. Inputs have the exported sample shape; a smaller batch is padded with zero rows (ignored), a
    larger one runs in slices of the exported batch."""

    def __init__(self, folder: str | Path, info: dict, dtype: str = "float32", provider: str = "cpu",
                 threads: int | None = None):
        folder = Path(folder)
        self.info, self.provider = info, provider
        self.levels = info["levels"]
        self.input_shape = tuple(info["input_shape"])
        self.batch = self.input_shape[0]
        self.np_dtype = NUMPY_DTYPES[dtype]
        self.torch_dtype = getattr(torch, dtype)
        self._readout_spec = pytree.treespec_loads(info["readout_spec"])
        options, providers = session_options(threads), execution_providers(provider)
        self.sessions = {variant: self._session(folder / graph["file"], options, providers, dtype)
                         for variant, graph in info["graphs"].items()}
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.runs, self.rows, self._parity = 0, 0, 0
        self._allocate()

    @staticmethod
    def _session(path: Path, options, providers: list[str], dtype: str) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except OrtNotImplemented as error:  # e.g. no float64 Conv on the CPU provider
            raise ValueError(f"{path.name}: ONNX Runtime's {providers[0]} cannot run this {dtype} graph ({error}); "
                             "export it as float32") from None

    # --- buffers and bindings -----------------------------------------------------------

    def _buffer(self, shape, fill: np.ndarray | None = None) -> ort.OrtValue:
        values = np.zeros(shape, self.np_dtype) if fill is None else fill
        return ort.OrtValue.ortvalue_from_numpy(values, self.device, 0)

    def _allocate(self) -> None:
        shapes = [*self.info["state_shapes"], *self.info["readout_shapes"]]
        self._n_states = len(self.info["state_shapes"])
        self._states = [[self._buffer(s) for s in shapes] for _ in range(2)]  # ping-pong: read one, write the other
        self._increments = [self._buffer(s) for s in self.info["readout_shapes"]]
        self._x = self._buffer(self.input_shape)
        self._zeros = self._buffer(self.input_shape)
        self._delta = self._buffer(self.input_shape)
        self._active = ort.OrtValue.ortvalue_from_numpy(np.zeros(self.batch, np.bool_), "cpu", 0)
        self._bindings = {"first": self._bind("first", self._x, None, 0)}
        for parity in (0, 1):
            self._bindings["wake", parity] = self._bind("wake", self._x, parity, 1 - parity)
            self._bindings["sleep", parity] = self._bind("sleep", self._zeros, parity, 1 - parity)
            # a delta frame's step: the sleep graph fed the frame's change
            self._bindings["delta", parity] = self._bind("sleep", self._delta, parity, 1 - parity)

    def _bind(self, variant: str, x: ort.OrtValue, read: int | None, write: int) -> ort.IOBinding:
        binding = self.sessions[variant].io_binding()
        binding.bind_ortvalue_input("x", x)
        names = self.info["graphs"][variant]
        n_totals = len(self.info["readout_shapes"])
        if read is not None:
            for name, value in zip(names["inputs"][-(self._n_states + n_totals):], self._states[read]):
                binding.bind_ortvalue_input(name, value)
        outputs = names["outputs"]
        for name, value in zip(outputs[:self._n_states + n_totals], self._states[write]):
            binding.bind_ortvalue_output(name, value)
        for name, value in zip(outputs[self._n_states + n_totals:-1], self._increments):
            binding.bind_ortvalue_output(name, value)
        binding.bind_ortvalue_output("active", self._active)
        return binding

    def _step(self, key, k: int | None = None, burst: int | None = None) -> np.ndarray:
        binding = self._bindings[key]
        if k is not None:
            binding.bind_cpu_input("k", np.array(k, self.np_dtype))
        if burst is not None:
            binding.bind_cpu_input("burst", np.array(burst, self.np_dtype))
        session = self.sessions[key if isinstance(key, str) else "sleep" if key[0] == "delta" else key[0]]
        session.run_with_iobinding(binding)
        return self._active.numpy()

    # --- the step engine (schedule.StepEngine) -------------------------------------------

    max_stack = 1

    def start(self, x: torch.Tensor, record: bool) -> None:
        self._fits(x, "one run of the schedule")  # run() slices larger batches
        self.runs += 1
        self.rows, self._parity = self._load(self._x, x), 0

    def resume(self, record: bool) -> None:
        self.runs += 1

    def step(self, x: torch.Tensor | None, sleeping: bool, wake_counts: list[int], burst: int) -> torch.Tensor | None:
        (k,) = wake_counts
        if not sleeping:  # the input was loaded by start()
            if k == 1:
                self._step("first")
                self._parity = 0
                return None
            key = ("wake", self._parity)
        elif x is None:
            key = ("sleep", self._parity)
        else:
            self._load(self._delta, x)
            key = ("delta", self._parity)
        active = self._step(key, k=k, burst=burst if sleeping else None)
        self._parity = 1 - self._parity
        return torch.from_numpy(active[:self.rows].copy()).unsqueeze(0) if sleeping else None

    def readout(self, k: int):
        totals = [torch.from_numpy(v.numpy()[:self.rows]) / k for v in self._states[self._parity][self._n_states:]]
        return pytree.tree_unflatten(totals, self._readout_spec)

    def step_figures(self):
        return None, None

    def finish(self, wake_steps: int, steps: torch.Tensor) -> None:
        return None

    def save(self) -> None:
        return None  # states stay on the device: a session interrupted by another run keyframes (load is never called)

    def _load(self, buffer: ort.OrtValue, x: torch.Tensor) -> int:
        rows = x.shape[0]
        values = np.zeros(self.input_shape, self.np_dtype)
        values[:rows] = x.detach().cpu().numpy()
        buffer.update_inplace(values)
        return rows

    # --- the schedule's entry points, as the PyTorch runtime's -----------------------------

    def run(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", mode: str = "step",
            burst: int | None = None, max_sleep: int = MAX_SLEEP, cancel: threading.Event | None = None) -> RunResult:
        """``SpikingNetwork.run``'s schedule and result, called the same way (step mode; ``stats=None``: the
        graphs do not count spikes or energy). A batch larger than the exported one runs in slices of it."""
        if mode != "step":
            raise ValueError(f"the ONNX Runtime engine runs one graph per time step (mode='step'), got mode={mode!r}")
        wake, burst = self._check(x, wake, sleep, burst, max_sleep)
        return _joined([last_result(run_schedule(self, x[i:i + self.batch], wake, sleep, burst, max_sleep,
                                                 record=False, cancel=cancel))
                        for i in range(0, x.shape[0], self.batch)])

    def stream(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", burst: int | None = None,
               max_sleep: int = MAX_SLEEP, record: bool = True, cancel: threading.Event | None = None):
        """``SpikingNetwork.stream``: a ``StepEvent`` after every step with the readouts so far, the last one
        carrying the ``RunResult``. ``spikes`` / ``energy_pj`` / ``stats`` are None whatever ``record`` says (the
        graphs count none), and the batch must fit the exported one (the readouts are read back every step)."""
        wake, burst = self._check(x, wake, sleep, burst, max_sleep)
        self._fits(x, "stream")
        yield from run_schedule(self, x, wake, sleep, burst, max_sleep, record=False, cancel=cancel, every_step=True)

    def session(self, wake: int | None = None, burst: int | None = None, max_sleep: int = MAX_SLEEP, mode: str = "step",
                record: bool = True, keyframe_every: int | None = None) -> DeltaSession:
        """``SpikingNetwork.session`` on this engine: frames of at most the exported batch; no statistics."""
        if mode != "step":
            raise ValueError(f"the ONNX Runtime engine runs one graph per time step (mode='step'), got mode={mode!r}")
        wake, burst = check_schedule(wake, "auto", burst, max_sleep, self.levels)
        return DeltaSession(self, wake, burst, max_sleep=max_sleep, record=False, keyframe_every=keyframe_every)

    def _check(self, x, wake, sleep, burst, max_sleep) -> tuple[int, int]:
        wake, burst = check_schedule(wake, sleep, burst, max_sleep, self.levels)
        self.check_input(x)
        return wake, burst

    def check_input(self, x) -> None:
        """Refuse an input whose sample shape the exported graphs do not take."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape[1:] or not x.shape[0]:
            raise ValueError(f"input shape {tuple(x.shape)} does not fit the exported graphs' "
                             f"{self.input_shape} (any number of rows); export for this size")

    def _fits(self, x: torch.Tensor, what: str) -> None:
        if x.shape[0] > self.batch:
            raise ValueError(f"{what} takes at most the exported batch ({self.batch} rows), got {x.shape[0]}")


def _joined(runs: list[RunResult]) -> RunResult:
    """The runs of consecutive slices of a batch as that batch's run (a network never mixes samples)."""
    if len(runs) == 1:
        return runs[0]
    leaves, spec = zip(*(pytree.tree_flatten(r.readout) for r in runs))
    readout = pytree.tree_unflatten([torch.cat(parts) for parts in zip(*leaves)], spec[0])
    return RunResult(readout=readout, wake=runs[0].wake, steps=torch.cat([r.steps for r in runs]),
                     settled=torch.cat([r.settled for r in runs]), stats=None)
