"""Semantic-segmentation test-time augmentation: multi-scale + horizontal flip, averaged (Mask2Former's "ms+flip").

Each augmented copy of an image comes from detectron2's ``DatasetMapperTTA`` (``TEST.AUG.MIN_SIZES``,
``TEST.AUG.MAX_SIZE``, ``TEST.AUG.FLIP``). The model returns ``sem_seg`` at the original ``height x width``
(its post-processing resizes back), so a copy only needs its flip undone before it joins the running sum.
Panoptic and instance outputs are discarded: this wrapper is semantic only.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.modeling import DatasetMapperTTA
from fvcore.transforms import HFlipTransform
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["SemanticSegmentorWithTTA"]


class SemanticSegmentorWithTTA(nn.Module):
    """Run ``model`` on every augmented copy of each image and average the un-flipped ``sem_seg`` scores."""

    def __init__(self, cfg, model: nn.Module, tta_mapper=None, batch_size: int = 1):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg.clone()
        self.model = model
        self.input_format = cfg.INPUT.FORMAT
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)
        self.batch_size = batch_size

    def _maybe_read_image(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret.pop("file_name"), self.input_format)
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # CHW
        if "height" not in ret or "width" not in ret:
            ret["height"], ret["width"] = ret["image"].shape[1:3]
        return ret

    def __call__(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        return [self._inference_one_image(self._maybe_read_image(x)) for x in batched_inputs]

    @torch.no_grad()
    def _inference_one_image(self, input: dict[str, Any]) -> dict[str, torch.Tensor]:
        orig_shape = (input["height"], input["width"])
        augmented_inputs = self.tta_mapper(input)
        flips = [any(isinstance(t, HFlipTransform) for t in x.pop("transforms").transforms) for x in augmented_inputs]

        total = None  # running sum, so only one score map per image is held
        for start in range(0, len(augmented_inputs), self.batch_size):
            batch = augmented_inputs[start : start + self.batch_size]
            for output, flipped in zip(self.model(batch), flips[start : start + self.batch_size]):
                sem_seg = output["sem_seg"]
                if tuple(sem_seg.shape[-2:]) != orig_shape:
                    raise ValueError(
                        f"SemanticSegmentorWithTTA: the model returned sem_seg of size {tuple(sem_seg.shape[-2:])}, "
                        f"expected the original image size {orig_shape}"
                    )
                if flipped:
                    sem_seg = sem_seg.flip(dims=[2])
                total = sem_seg.clone() if total is None else total.add_(sem_seg)
        return {"sem_seg": total / len(augmented_inputs)}
