"""Mask2Former transformer decoder and its registry."""

from dinat_m2f.modeling.transformer_decoder.mask2former_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)
from dinat_m2f.modeling.transformer_decoder.position_encoding import PositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "MultiScaleMaskedTransformerDecoder",
    "PositionEmbeddingSine",
    "build_transformer_decoder",
]
