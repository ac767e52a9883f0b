"""Read weight files without running code from them: ``load_weights_file(path, trust=False)``.

A pickle can name any importable callable and have the unpickler call it (``__reduce__``), so a weight file from the
internet could run code on load. Here:

- ``.pth`` / ``.pt`` / ``.pyth`` (torch.save) go through ``torch.load(weights_only=True)``: tensors, containers,
  numbers, strings, and the numpy arrays some checkpoints hold (numpy's array-rebuild callables are added with
  ``torch.serialization.safe_globals``).
- ``.pkl`` (detectron2's format: ``{"model": {name: ndarray or tensor}, "__author__": ..., "matching_heuristics":
  True}``, what the official conversion scripts write) go through a restricted unpickler that admits only plain
  containers, strings, numbers, numpy arrays and scalars, and torch tensors (whose storages are read back with
  ``weights_only=True``).

Anything else is refused with an error that names the file and the refused global. ``trust=True`` (``MODEL.
TRUST_WEIGHTS`` / ``--trust-weights``) unpickles fully, for a file one trusts; it is never the default.
"""

from __future__ import annotations

import _codecs
import io
import logging
import os
import pickle
import re
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from detectron2.utils.file_io import PathManager

__all__ = [
    "CorruptWeightsError",
    "UnsafeWeightsError",
    "WeightsFileError",
    "load_weights_file",
]

logger = logging.getLogger(__name__)

TRUST_HINT = "set MODEL.TRUST_WEIGHTS True (train_net.py/demo.py: --trust-weights) only if you trust this file"
PICKLE_SUFFIXES = (".pkl", ".pickle")


class WeightsFileError(ValueError):
    """A weight file cannot be read; the message names the file."""


class UnsafeWeightsError(WeightsFileError):
    """A weight file's pickle names a global that could run code; the message names the file and the global."""


class CorruptWeightsError(WeightsFileError):
    """A weight file is truncated, corrupt or not a weight file at all; the message names the file."""


def _numpy_core() -> Any:
    return getattr(np, "_core", None) or np.core


def _safe_load_from_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` (how a tensor's storage is plainly pickled) without unrestricted loading."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _numpy_globals() -> dict[str, Any]:
    """numpy's array/scalar/dtype rebuild callables, under their numpy 1 (``numpy.core``) and 2 (``numpy._core``)
    module names. They only build arrays from shapes, dtypes and bytes."""
    core = _numpy_core()
    found: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for name, obj in (
        ("multiarray._reconstruct", core.multiarray._reconstruct),
        ("multiarray.scalar", core.multiarray.scalar),
        ("numeric._frombuffer", getattr(core.numeric, "_frombuffer", None)),
    ):
        if obj is not None:
            for package in ("numpy.core", "numpy._core"):
                found[f"{package}.{name}"] = obj
    return found


def _pickle_globals() -> dict[str, Any]:
    """Every global a ``.pkl`` weight file may name, mapped to what it loads as."""
    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray,
        "builtins.complex": complex,
        "_codecs.encode": _codecs.encode,  # bytes pickled by protocol 2
        # torch tensors pickled with plain pickle (the official *-to-d2 conversion scripts write these)
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch.storage._load_from_bytes": _safe_load_from_bytes,
    }
    allowed.update(_numpy_globals())
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that loads only the globals of ``_pickle_globals`` (see the Python docs, "Restricting Globals")."""

    def __init__(self, file, source: str, allowed: dict[str, Any]) -> None:
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles (Detectron / Caffe2 .pkl files)
        self.source = source
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        raise UnsafeWeightsError(
            f"{self.source}: refused to load the global {full!r}: a weight file may hold only tensors, numpy "
            f"arrays, containers, strings and numbers, and loading this global could run code ({TRUST_HINT})"
        )


def _torch_safe_globals() -> list[Any]:
    """numpy's rebuild callables, and its dtype classes (``numpy.dtypes.Float32DType``...), which torch's
    weights-only unpickler must be told it may ``__setstate__``."""
    dtype_classes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")]
    return [(obj, name) for name, obj in _numpy_globals().items()] + dtype_classes


def _refused_global(message: str) -> str | None:
    match = re.search(r"GLOBAL (\S+)", message)
    if not match:
        return None
    return match.group(1) if "." in match.group(1) else f"builtins.{match.group(1)}"  # torch drops "builtins."


def _load_torch_file(path: str, local: str, trust: bool) -> Any:
    if trust:
        return torch.load(local, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(str(exc))
        if refused is None and "weights only" not in str(exc).lower():
            raise CorruptWeightsError(f"{path}: not a readable torch file ({exc})") from None
        what = f"the global {refused!r}" if refused else "an object that is not a tensor, array or container"
        raise UnsafeWeightsError(
            f"{path}: refused to load {what}: a weight file may hold only tensors, numpy arrays, containers, "
            f"strings and numbers, and loading this could run code ({TRUST_HINT})"
        ) from None


def _load_pickle_file(path: str, local: str, trust: bool) -> Any:
    with open(local, "rb") as f:
        if trust:
            return pickle.load(f, encoding="latin1")
        return _RestrictedUnpickler(f, path, _pickle_globals()).load()


def load_weights_file(path: str, trust: bool = False) -> dict[str, Any]:
    """Read a weight file (``.pkl`` through the restricted unpickler, anything else through ``torch.load(
    weights_only=True)``) and return its top-level dict, unchanged.

    ``trust=True`` unpickles fully (can run code from the file). Raises FileNotFoundError (no such file),
    UnsafeWeightsError (a refused global), CorruptWeightsError (truncated / corrupt / not a dict); each names ``path``.
    """
    local = path if os.path.isfile(path) else PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    if trust:
        logger.warning(f"Loading {path} with full unpickling (trusted file): it can run code")
    loader = _load_pickle_file if path.endswith(PICKLE_SUFFIXES) else _load_torch_file
    try:
        data = loader(path, local, trust)
    except (WeightsFileError, FileNotFoundError):
        raise
    except Exception as exc:  # zip / pickle / EOF errors of a truncated or foreign file
        raise CorruptWeightsError(
            f"{path}: cannot read this weight file, it is truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(data, dict):
        raise CorruptWeightsError(f"{path}: a weight file must hold a dict, found {type(data).__name__}")
    return data
