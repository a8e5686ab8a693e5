"""Ultralytics ``.pt`` files read without running code: ``torch.load(weights_only=True)`` under an allowlist.

An Ultralytics checkpoint is a pickle of the model object itself, so its file names classes for the unpickler to
rebuild. Every name it references is checked before anything is unpickled (``referenced_globals``, a static
scan): only the classes such files hold are allowed (``allowed_global``) -- ``nn.Module`` subclasses of
``torch.nn``, Ultralytics' model modules and this library's quantizers, Ultralytics' loss objects that older
files kept, NumPy scalars and dtypes, ``IterableSimpleNamespace``, paths, and ``getattr`` restricted to a
module's ``forward``. Any other name (``os.system``, ``builtins.eval``, ...) refuses the file with a one-line
``UnsafeCheckpoint`` that names it. ``--allow-unverified`` relaxes the digest check only, never this.
"""

from __future__ import annotations

import importlib
import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...checkpoint import CheckpointError
from .ultralytics_env import prepare_ultralytics

# packages whose nn.Module subclasses a YOLO checkpoint may hold (the module's own name must be under one)
MODULE_PACKAGES = ("torch.nn.modules.", "ultralytics.nn.modules.", "ultralytics.nn.tasks", "detector.")
# modules whose plain classes older Ultralytics checkpoints pickled with the model (its loss and assigner)
OBJECT_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal")
ATTRIBUTES = {"forward", "forward_fuse"}  # what ``getattr`` may fetch from a module (pickled bound methods)
GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")
CLASS_IN_ERROR = re.compile(r"got <class '([\w.]+)'>")
# numpy.dtype(...) builds these classes at run time (a static scan cannot see them): the numeric ones are data
NUMERIC_DTYPES = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_)
MAX_SCAN_BYTES = 64 << 20  # a non-zip pickle is scanned this far for the name it references


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint that names a class or function outside the allowlist (refused before it is unpickled)."""


def _module_getattr(obj, name: str):
    """``getattr`` as a checkpoint may use it: a module's (or module class's) ``forward`` only."""
    if name in ATTRIBUTES and (isinstance(obj, nn.Module) or (isinstance(obj, type) and issubclass(obj, nn.Module))):
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr(..., {name!r}) is not allowed in a checkpoint")


def _fixed_globals() -> dict[str, object]:
    """The non-module names Ultralytics checkpoints hold, by their pickled name."""
    import pathlib

    from ultralytics.utils import IterableSimpleNamespace

    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar constructor (train metrics as np.float64)
    fixed = {"numpy.dtype": np.dtype, "numpy.core.multiarray.scalar": scalar, "numpy._core.multiarray.scalar": scalar,
             "ultralytics.utils.IterableSimpleNamespace": IterableSimpleNamespace,
             "ultralytics.yolo.utils.IterableSimpleNamespace": IterableSimpleNamespace,
             "builtins.getattr": _module_getattr}
    for module in ("pathlib", "pathlib._local"):
        for name in ("PosixPath", "WindowsPath"):
            fixed[f"{module}.{name}"] = pathlib.PurePosixPath  # a path is only data here
    return fixed


def allowed_global(name: str) -> object | None:
    """The object a checkpoint may reference as ``name`` ("module.Class"), or None if it may not."""
    fixed = _fixed_globals()
    if name in fixed:
        return fixed[name]
    module_name, _, attr = name.rpartition(".")
    in_packages = any(module_name.startswith(p) or module_name == p.rstrip(".") for p in MODULE_PACKAGES)
    if not (in_packages or module_name in OBJECT_MODULES) or attr.startswith("_"):
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        return None
    if not isinstance(obj, type) or obj.__module__ != module_name:
        return None
    return obj if module_name in OBJECT_MODULES or issubclass(obj, nn.Module) else None


def _pickle_globals(data: bytes) -> list[str]:
    """The "module.name" globals a plain pickle references, read from its opcodes (nothing is executed)."""
    names, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a broken pickle: the names read so far
        pass
    return names


def referenced_globals(path: Path) -> list[str]:
    """Every global ``path`` references beyond what ``torch.load(weights_only=True)`` allows by default."""
    if zipfile.is_zipfile(path):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({str(error).splitlines()[0]})") from None
    with open(path, "rb") as f:
        return _pickle_globals(f.read(MAX_SCAN_BYTES))


def load_ultralytics_file(path: str | Path) -> dict:
    """The checkpoint dict of an Ultralytics ``.pt``, unpickled with ``weights_only=True`` and the allowlist.

    ``UnsafeCheckpoint`` (one line, naming the first refused class) if the file references anything else;
    ``CheckpointError`` if it is not a zip-format PyTorch checkpoint of a dict."""
    path = Path(path)
    prepare_ultralytics()
    names = referenced_globals(path)
    refused = [n for n in names if allowed_global(n) is None]
    if refused:
        raise UnsafeCheckpoint(f"{path}: refused: it references {refused[0]}, which is not a class an Ultralytics "
                               "checkpoint holds (nothing from the file was run)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a zip-format PyTorch checkpoint (torch.save); re-save it with a current "
                              "torch, or export this project's format (casc export)")
    allowed = [(allowed_global(n), n) for n in names]
    if "numpy.dtype" in names:
        allowed += [type(np.dtype(t)) for t in NUMERIC_DTYPES]
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # a name pushed at run time, not seen by the scan
        found = GLOBAL_IN_ERROR.search(str(error)) or CLASS_IN_ERROR.search(str(error))
        what = f"it references {found.group(1)}" if found else "it holds objects outside the allowlist"
        raise UnsafeCheckpoint(f"{path}: refused: {what} (nothing from the file was run)") from None
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not an Ultralytics checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt
