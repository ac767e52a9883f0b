"""Isotropic NAT / DiNAT (ViT-like: 16x16 patch stem, one resolution, layers alternating NA and DiNA).

Module names follow the official checkpoints: ``patch_embed.{proj,norm}``, ``layers.i.*`` (an nn.Sequential of
NATLayers), ``norm``, ``head``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dinat_m2f.modeling.backbone.dinat import NATLayer, init_weights
from dinat_m2f.modeling.backbone.dinat_s import PatchEmbed
from dinat_m2f.modeling.backbone.na_attention import check_kernel_and_dilation

__all__ = ["NATIsotropic"]


class NATIsotropic(nn.Module):
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
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
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
        self.norm = norm_layer(embed_dim)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"rpb"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.pos_drop(self.patch_embed(x)))
        x = self.norm(x).flatten(1, 2)
        return self.avgpool(x.transpose(1, 2)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
