"""Neighborhood attention ops: ``na1d``/``na2d`` (fused) and the unfused ``na*_qk``/``na*_av``.

Layout: ``[B, heads, H, W, D]`` (2D) and ``[B, heads, L, D]`` (1D). ``na*_qk`` returns raw logits (no scaling),
``na*_av`` applies attention weights, and the fused ``na1d``/``na2d`` compute softmax(scale * q.k + rpb) v
without materialising the weights; ``na1d_qkv``/``na2d_qkv`` do the same on the packed qkv projection output, with
no layout copies (q, k, v, the output and their gradients stay in the projections' layout). ``dinat_m2f.ops.reference`` holds the slow pure-PyTorch equivalents.

Every op takes ``backend=`` ("native", "triton" for the fused ops, "reference"; None = ``DINAT_M2F_NA_BACKEND``
or the default for the device and dtype, see :mod:`dinat_m2f.ops.backends`). Importing this package needs only
torch: the compiled extension is loaded by the first native call, which raises a clear rebuild error when it is
missing (there is no silent fallback).
"""

from __future__ import annotations

from dinat_m2f.ops.backends import BACKENDS, available_backends
from dinat_m2f.ops.na import na1d, na1d_av, na1d_qk, na1d_qkv, na2d, na2d_av, na2d_qk, na2d_qkv

__all__ = [
    "BACKENDS",
    "available_backends",
    "na1d",
    "na1d_av",
    "na1d_qk",
    "na1d_qkv",
    "na2d",
    "na2d_av",
    "na2d_qk",
    "na2d_qkv",
]
