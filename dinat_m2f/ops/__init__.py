"""Neighborhood attention ops on the native extension ``dinat_m2f._C``.

Layout: ``[B, heads, H, W, D]`` (2D) and ``[B, heads, L, D]`` (1D). ``na*_qk`` returns raw logits (no scaling),
``na*_av`` applies attention weights, and the fused ``na1d``/``na2d`` compute softmax(scale * q.k + rpb) v
without materialising the weights. ``dinat_m2f.ops.reference`` holds the slow pure-PyTorch equivalents.

The native ops are imported lazily, so ``dinat_m2f.ops.reference`` works without a build; using any public op
loads the extension and raises a clear error when it is missing (there is no silent fallback).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["na1d", "na1d_av", "na1d_qk", "na2d", "na2d_av", "na2d_qk"]

if TYPE_CHECKING:
    from dinat_m2f.ops.na import na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk  # noqa: F401


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("dinat_m2f.ops.na"), name)
    raise AttributeError(f"module 'dinat_m2f.ops' has no attribute {name!r}")
