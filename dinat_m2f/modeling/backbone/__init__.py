"""The NAT / DiNAT family: classification models by name and the detectron2 backbones D2DiNAT / D2DiNATs."""

from dinat_m2f.modeling.backbone.d2_backbone import D2DiNAT, D2DiNATs, dinat_kwargs_from_cfg
from dinat_m2f.modeling.backbone.dinat import DiNAT
from dinat_m2f.modeling.backbone.dinat_s import DiNAT_s
from dinat_m2f.modeling.backbone.isotropic import NATIsotropic
from dinat_m2f.modeling.backbone.na_attention import NeighborhoodAttention2D
from dinat_m2f.modeling.backbone.variants import VARIANTS, build_variant, list_variants

__all__ = [
    "D2DiNAT",
    "D2DiNATs",
    "DiNAT",
    "DiNAT_s",
    "NATIsotropic",
    "NeighborhoodAttention2D",
    "VARIANTS",
    "build_variant",
    "dinat_kwargs_from_cfg",
    "list_variants",
]
