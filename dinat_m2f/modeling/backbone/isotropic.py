"""Isotropic NAT / DiNAT (ViT-like: 16x16 patch stem, one resolution, layers alternating NA and DiNA).

Module names follow the official checkpoints: ``patch_embed.{proj,norm}``, ``layers.i.*`` (an nn.Sequential of
NATLayers), ``norm``, ``head``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dinat_m2f.modeling.backbone.dinat import NATLayer, PooledClassifier, stochastic_depth_rates
from dinat_m2f.modeling.backbone.dinat_s import PatchEmbed
from dinat_m2f.modeling.backbone.na_attention import check_kernel_and_dilation

__all__ = ["NATIsotropic"]


class NATIsotropic(PooledClassifier):
    """``depth`` NATLayers on the 1/16 map; layer i uses dilation 1 if i is even, else ``dilation``."""

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        kernel_size: int = 7,
        dilation: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
    ):
        super().__init__()
        check_kernel_and_dilation(kernel_size, dilation)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        (rates,) = stochastic_depth_rates(drop_path_rate, [depth])
        self.layers = nn.Sequential(
            *(
                NATLayer(
                    embed_dim,
                    num_heads,
                    kernel_size,
                    dilation=1 if i % 2 == 0 else dilation,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[i],
                    norm_layer=norm_layer,
                )
                for i in range(depth)
            )
        )
        self._add_head(embed_dim, num_classes, norm_layer)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.pos_drop(self.patch_embed(x)))
