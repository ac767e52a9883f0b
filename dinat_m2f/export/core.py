"""The exportable core of a MaskFormer model and the post-processing that consumes its outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskFormerCore", "postprocess"]


class MaskFormerCore(nn.Module):
    """``image [B, 3, H, W]`` (float, the model's INPUT.FORMAT, 0..255) -> ``(pred_logits, pred_masks)``.

    The graph a deployment runs: normalisation, backbone, pixel decoder and transformer decoder. Resizing the
    image before, and the panoptic / instance / semantic inference after (``postprocess``), stay in Python: they
    are data-dependent loops and sorts. H and W must be multiples of the model's size divisibility (the batch
    padding of ``ImageList`` is left to the caller).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head
        self.register_buffer("pixel_mean", model.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.clone(), persistent=False)
        self.size_divisibility = model.size_divisibility

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image - self.pixel_mean[None]) / self.pixel_std[None]
        outputs = self.sem_seg_head(self.backbone(x))
        return outputs["pred_logits"], outputs["pred_masks"]


def postprocess(
    model: nn.Module, pred_logits: torch.Tensor, pred_masks: torch.Tensor, height: int, width: int
) -> list[dict]:
    """The MaskFormer model's own inference on core outputs of an unpadded batch resized from (height, width):
    per image a dict with "sem_seg" / "panoptic_seg" / "instances" as the model's config enables."""
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    image_size = pred_masks.shape[-2] * 4, pred_masks.shape[-1] * 4
    masks = F.interpolate(pred_masks, size=image_size, mode="bilinear", align_corners=False)
    results = []
    for mask_cls, mask_pred in zip(pred_logits, masks):
        out = {}
        if model.sem_seg_postprocess_before_inference:
            mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
        if model.semantic_on:
            r = model.semantic_inference(mask_cls, mask_pred)
            if not model.sem_seg_postprocess_before_inference:
                r = sem_seg_postprocess(r, image_size, height, width)
            out["sem_seg"] = r
        if model.panoptic_on:
            out["panoptic_seg"] = model.panoptic_inference(mask_cls, mask_pred)
        if model.instance_on:
            out["instances"] = model.instance_inference(mask_cls, mask_pred)
        results.append(out)
    return results
