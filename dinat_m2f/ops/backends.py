"""Which implementation runs a neighborhood-attention op: ``"native"``, ``"triton"`` or ``"reference"``.

- ``native``: the compiled extension ``dinat_m2f._C`` (CPU kernels; CUDA kernels when built with CUDA). The simple,
  obviously-right GPU baseline and the only float64 GPU path.
- ``triton``: the tiled Triton kernels of :mod:`dinat_m2f.ops.na_triton` (fused ``na1d``/``na2d`` only; CUDA
  tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``reference``: the slow pure-PyTorch gather + einsum of :mod:`dinat_m2f.ops.reference`.

Choice, first match wins: the op's ``backend=`` argument (the backbone passes ``MODEL.DINAT.NA_BACKEND`` when it
is not empty); the environment variable ``DINAT_M2F_NA_BACKEND``; the default for the device and dtype
(:data:`MEASURED_DEFAULTS`, decided from measured GPU numbers; native until measured). A backend that cannot run
here is an error naming the reason, never a silent fallback. Under ``torch.compile`` the choice is made while
tracing and baked into the graph (changing the variable later does not recompile).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["BACKENDS", "ENV_VAR", "available_backends", "default_backend", "resolve_backend"]

BACKENDS = ("native", "triton", "reference")
ENV_VAR = "DINAT_M2F_NA_BACKEND"
FUSED_ONLY = {"triton"}  # backends without the unfused na*_qk / na*_av

# (device type, dtype) -> backend of the fused ops when nothing is asked for. Filled from `make gpu-check` numbers
# (tools/gpu_check.py reports the fastest correct backend per case); empty = native everywhere until measured.
MEASURED_DEFAULTS: dict[tuple[str, torch.dtype], str] = {}


@functools.cache
def _native_unavailable_reason(device_type: str) -> str | None:
    from dinat_m2f._ext import ExtensionUnavailableError, load_extension

    try:
        info = load_extension().build_info()
    except ExtensionUnavailableError as exc:
        return str(exc)
    if device_type not in info["backends"]:
        return (
            f"dinat_m2f._C was built without {device_type} kernels (built backends: {info['backends']}); "
            "rebuild it on a machine with the CUDA toolkit (`make build`)"
        )
    return None


def unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """None when ``backend`` can run ops on ``device`` here, else why not."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "native":
        return _native_unavailable_reason(device.type)
    if backend == "triton":
        from dinat_m2f.ops.na_triton import triton_unavailable_reason

        return triton_unavailable_reason(device)
    raise ValueError(f"unknown neighborhood-attention backend {backend!r}; expected one of {BACKENDS}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on ``device`` (default: CUDA when available, else CPU) on this machine."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def default_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend used when neither the call nor the environment names one."""
    return MEASURED_DEFAULTS.get((torch.device(device).type, dtype), "native")


def _check_name(backend: str, source: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{source} names neighborhood-attention backend {backend!r}; expected one of {BACKENDS}")
    return backend


def resolve_backend(backend: str | None, op: str, device: torch.device, dtype: torch.dtype, fused: bool) -> str:
    """The backend ``op`` runs with, checked to be able to run on ``device`` (else a RuntimeError saying why)."""
    if backend:
        backend = _check_name(backend, f"{op}(backend=...)")
        asked_by = f"{op}(backend={backend!r})"
    elif os.environ.get(ENV_VAR):
        backend = _check_name(os.environ[ENV_VAR], f"the environment variable {ENV_VAR}")
        asked_by = f"{ENV_VAR}={backend}"
        if not fused and backend in FUSED_ONLY:
            # The variable selects the fused attention; the unfused primitives keep the default implementation.
            backend = default_backend(device, dtype)
    else:
        backend = default_backend(device, dtype)
        asked_by = f"the default backend for {torch.device(device).type}/{dtype}"
    if not fused and backend in FUSED_ONLY:
        raise ValueError(
            f"{op} has no {backend!r} implementation (asked by {asked_by}): the Triton backend covers the fused "
            "na1d/na2d only; use backend='native' or 'reference'"
        )
    if backend == "native":
        from dinat_m2f._ext import load_extension

        load_extension()  # a missing or stale build raises its own error, which says how to rebuild
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} (asked by {asked_by}) cannot run on {device}: {reason}")
    return backend
