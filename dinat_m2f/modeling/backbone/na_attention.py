"""2D (dilated) neighborhood attention module with the paper-era (NATTEN <= 0.15) dense-prediction padding.

Parameter names (``qkv``, ``rpb``, ``proj``) are those of NATTEN's ``NeighborhoodAttention2D`` so official
checkpoints load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinat_m2f import ops
from dinat_m2f.modeling.linear import Linear

__all__ = ["NeighborhoodAttention2D", "check_kernel_and_dilation", "padded_size", "set_na_backend"]


def check_kernel_and_dilation(kernel_size: object, dilation: object) -> None:
    """Raise a ValueError naming the problem unless kernel_size is an odd int > 1 and dilation an int >= 1."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer > 1, got {kernel_size!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an integer >= 1, got {dilation!r}")


def padded_size(size: int, kernel_size: int, dilation: int) -> int:
    """The map side attention runs on: at least kernel_size * dilation (every dilation group then holds k tokens)."""
    return max(size, kernel_size * dilation)


def set_na_backend(model: nn.Module, backend: str | None) -> None:
    """Make every NeighborhoodAttention2D of ``model`` run on ``backend`` (``MODEL.DINAT.NA_BACKEND``; None: auto)."""
    if backend is not None and backend not in ops.BACKENDS:
        raise ValueError(f"MODEL.DINAT.NA_BACKEND must be '' (automatic) or one of {ops.BACKENDS}, got {backend!r}")
    for module in model.modules():
        if not isinstance(module, NeighborhoodAttention2D):
            continue
        if backend == "triton" and module.attn_drop.p > 0:
            raise ValueError(
                "MODEL.DINAT.NA_BACKEND 'triton' runs the fused attention only, but MODEL.DINAT.ATTN_DROP_RATE > 0 "
                "needs the attention weights (unfused ops); use 'native' or set ATTN_DROP_RATE to 0"
            )
        module.backend = backend


class NeighborhoodAttention2D(nn.Module):
    """Multi-head (dilated) neighborhood attention on channels-last maps ``[B, H, W, C]``.

    When a side of the map is smaller than ``kernel_size * dilation`` the input (already normalized by the layer's
    norm1) is zero-padded at the bottom/right up to that size before ``qkv``; attention runs on the padded map and
    the result is cropped back before ``proj``. The padded tokens are therefore keys/values equal to the qkv bias
    and are NOT masked: real queries near the bottom/right border attend to them. This is what NATTEN <= 0.15 (used
    for every DiNAT dense-prediction result of the paper) did, and the Cityscapes / 512-crop configs rely on it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_kernel_and_dilation(kernel_size, dilation)
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.kernel_size = kernel_size
        self.dilation = dilation

        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend  # dinat_m2f.ops backend; None: DINAT_M2F_NA_BACKEND or the device/dtype default

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}"
        )

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [B, H, W, 3, heads, D] (the projection's output, viewed) -> [B, heads, H, W, D]."""
        # Under autocast qkv comes out of the Linear in bf16/fp16 while rpb stays fp32: the ops want one dtype
        # (the cast is differentiable, so rpb keeps its fp32 gradient).
        rpb = self.rpb.to(qkv.dtype)
        if self.attn_drop.p == 0.0 or not self.training:
            # q, k, v are read in place, the output is stored [B, H, W, heads, D] and the backward writes one
            # gradient of qkv's shape: no layout copies around the attention (native backend).
            return ops.na2d_qkv(qkv, self.kernel_size, self.dilation, rpb=rpb, scale=self.scale, backend=self.backend)
        # Attention dropout needs the attention weights: unfused qk -> softmax -> dropout -> av (on q, k, v views).
        q, k, v = (t.movedim(3, 1) for t in qkv.unbind(3))
        attn = ops.na2d_qk(q * self.scale, k, self.kernel_size, self.dilation, rpb=rpb, backend=self.backend)
        attn = attn.softmax(dim=-1, dtype=torch.promote_types(attn.dtype, torch.float32))  # softmax in >= fp32
        weights = self.attn_drop(attn).to(v.dtype)
        return ops.na2d_av(weights, v, self.kernel_size, self.dilation, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"NeighborhoodAttention2D expects [B, H, W, C] input, got shape {tuple(x.shape)}")
        batch, height, width, channels = x.shape
        hp = padded_size(height, self.kernel_size, self.dilation)
        wp = padded_size(width, self.kernel_size, self.dilation)
        padded = (hp, wp) != (height, width)
        if padded:
            x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))

        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # a view: [B, Hp, Wp, 3, heads, D]
        out = self._attention(qkv)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, hp, wp, channels)  # a view when stored heads-last
        if padded:
            out = out[:, :height, :width, :]
        return self.proj_drop(self.proj(out))
