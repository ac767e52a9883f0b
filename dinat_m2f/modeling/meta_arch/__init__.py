"""Mask2Former meta-architecture and head."""

from dinat_m2f.modeling.meta_arch.mask_former_head import MaskFormerHead
from dinat_m2f.modeling.meta_arch.maskformer import MaskFormer

__all__ = ["MaskFormer", "MaskFormerHead"]
