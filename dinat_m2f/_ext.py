"""Loading of the compiled extension ``dinat_m2f._C`` with errors that say how to fix the build."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

REBUILD_HINT = (
    "Rebuild it from the repository root with `make build` (or `make setup` on a fresh checkout; "
    "by hand: `pip install -e . --no-build-isolation --no-deps`)."
)


class ExtensionUnavailableError(ImportError):
    """The compiled extension is missing or was built for another torch."""


@functools.cache
def load_extension() -> ModuleType:
    """Import ``dinat_m2f._C`` (which registers torch.ops.dinat_m2f.*) or raise a clear error."""
    try:
        from dinat_m2f import _C
    except ImportError as exc:
        msg = str(exc)
        if "undefined symbol" in msg or "version" in msg.lower():
            raise ExtensionUnavailableError(
                f"dinat_m2f._C does not load with torch {torch.__version__}: it was probably built for another "
                f"torch ({msg}). {REBUILD_HINT}"
            ) from exc
        raise ExtensionUnavailableError(
            f"the compiled extension dinat_m2f._C is missing ({msg}). {REBUILD_HINT}"
        ) from exc
    built_for = _C.build_info()["torch_version"]
    if built_for != torch.__version__:
        raise ExtensionUnavailableError(
            f"dinat_m2f._C was built for torch {built_for} but torch {torch.__version__} is installed. {REBUILD_HINT}"
        )
    # The C++ side registers kernels only; fake kernels and autograd are registered in Python. Run those
    # registrations here so that torch.ops.dinat_m2f.* is complete (torch.compile, backward) whoever loads the
    # extension first. Modules that register at import call load_extension() themselves (a re-entrant call finds
    # them already in sys.modules); dinat_m2f.ops.na imports without _C and registers through _register_native.
    for module in _PYTHON_REGISTRATIONS:
        register = getattr(importlib.import_module(module), "_register_native", None)
        if register is not None:
            register()
    return _C


_PYTHON_REGISTRATIONS = ("dinat_m2f.ops.na", "dinat_m2f.ops.ms_deform_attn")


def build_info() -> dict:
    """Which backends were compiled (cpu, cuda and its archs), with which flags, and for which torch."""
    return dict(load_extension().build_info())
