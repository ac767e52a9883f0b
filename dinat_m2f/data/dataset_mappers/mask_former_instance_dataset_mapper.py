"""``MaskFormerInstanceDatasetMapper`` (``mask_former_instance``): training mapper of ADE20K / Cityscapes instance
segmentation: resize, plain random crop, SSD colour jitter, flip; one bool mask per non-crowd annotation."""

from __future__ import annotations

from detectron2.data import transforms as T

from dinat_m2f.data.dataset_mappers._common import (
    PaddedTrainingMapper,
    image_to_tensor,
    instances_from_masks,
    pad_to_fixed_size,
    read_image_checked,
    transformed_instance_masks,
)
from dinat_m2f.data.dataset_mappers.mask_former_semantic_dataset_mapper import semantic_augmentations

__all__ = ["MaskFormerInstanceDatasetMapper"]


class MaskFormerInstanceDatasetMapper(PaddedTrainingMapper):
    """Read image + ``annotations`` (polygons, RLE or masks; crowds dropped), augment, pad to ``size_divisibility``
    (image 128, masks 0). Output keys: ``image``, ``instances`` (``gt_classes``, ``gt_masks``)."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        args = super().from_config(cfg, is_train)
        args["augmentations"] = semantic_augmentations(cfg, crop_with_category_constraint=False)
        return args

    def map_sample(self, dataset_dict: dict) -> dict:
        image = read_image_checked(dataset_dict, self.image_format)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        classes, masks = transformed_instance_masks(dataset_dict, transforms, image.shape[:2])
        image_t = image_to_tensor(image)
        instances = instances_from_masks(image.shape[:2], classes, masks, with_boxes=False)
        if self.size_divisibility > 0:
            image_t = pad_to_fixed_size(image_t, self.size_divisibility, 128)
            gt = pad_to_fixed_size(instances.gt_masks, self.size_divisibility, 0)
            padded = type(instances)(tuple(image_t.shape[-2:]))
            padded.gt_classes = instances.gt_classes
            padded.gt_masks = gt
            instances = padded
        dataset_dict["image"] = image_t
        dataset_dict["instances"] = instances
        return dataset_dict
