"""DiNAT_s: the Swin-like layout (patchify stem, PatchMerging) with NA in place of WSA and DiNA in place of SWSA.

Module names follow the official checkpoints: ``patch_embed.{proj,norm}``, ``layers.i.blocks.j.*`` (same sub-keys as
DiNAT, never layer scale), ``layers.i.downsample.{norm,reduction}``, ``norm``, ``head``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinat_m2f.modeling.backbone.dinat import PooledClassifier, build_levels

__all__ = ["DiNAT_s", "PatchEmbed", "PatchMerging", "build_layers"]


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


def build_layers(
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    kernel_size: int,
    dilations: object,
    mlp_ratio: float,
    qkv_bias: bool,
    qk_scale: float | None,
    drop_rate: float,
    attn_drop_rate: float,
    drop_path_rate: float,
    norm_layer: Callable[..., nn.Module],
    use_checkpoint: bool,
) -> nn.ModuleList:
    """The ``layers`` ModuleList of DiNAT_s: DiNAT's levels with PatchMerging and never layer scale."""
    return build_levels(
        embed_dim,
        depths,
        num_heads,
        kernel_size,
        dilations,
        mlp_ratio,
        qkv_bias,
        qk_scale,
        drop_rate,
        attn_drop_rate,
        drop_path_rate,
        norm_layer,
        layer_scale=None,
        use_checkpoint=use_checkpoint,
        downsampler=PatchMerging,
    )


class DiNAT_s(PooledClassifier):  # noqa: N801 (the paper's name)
    """The DiNAT_s classifier."""

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        kernel_size: int = 7,
        dilations: Sequence[Sequence[int]] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = build_layers(
            embed_dim,
            depths,
            num_heads,
            kernel_size,
            dilations,
            mlp_ratio,
            qkv_bias,
            qk_scale,
            drop_rate,
            attn_drop_rate,
            drop_path_rate,
            norm_layer,
            use_checkpoint,
        )
        self._add_head(embed_dim * 2 ** (len(depths) - 1), num_classes, norm_layer)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            _, x = layer(x)
        return x
