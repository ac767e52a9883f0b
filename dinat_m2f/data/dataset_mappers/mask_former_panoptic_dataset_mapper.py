"""``MaskFormerPanopticDatasetMapper`` (``mask_former_panoptic``): training mapper of ADE20K / Cityscapes /
Mapillary panoptic: the semantic mapper's pipeline, applied to the panoptic PNG as well; one mask per segment."""

from __future__ import annotations

import numpy as np
import torch
from detectron2.data import transforms as T
from panopticapi.utils import rgb2id

from dinat_m2f.data.dataset_mappers._common import (
    CorruptSampleError,
    instances_from_masks,
    pad_to_fixed_size,
    read_image_checked,
    read_label_checked,
)
from dinat_m2f.data.dataset_mappers.mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper

__all__ = ["MaskFormerPanopticDatasetMapper"]


class MaskFormerPanopticDatasetMapper(MaskFormerSemanticDatasetMapper):
    """Read image, ``pan_seg_file_name`` (COCO-panoptic RGB ids) and, if given, ``sem_seg_file_name``; augment all,
    pad (image 128, semantic ``ignore_label``, panoptic 0 = void) and build ``instances`` with one bool mask per
    non-crowd segment of ``segments_info`` (``category_id`` already contiguous from the registration).

    Output keys: ``image``, ``instances`` and, when the dict has a semantic label, ``sem_seg``.
    """

    def map_sample(self, dataset_dict: dict) -> dict:
        image = read_image_checked(dataset_dict, self.image_format)
        sem_seg = self._read_sem_seg(dataset_dict, image.shape[:2])
        pan_path = dataset_dict.pop("pan_seg_file_name", None)
        if pan_path is None:
            raise ValueError(f"{dataset_dict['file_name']}: a panoptic dataset dict needs 'pan_seg_file_name'")
        pan_rgb = read_label_checked(pan_path, image.shape[:2], "RGB")
        segments_info = dataset_dict.pop("segments_info", None)
        if segments_info is None:
            raise ValueError(f"{dataset_dict['file_name']}: a panoptic dataset dict needs 'segments_info'")
        if "annotations" in dataset_dict:
            raise ValueError("A panoptic segmentation dataset dict must not have 'annotations'")

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        pan = rgb2id(transforms.apply_segmentation(pan_rgb))  # nearest-neighbour keeps the RGB ids intact
        image_t, _ = self._finish_semantic(dataset_dict, aug_input.image, aug_input.sem_seg)
        pan_t = torch.as_tensor(pan.astype("long"))
        if self.size_divisibility > 0:
            pan_t = pad_to_fixed_size(pan_t, self.size_divisibility, 0)
        pan = pan_t.numpy()

        ids = {s["id"] for s in segments_info}
        unknown = set(np.unique(pan).tolist()) - ids - {0}
        if unknown:
            raise CorruptSampleError(pan_path, f"segment ids {sorted(unknown)[:5]} are not in segments_info")
        segs = [s for s in segments_info if not s.get("iscrowd", 0)]
        dataset_dict["instances"] = instances_from_masks(
            tuple(image_t.shape[-2:]), [s["category_id"] for s in segs], [pan == s["id"] for s in segs], False
        )
        return dataset_dict
