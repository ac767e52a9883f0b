"""Models of dinat-m2f. Importing this package registers everything with detectron2's registries:
the backbone (D2DiNAT), MaskFormer (META_ARCH), MaskFormerHead and MSDeformAttnPixelDecoder (SEM_SEG_HEADS) and
MultiScaleMaskedTransformerDecoder (TRANSFORMER_DECODER)."""

from dinat_m2f.modeling import backbone  # noqa: F401  (registers the backbone)
from dinat_m2f.modeling.criterion import SetCriterion
from dinat_m2f.modeling.matcher import HungarianMatcher
from dinat_m2f.modeling.meta_arch.mask_former_head import MaskFormerHead
from dinat_m2f.modeling.meta_arch.maskformer import MaskFormer
from dinat_m2f.modeling.pixel_decoder.msdeformattn import MSDeformAttnPixelDecoder
from dinat_m2f.modeling.transformer_decoder.mask2former_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
)

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "HungarianMatcher",
    "MSDeformAttnPixelDecoder",
    "MaskFormer",
    "MaskFormerHead",
    "MultiScaleMaskedTransformerDecoder",
    "SetCriterion",
]
