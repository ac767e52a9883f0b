"""Official NAT/DiNAT ImageNet checkpoints -> detectron2 backbone weights (used by tools/convert_dinat_checkpoint.py).

- The classification head (``head.*``) and final norm (``norm.*``) are dropped: the backbone has ``norm0..3``.
- A relative-position bias ``[heads, 2k-1, 2k-1]`` is resized to the target kernel Swin-style by default
  (``method="torch"``: ``F.interpolate(mode="bicubic", align_corners=False)``), the resize behind the official
  ``dinat_large_in22k_224_11x11interp.pth``. ``method="keys"`` is bicubic convolution (Keys, a = -0.5) along each
  axis with the extreme offsets mapped onto each other (offset +-(k-1) -> +-(k'-1)) and Keys' boundary rule (cubic
  extrapolation of the two missing taps): exact on linear (and quadratic) biases, which F.interpolate (a = -0.75,
  clamped borders) is not.
- Against a target model, every unexpected, missing or mis-shaped tensor is reported by name (an error), never
  silently skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CheckpointMismatchError",
    "HEAD_PREFIXES",
    "check_against_target",
    "convert_state_dict",
    "cubic_resize_matrix",
    "resize_rpb",
    "unwrap_state_dict",
]

logger = logging.getLogger(__name__)

HEAD_PREFIXES = ("head.", "norm.")
_RPB_SUFFIX = ".attn.rpb"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the target model; the message lists every tensor at fault by name."""


def _keys_weight(t: float, a: float = -0.5) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def cubic_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] float64 matrix of Keys cubic convolution with end points aligned and Keys' boundary rule.

    The taps left of 0 and right of n_in-1 are the cubic extrapolations f(-1) = 3f(0) - 3f(1) + f(2) (and the
    mirror image at the other end), which keep the interpolation exact for polynomials of degree <= 2.
    """
    if n_in < 3 or n_out < 1:
        raise ValueError(f"cannot resize a bias axis of {n_in} entries to {n_out}")
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)

    def add(row: int, tap: int, weight: float) -> None:
        if tap < 0:  # f(-1) = 3 f(0) - 3 f(1) + f(2)
            for src, c in ((0, 3.0), (1, -3.0), (2, 1.0)):
                matrix[row, src] += c * weight
        elif tap >= n_in:  # f(n) = 3 f(n-1) - 3 f(n-2) + f(n-3)
            for src, c in ((n_in - 1, 3.0), (n_in - 2, -3.0), (n_in - 3, 1.0)):
                matrix[row, src] += c * weight
        else:
            matrix[row, tap] += weight

    for row in range(n_out):
        x = row * (n_in - 1) / (n_out - 1) if n_out > 1 else (n_in - 1) / 2
        base = min(math.floor(x), n_in - 2)
        t = x - base
        for offset in (-1, 0, 1, 2):
            add(row, base + offset, _keys_weight(t - offset))
    return matrix


def resize_rpb(rpb: torch.Tensor, kernel_size: int, method: str = "torch") -> torch.Tensor:
    """Resize a bias ``[heads, 2k-1, 2k-1]`` to ``[heads, 2K-1, 2K-1]`` for ``kernel_size`` K (same dtype)."""
    if rpb.dim() != 3 or rpb.shape[1] != rpb.shape[2] or rpb.shape[1] % 2 == 0:
        raise ValueError(f"a relative-position bias must be [heads, 2k-1, 2k-1], got shape {tuple(rpb.shape)}")
    size = 2 * kernel_size - 1
    if method == "torch":
        out = F.interpolate(rpb[None].double(), size=(size, size), mode="bicubic", align_corners=False)[0]
    elif method == "keys":
        m = cubic_resize_matrix(rpb.shape[1], size)
        out = torch.einsum("oi,hij,pj->hop", m, rpb.double(), m)
    else:
        raise ValueError(f"unknown rpb resize method {method!r} (use 'keys' or 'torch')")
    return out.to(rpb.dtype)


def unwrap_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """The tensor dict inside an official checkpoint (a bare state dict, or under "model" / "state_dict"); numpy
    arrays (detectron2 .pkl files) become tensors."""
    if isinstance(checkpoint, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError("the checkpoint holds no state dict (expected a dict of tensors, or one under 'model')")
    bad = [k for k, v in checkpoint.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
    if bad:
        raise ValueError(f"the checkpoint's state dict has non-tensor entries: {bad[:10]}")
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in checkpoint.items()}


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], kernel_size: int | None = None, method: str = "torch"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the classification head and resize every rpb to ``kernel_size`` (None: keep). Returns (weights, log)."""
    out, log = {}, []
    dropped = sorted(k for k in state_dict if k.startswith(HEAD_PREFIXES))
    if dropped:
        log.append(f"dropped the classification head/final norm: {', '.join(dropped)}")
    resized = 0
    for key, value in state_dict.items():
        if key.startswith(HEAD_PREFIXES):
            continue
        if kernel_size is not None and key.endswith(_RPB_SUFFIX) and value.shape[-1] != 2 * kernel_size - 1:
            new = resize_rpb(value, kernel_size, method)
            log.append(f"resized {key}: {tuple(value.shape)} -> {tuple(new.shape)} ({method} bicubic)")
            value, resized = new, resized + 1
        out[key] = value
    if kernel_size is not None:
        log.append(f"{resized} relative-position biases resized to kernel {kernel_size}")
    return out, log


def check_against_target(
    weights: Mapping[str, torch.Tensor], target_shapes: Mapping[str, tuple[int, ...]], new_ok: tuple[str, ...] = ()
) -> list[str]:
    """Raise CheckpointMismatchError naming every unexpected, mis-shaped or missing tensor.

    ``new_ok``: prefixes of target tensors that are expected to be absent (e.g. the output norms ``norm0..3``);
    they are returned in a list (to log) instead of raising.
    """
    problems = []
    for key, value in weights.items():
        if key not in target_shapes:
            problems.append(f"unexpected {key} {tuple(value.shape)} (no such tensor in the target model)")
        elif tuple(value.shape) != tuple(target_shapes[key]):
            problems.append(f"shape mismatch {key}: checkpoint {tuple(value.shape)} vs model {target_shapes[key]}")
    missing = sorted(k for k in target_shapes if k not in weights)
    fresh = [k for k in missing if k.startswith(new_ok)]
    problems += [f"missing {k} {tuple(target_shapes[k])}" for k in missing if not k.startswith(new_ok)]
    if problems:
        raise CheckpointMismatchError(
            f"{len(problems)} tensor(s) do not fit the target model:\n  " + "\n  ".join(problems)
        )
    return fresh
