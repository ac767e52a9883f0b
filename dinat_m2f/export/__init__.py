"""Deployment: the model as a graph, from the normalised image to what post-processing consumes.

- ``MaskFormerCore``: the model without its Python pre/post-processing: ``image [B, 3, H, W]`` (the model's input
  format, H and W multiples of the size divisibility) -> ``pred_logits [B, Q, K+1]``, ``pred_masks [B, Q, H/4, W/4]``.
- ``lowered_ops(model)``: swaps the native ops for standard-op formulations (gather NA, grid_sample deformable
  attention) for exporters without our custom ops (ONNX).
- ``dinat_m2f.export.onnx`` / ``dinat_m2f.export.pt2``: the ONNX and torch.export / AOTInductor paths.
"""

from dinat_m2f.export.core import MaskFormerCore, postprocess
from dinat_m2f.export.lowering import lowered_ops
from dinat_m2f.export.shapes import dynamic_image_shapes, min_unpadded_size

__all__ = ["MaskFormerCore", "dynamic_image_shapes", "lowered_ops", "min_unpadded_size", "postprocess"]
