"""ONNX Runtime engine: the wake-sleep schedule of an exported network, stepped with its three graphs.

The schedule is the runtime's (``SpikingNetwork.run`` in step mode): ``W`` wake steps (the first from
fresh states), then sleep steps until one in which no neuron fires (``sleep="auto"``, each sample
settles on its own) or a fixed count, readouts summed over every step and divided by ``W``. States
and readout totals live in two sets of ONNX Runtime buffers on the execution provider's device,
bound with IO binding and swapped every step, so nothing but the input image, the scalars ``k`` /
``burst`` and the per-sample ``active`` flags crosses to the host until the run ends.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented
from torch.utils import _pytree as pytree

from ..runtime import RunCancelled, RunResult, StepEvent

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
        self._active = ort.OrtValue.ortvalue_from_numpy(np.zeros(self.batch, np.bool_), "cpu", 0)
        self._bindings = {"first": self._bind("first", None, 0)}
        for variant in ("wake", "sleep"):
            for parity in (0, 1):
                self._bindings[variant, parity] = self._bind(variant, parity, 1 - parity)

    def _bind(self, variant: str, read: int | None, write: int) -> ort.IOBinding:
        binding = self.sessions[variant].io_binding()
        binding.bind_ortvalue_input("x", self._zeros if variant == "sleep" else self._x)
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
        session = self.sessions[key if isinstance(key, str) else key[0]]
        session.run_with_iobinding(binding)
        return self._active.numpy()

    # --- the schedule -------------------------------------------------------------------

    def run(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", mode: str = "step",
            burst: int | None = None, max_sleep: int = 256, cancel: threading.Event | None = None) -> RunResult:
        """``SpikingNetwork.run``'s schedule and result, called the same way (step mode; ``stats=None``: the
        graphs do not count spikes or energy). A batch larger than the exported one runs in slices of it."""
        if mode != "step":
            raise ValueError(f"the ONNX Runtime engine runs one graph per time step (mode='step'), got mode={mode!r}")
        wake, burst = self._check(x, wake, sleep, burst, max_sleep)
        runs = []
        for i in range(0, x.shape[0], self.batch):
            for event in self._steps(x[i:i + self.batch], wake, sleep, burst, max_sleep, cancel, every_step=False):
                pass
            runs.append(event.result)
        return _joined(runs)

    def stream(self, x: torch.Tensor, wake: int | None = None, sleep: int | str = "auto", burst: int | None = None,
               max_sleep: int = 256, record: bool = True, cancel: threading.Event | None = None):
        """``SpikingNetwork.stream``: a ``StepEvent`` after every step with the readouts so far, the last one
        carrying the ``RunResult``. ``spikes`` / ``energy_pj`` / ``stats`` are None whatever ``record`` says (the
        graphs count none), and the batch must fit the exported one (the readouts are read back every step)."""
        wake, burst = self._check(x, wake, sleep, burst, max_sleep)
        if x.shape[0] > self.batch:
            raise ValueError(f"stream takes at most the exported batch ({self.batch} rows), got {x.shape[0]}")
        yield from self._steps(x, wake, sleep, burst, max_sleep, cancel, every_step=True)

    def _check(self, x, wake, sleep, burst, max_sleep) -> tuple[int, int]:
        wake = self.levels if wake is None else wake
        burst = wake if burst is None else burst
        for name, value in (("wake", wake), ("burst", burst), ("max_sleep", max_sleep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if sleep != "auto" and (isinstance(sleep, bool) or not isinstance(sleep, int) or sleep < 0):
            raise ValueError(f'sleep must be an integer >= 0 or "auto", got {sleep!r}')
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape[1:] or not x.shape[0]:
            raise ValueError(f"input shape {tuple(x.shape)} does not fit the exported graphs' "
                             f"{self.input_shape} (any number of rows); export for this size")
        return wake, burst

    def _readout(self, parity: int, rows: int, k: int):
        totals = [torch.from_numpy(v.numpy()[:rows]) / k for v in self._states[parity][self._n_states:]]
        return pytree.tree_unflatten(totals, self._readout_spec)

    def _steps(self, x: torch.Tensor, wake: int, sleep: int | str, burst: int, max_sleep: int,
               cancel: threading.Event | None, every_step: bool):
        """The schedule on one slice; ``StepEvent``s after every step (``every_step``) or only the last."""
        rows = self._load_input(x)
        settled_at = torch.zeros(rows, dtype=torch.long)
        limit = max_sleep if sleep == "auto" else sleep
        done = parity = 0

        def finished() -> bool:
            return done >= limit or (sleep == "auto" and bool((settled_at > 0).all()))

        def event(t: int, phase: str, k: int) -> StepEvent:
            ev = StepEvent(t=t, phase=phase, wake=k, readout=self._readout(parity, rows, k), spikes=None,
                           energy_pj=None, settled=settled_at > 0)
            if k == wake and finished():
                used = torch.full_like(settled_at, done)
                if sleep == "auto":
                    used = torch.where(settled_at > 0, settled_at, used)
                ev.result = RunResult(readout=ev.readout, wake=wake, steps=used + wake, settled=settled_at > 0,
                                      stats=None)
            return ev

        def check_cancel(t: int) -> None:
            if cancel is not None and cancel.is_set():
                raise RunCancelled(f"run cancelled after {t} time steps")

        for k in range(1, wake + 1):
            check_cancel(k - 1)
            if k == 1:
                self._step("first")
            else:
                self._step(("wake", parity), k=k)
                parity = 1 - parity
            if every_step or (k == wake and finished()):
                yield event(k, "wake", k)
        while not finished():
            check_cancel(wake + done)
            active = torch.from_numpy(self._step(("sleep", parity), k=wake, burst=burst)[:rows].copy())
            parity = 1 - parity
            done += 1
            settled_at[~active & (settled_at == 0)] = done
            if every_step or finished():
                yield event(wake + done, "sleep", wake)

    def _load_input(self, x: torch.Tensor) -> int:
        rows = x.shape[0]
        values = np.zeros(self.input_shape, self.np_dtype)
        values[:rows] = x.detach().cpu().numpy()
        self._x.update_inplace(values)
        return rows


def _joined(runs: list[RunResult]) -> RunResult:
    """The runs of consecutive slices of a batch as that batch's run (a network never mixes samples)."""
    if len(runs) == 1:
        return runs[0]
    leaves, spec = zip(*(pytree.tree_flatten(r.readout) for r in runs))
    readout = pytree.tree_unflatten([torch.cat(parts) for parts in zip(*leaves)], spec[0])
    return RunResult(readout=readout, wake=runs[0].wake, steps=torch.cat([r.steps for r in runs]),
                     settled=torch.cat([r.settled for r in runs]), stats=None)
