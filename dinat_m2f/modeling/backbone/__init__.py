"""The NAT / DiNAT family: classification models by name and the detectron2 backbones D2DiNAT / D2DiNATs.

A model is described once by a frozen spec (``HierarchicalSpec`` / ``IsotropicSpec``, layers by ``LayerSpec``); the
variants table is built from specs, and the detectron2 backbones are the classifiers' trunk plus output norms.
"""

from dinat_m2f.modeling.backbone.d2_backbone import D2DiNAT, D2DiNATs, dinat_kwargs_from_cfg
from dinat_m2f.modeling.backbone.dinat import DiNAT
from dinat_m2f.modeling.backbone.dinat_s import DiNAT_s
from dinat_m2f.modeling.backbone.isotropic import NATIsotropic
from dinat_m2f.modeling.backbone.na_attention import NeighborhoodAttention2D
from dinat_m2f.modeling.backbone.spec import HierarchicalSpec, IsotropicSpec, LayerSpec, StageSpec
from dinat_m2f.modeling.backbone.variants import VARIANTS, build_variant, list_variants

__all__ = [
    "D2DiNAT",
    "D2DiNATs",
    "DiNAT",
    "DiNAT_s",
    "HierarchicalSpec",
    "IsotropicSpec",
    "LayerSpec",
    "NATIsotropic",
    "NeighborhoodAttention2D",
    "StageSpec",
    "VARIANTS",
    "build_variant",
    "dinat_kwargs_from_cfg",
    "list_variants",
]
