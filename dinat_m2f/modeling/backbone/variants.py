"""The classification models of the NAT / DiNAT papers, buildable by name (with their classification head).

    >>> from dinat_m2f.modeling.backbone import build_variant
    >>> model = build_variant("dinat_tiny")          # 1000-class DiNAT-Tiny at 224
    >>> model.load_state_dict(torch.load("dinat_tiny_in1k_224.pth"))   # official ImageNet weights, no renaming

Each entry records the input size the model was trained at (``VARIANTS[name].input_size``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from dinat_m2f.modeling.backbone.dinat import DiNAT
from dinat_m2f.modeling.backbone.dinat_s import DiNAT_s
from dinat_m2f.modeling.backbone.isotropic import NATIsotropic
from dinat_m2f.modeling.backbone.spec import HierarchicalSpec, IsotropicSpec

__all__ = ["VARIANTS", "Variant", "build_variant", "alternating_dilations", "list_variants"]


def alternating_dilations(depths: Sequence[int], dina: Sequence[int]) -> list[list[int]]:
    """Each stage alternates NA (even layers, dilation 1) and DiNA (odd layers, dilation ``dina[stage]``)."""
    return [[1 if j % 2 == 0 else d for j in range(depth)] for depth, d in zip(depths, dina)]


@dataclass(frozen=True)
class Variant:
    """A named model: its class, its settings, the input size it was trained at and its number of classes."""

    builder: Callable[..., nn.Module]
    spec: HierarchicalSpec | IsotropicSpec
    input_size: int = 224
    num_classes: int = 1000

    def build(self, **overrides) -> nn.Module:
        return self.builder(self.spec, **{"num_classes": self.num_classes, **overrides})


_DEPTHS = (3, 4, 18, 5)
_MINI_DEPTHS = (3, 4, 6, 5)
_S_DEPTHS = (2, 2, 18, 2)
_DINA_224 = (8, 4, 2, 1)  # floor(map / 7) at 224: maps 56, 28, 14, 7
_DINA_384 = (13, 6, 3, 1)  # floor(map / 7) at 384: maps 96, 48, 24, 12

# NAT (every dilation 1); the DiNAT variants are these with alternating dilations.
_MINI = HierarchicalSpec.from_kwargs(
    embed_dim=64, depths=_MINI_DEPTHS, num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2
)
_TINY = HierarchicalSpec.from_kwargs(
    embed_dim=64, depths=_DEPTHS, num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2
)
_SMALL = HierarchicalSpec.from_kwargs(
    embed_dim=96, depths=_DEPTHS, num_heads=(3, 6, 12, 24), mlp_ratio=2.0, drop_path_rate=0.3
)
_BASE = HierarchicalSpec.from_kwargs(
    embed_dim=128, depths=_DEPTHS, num_heads=(4, 8, 16, 32), mlp_ratio=2.0, drop_path_rate=0.5
)
_LARGE = HierarchicalSpec.from_kwargs(
    embed_dim=192, depths=_DEPTHS, num_heads=(6, 12, 24, 48), mlp_ratio=2.0, drop_path_rate=0.35
)


def _dilated(nat: HierarchicalSpec, dina: Sequence[int] = _DINA_224, **overrides) -> HierarchicalSpec:
    """The DiNAT counterpart of a NAT spec: NA and DiNA layers alternate in every stage."""
    return nat.replace(dilations=alternating_dilations(nat.depths, dina), **overrides)


def _dinat_s(
    embed_dim: int,
    num_heads: Sequence[int],
    drop_path_rate: float,
    depths: Sequence[int] = _S_DEPTHS,
    dina: Sequence[int] = _DINA_224,
) -> HierarchicalSpec:
    return HierarchicalSpec.from_kwargs(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        mlp_ratio=4.0,
        drop_path_rate=drop_path_rate,
        dilations=alternating_dilations(depths, dina),
    )


_IN21K = 21841

VARIANTS: dict[str, Variant] = {
    # DiNAT (ConvTokenizer, 4 levels)
    "dinat_mini": Variant(DiNAT, _dilated(_MINI)),
    "dinat_tiny": Variant(DiNAT, _dilated(_TINY)),
    "dinat_small": Variant(DiNAT, _dilated(_SMALL)),
    "dinat_base": Variant(DiNAT, _dilated(_BASE, layer_scale=1e-5)),
    "dinat_large": Variant(DiNAT, _dilated(_LARGE)),
    "dinat_large_384": Variant(DiNAT, _dilated(_LARGE, _DINA_384), 384),
    "dinat_large_384_11x11": Variant(DiNAT, _dilated(_LARGE, kernel_size=11), 384),
    "dinat_large_21k": Variant(DiNAT, _dilated(_LARGE, drop_path_rate=0.2), num_classes=_IN21K),
    "dinat_large_21k_11x11": Variant(DiNAT, _dilated(_LARGE, kernel_size=11, drop_path_rate=0.2), num_classes=_IN21K),
    # NAT: the same models with every dilation 1 (official NAT hyper-parameters)
    "nat_mini": Variant(DiNAT, _MINI),
    "nat_tiny": Variant(DiNAT, _TINY),
    "nat_small": Variant(DiNAT, _SMALL.replace(layer_scale=1e-5)),
    "nat_base": Variant(DiNAT, _BASE.replace(layer_scale=1e-5)),
    # DiNAT_s (patchify stem, PatchMerging)
    "dinat_s_tiny": Variant(DiNAT_s, _dinat_s(96, (3, 6, 12, 24), 0.2, depths=(2, 2, 6, 2))),
    "dinat_s_small": Variant(DiNAT_s, _dinat_s(96, (3, 6, 12, 24), 0.3)),
    "dinat_s_base": Variant(DiNAT_s, _dinat_s(128, (4, 8, 16, 32), 0.5)),
    "dinat_s_large": Variant(DiNAT_s, _dinat_s(192, (6, 12, 24, 48), 0.35)),
    "dinat_s_large_384": Variant(DiNAT_s, _dinat_s(192, (6, 12, 24, 48), 0.35, dina=_DINA_384), 384),
    "dinat_s_large_21k": Variant(DiNAT_s, _dinat_s(192, (6, 12, 24, 48), 0.2), num_classes=_IN21K),
    # Isotropic (ViT-like, 1/16 map, NA / DiNA alternating)
    "nat_iso_small": Variant(NATIsotropic, IsotropicSpec(embed_dim=384, num_heads=12, dilation=1, drop_path_rate=0.1)),
    "dinat_iso_small": Variant(
        NATIsotropic, IsotropicSpec(embed_dim=384, num_heads=12, dilation=2, drop_path_rate=0.1)
    ),
    "nat_iso_base": Variant(NATIsotropic, IsotropicSpec(embed_dim=768, num_heads=24, dilation=1, drop_path_rate=0.4)),
    "dinat_iso_base": Variant(NATIsotropic, IsotropicSpec(embed_dim=768, num_heads=24, dilation=2, drop_path_rate=0.4)),
}


def list_variants() -> list[str]:
    return sorted(VARIANTS)


def build_variant(name: str, **overrides) -> nn.Module:
    """Build the classification model ``name`` (see ``list_variants()``); keyword overrides go to its constructor
    (e.g. ``num_classes=0`` for pooled features, ``drop_path_rate=0.0``)."""
    if name not in VARIANTS:
        raise KeyError(f"unknown DiNAT variant {name!r}; known: {', '.join(list_variants())}")
    return VARIANTS[name].build(**overrides)
