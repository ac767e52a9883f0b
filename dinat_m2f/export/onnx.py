"""ONNX export: the model with NA and deformable attention lowered to standard ops, checked with onnxruntime."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dinat_m2f.export.core import MaskFormerCore
from dinat_m2f.export.lowering import lowered_ops
from dinat_m2f.export.shapes import dynamic_image_shapes

__all__ = ["OPSET", "export_onnx", "run_onnx"]

OPSET = 18  # GridSample (16+) and the opset torch.onnx's exporter targets


def export_onnx(model: nn.Module, path: str, example: torch.Tensor, min_size: int, max_size: int) -> str:
    """Write ``MaskFormerCore(model)`` to ``path`` (ONNX, dynamic H and W in [min_size, max_size])."""
    model.eval()
    core = MaskFormerCore(model).eval()
    with lowered_ops(model), torch.no_grad():
        torch.onnx.export(
            core,
            (example,),
            path,
            dynamo=True,
            dynamic_shapes=dynamic_image_shapes(model, min_size, max_size),
            input_names=["image"],
            output_names=["pred_logits", "pred_masks"],
            opset_version=OPSET,
            external_data=False,
        )
    return path


def run_onnx(path: str, image: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(pred_logits, pred_masks) of an exported model on ``image`` [B, 3, H, W] float32, with onnxruntime."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("onnxruntime is not installed: pip install -r requirements/pins.txt") from e
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits, masks = session.run(["pred_logits", "pred_masks"], {"image": image.astype(np.float32)})
    return logits, masks
