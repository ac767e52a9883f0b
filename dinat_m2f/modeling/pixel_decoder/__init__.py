"""Mask2Former pixel decoder on multi-scale deformable attention."""

from dinat_m2f.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn
from dinat_m2f.modeling.pixel_decoder.msdeformattn import MSDeformAttnPixelDecoder, build_pixel_decoder

__all__ = ["MSDeformAttn", "MSDeformAttnPixelDecoder", "build_pixel_decoder"]
