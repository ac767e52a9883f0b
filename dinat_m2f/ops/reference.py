"""Slow, obviously-right pure-PyTorch neighborhood attention (NATTEN 0.14-0.17 semantics).

Used by the tests as ground truth, and at run time only when a user explicitly asks for it. Everything is a
gather of the k (1D) or k*k (2D) neighbors followed by an einsum, so autograd gives every gradient for free.

Semantics (see shared/spec/neighborhood-attention.md):
- per axis of length L, kernel k (odd), dilation d: query i belongs to dilation group r = i % d, which holds
  L' = ceil((L - r) / d) tokens; its window starts at clamp(i // d - k // 2, 0, L' - k) * d + r and covers
  start + t * d for t = 0..k-1 (shifted inward at the borders, never truncated);
- the bias index of a (query, key) pair is (key - query) / d + k - 1 on each axis;
- no scaling inside ``*_qk``: callers pre-scale q. The fused ``na1d``/``na2d`` apply ``scale`` (default D**-0.5)
  to q.k and then add the bias: softmax(scale * q.k + rpb) v.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["window_indices", "na1d_qk", "na1d_av", "na1d", "na2d_qk", "na2d_av", "na2d"]


def window_indices(length: int, kernel_size: int, dilation: int, device=None) -> torch.Tensor:
    """[length, kernel_size] int64: the key positions in each query's window along one axis."""
    if length < kernel_size * dilation:
        raise ValueError(f"axis of size {length} is smaller than kernel_size*dilation = {kernel_size * dilation}")
    pos = torch.arange(length, device=device)
    group = pos % dilation
    group_len = (length - group + dilation - 1) // dilation
    start = (pos // dilation - kernel_size // 2).clamp(min=0)
    start = torch.minimum(start, group_len - kernel_size) * dilation + group
    return start[:, None] + torch.arange(kernel_size, device=device)[None, :] * dilation


def _bias_indices(idx: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """[length, kernel_size]: (key - query) / dilation + kernel_size - 1 (exact: same dilation group)."""
    query = torch.arange(idx.shape[0], device=idx.device)[:, None]
    return torch.div(idx - query, dilation, rounding_mode="floor") + kernel_size - 1


def _check(x: torch.Tensor, dims: int, name: str) -> None:
    if x.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D tensor, got shape {tuple(x.shape)}")


def na1d_qk(
    q: torch.Tensor, k: torch.Tensor, kernel_size: int, dilation: int = 1, rpb: torch.Tensor | None = None
) -> torch.Tensor:
    """q, k: [B, heads, L, D] -> attn [B, heads, L, kernel_size]; rpb: [heads, 2*kernel_size - 1]."""
    _check(q, 4, "q")
    idx = window_indices(q.shape[2], kernel_size, dilation, q.device)
    keys = k[:, :, idx, :]  # [B, heads, L, kernel_size, D]
    attn = torch.einsum("bhld,bhltd->bhlt", q, keys)
    if rpb is not None:
        attn = attn + rpb[:, _bias_indices(idx, kernel_size, dilation)][None]
    return attn


def na1d_av(attn: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """attn: [B, heads, L, kernel_size], v: [B, heads, L, D] -> [B, heads, L, D]."""
    _check(v, 4, "v")
    idx = window_indices(v.shape[2], kernel_size, dilation, v.device)
    return torch.einsum("bhlt,bhltd->bhld", attn, v[:, :, idx, :])


def na2d_qk(
    q: torch.Tensor, k: torch.Tensor, kernel_size: int, dilation: int = 1, rpb: torch.Tensor | None = None
) -> torch.Tensor:
    """q, k: [B, heads, H, W, D] -> attn [B, heads, H, W, k*k] (window row-major, first index along H)."""
    _check(q, 5, "q")
    height, width = q.shape[2], q.shape[3]
    ih = window_indices(height, kernel_size, dilation, q.device)  # [H, k]
    iw = window_indices(width, kernel_size, dilation, q.device)  # [W, k]
    keys = k[:, :, ih[:, None, :, None], iw[None, :, None, :], :]  # [B, heads, H, W, k, k, D]
    attn = torch.einsum("bhijd,bhijxyd->bhijxy", q, keys)
    if rpb is not None:
        bh = _bias_indices(ih, kernel_size, dilation)
        bw = _bias_indices(iw, kernel_size, dilation)
        attn = attn + rpb[:, bh[:, None, :, None], bw[None, :, None, :]][None]
    return attn.flatten(-2)


def na2d_av(attn: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """attn: [B, heads, H, W, k*k], v: [B, heads, H, W, D] -> [B, heads, H, W, D]."""
    _check(v, 5, "v")
    height, width = v.shape[2], v.shape[3]
    ih = window_indices(height, kernel_size, dilation, v.device)
    iw = window_indices(width, kernel_size, dilation, v.device)
    values = v[:, :, ih[:, None, :, None], iw[None, :, None, :], :]
    weights = attn.unflatten(-1, (kernel_size, kernel_size))
    return torch.einsum("bhijxy,bhijxyd->bhijd", weights, values)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    # Softmax in at least float32 (bf16/fp16 inputs), as the fused kernels do.
    acc = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(acc).softmax(-1).to(logits.dtype)


def _fused(
    qk: Callable[..., torch.Tensor],
    av: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int,
    rpb: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    # The fused op is the composition qk -> softmax -> av, in 1D and 2D alike.
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return av(_softmax(qk(q * scale, k, kernel_size, dilation, rpb)), v, kernel_size, dilation)


def na1d(q, k, v, kernel_size: int, dilation: int = 1, rpb=None, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q.k + rpb) v over each query's 1D neighborhood; scale defaults to D**-0.5."""
    return _fused(na1d_qk, na1d_av, q, k, v, kernel_size, dilation, rpb, scale)


def na2d(q, k, v, kernel_size: int, dilation: int = 1, rpb=None, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q.k + rpb) v over each query's 2D neighborhood; scale defaults to D**-0.5."""
    return _fused(na2d_qk, na2d_av, q, k, v, kernel_size, dilation, rpb, scale)
