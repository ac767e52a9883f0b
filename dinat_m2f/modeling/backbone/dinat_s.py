"""DiNAT_s: the Swin-like layout (patchify stem, PatchMerging) with NA in place of WSA and DiNA in place of SWSA.

Module names follow the official checkpoints: ``patch_embed.{proj,norm}``, ``layers.i.blocks.j.*`` (same sub-keys as
DiNAT, never layer scale), ``layers.i.downsample.{norm,reduction}``, ``norm``, ``head``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dinat_m2f.modeling.backbone.dinat import DiNAT, TrunkLayout

__all__ = ["DINAT_S_LAYOUT", "DiNAT_s", "PatchEmbed", "PatchMerging"]


class PatchEmbed(nn.Module):
    """Non-overlapping patchify conv (input right/bottom zero-padded to a multiple of the patch) then LayerNorm."""

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Callable[..., nn.Module] | None = nn.LayerNorm,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW image -> channels-last [B, ceil(H/p), ceil(W/p), C]."""
        pad_b = -x.shape[2] % self.patch_size
        pad_r = -x.shape[3] % self.patch_size
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nn.Module):
    """Swin patch merging: 2x2 neighbours concatenated (odd sides zero-padded), LayerNorm(4C), Linear(4C -> 2C)."""

    def __init__(self, dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


def _patchify_stem(in_chans: int, embed_dim: int) -> PatchEmbed:
    return PatchEmbed(4, in_chans, embed_dim)


DINAT_S_LAYOUT = TrunkLayout("DiNAT_s", _patchify_stem, PatchMerging, "layers", has_layer_scale=False)


class DiNAT_s(DiNAT):  # noqa: N801 (the paper's name)
    """The DiNAT_s classifier: DiNAT's classifier on the Swin-like layout (no layer scale)."""

    layout = DINAT_S_LAYOUT
    _default_spec_kwargs: ClassVar[dict[str, Any]] = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
