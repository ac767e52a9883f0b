"""Isotropic NAT / DiNAT (ViT-like: 16x16 patch stem, one resolution, layers alternating NA and DiNA).

Module names follow the official checkpoints: ``patch_embed.{proj,norm}``, ``layers.i.*`` (an nn.Sequential of
NATLayers), ``norm``, ``head``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dinat_m2f.modeling.backbone.dinat import NATLayer, PooledClassifier, resolve_spec
from dinat_m2f.modeling.backbone.dinat_s import PatchEmbed
from dinat_m2f.modeling.backbone.na_attention import check_kernel_and_dilation
from dinat_m2f.modeling.backbone.spec import IsotropicSpec, stochastic_depth_rates

__all__ = ["NATIsotropic"]


class NATIsotropic(PooledClassifier):
    """``depth`` NATLayers on the 1/16 map; layer i uses dilation 1 if i is even, else ``dilation``.

    Built from an :class:`IsotropicSpec` or from its flat keywords; keywords given with a spec override it.
    """

    def __init__(
        self,
        spec: IsotropicSpec | None = None,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        patch_size: int = 16,
        **spec_kwargs: Any,
    ):
        super().__init__()
        self.spec = spec = resolve_spec(spec, spec_kwargs, IsotropicSpec)
        check_kernel_and_dilation(spec.layer.kernel_size, spec.dilation)
        self.patch_embed = PatchEmbed(patch_size, in_chans, spec.embed_dim)
        self.pos_drop = nn.Dropout(spec.layer.drop_rate)
        (rates,) = stochastic_depth_rates(spec.drop_path_rate, [spec.depth])
        self.layers = nn.Sequential(
            *(
                NATLayer(spec.embed_dim, spec.num_heads, dilation, rate, spec.layer)
                for dilation, rate in zip(spec.dilations(), rates)
            )
        )
        self._add_head(spec.embed_dim, num_classes)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.pos_drop(self.patch_embed(x)))
