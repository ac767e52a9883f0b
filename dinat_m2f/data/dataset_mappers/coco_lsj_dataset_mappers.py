"""COCO large-scale-jitter training mappers (``coco_instance_lsj``, ``coco_panoptic_lsj``), DETR-style:
flip -> ResizeScale(MIN_SCALE..MAX_SCALE of IMAGE_SIZE) -> FixedSizeCrop(IMAGE_SIZE, padded with 128); targets get
boxes computed from their masks, and a ``padding_mask`` (True on padded pixels) is emitted with the image."""

from __future__ import annotations

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from panopticapi.utils import rgb2id

from dinat_m2f.data.dataset_mappers._common import (
    CorruptSampleError,
    SkipCorruptMixin,
    flip_augmentations,
    image_to_tensor,
    instances_from_masks,
    read_image_checked,
    read_label_checked,
    transformed_instance_masks,
)

__all__ = ["COCOInstanceNewBaselineDatasetMapper", "COCOPanopticNewBaselineDatasetMapper", "lsj_augmentations"]


def lsj_augmentations(cfg) -> list[T.Augmentation]:
    size = cfg.INPUT.IMAGE_SIZE
    return [
        *flip_augmentations(cfg.INPUT.RANDOM_FLIP),
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE, target_height=size, target_width=size
        ),
        T.FixedSizeCrop(crop_size=(size, size)),
    ]


class _LSJMapper(SkipCorruptMixin):
    @configurable
    def __init__(
        self, is_train: bool = True, *, augmentations: list[T.Augmentation], image_format: str, skip_corrupt=False
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.skip_corrupt = skip_corrupt

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        return {
            "is_train": is_train,
            "augmentations": lsj_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "skip_corrupt": cfg.DATALOADER.get("SKIP_CORRUPT", False),
        }

    def _image(self, dataset_dict: dict) -> tuple[np.ndarray, T.Transform, tuple[int, int]]:
        """Read, augment and store the image; return it, the transforms and the original (h, w)."""
        image = read_image_checked(dataset_dict, self.image_format)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        valid = transforms.apply_segmentation(np.ones(image.shape[:2], dtype=np.uint8))  # padding fills with 0
        dataset_dict["image"] = image_to_tensor(aug_input.image)
        dataset_dict["padding_mask"] = torch.as_tensor(valid == 0)
        return aug_input.image, transforms, image.shape[:2]


class COCOInstanceNewBaselineDatasetMapper(_LSJMapper):
    """COCO instances with LSJ. Crowd annotations are dropped; polygons / RLE become bool masks; ``gt_boxes``
    are recomputed from the (cropped) masks and instances left empty by the crop are removed."""

    def map_sample(self, dataset_dict: dict) -> dict:
        image, transforms, _ = self._image(dataset_dict)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        classes, masks = transformed_instance_masks(dataset_dict, transforms, image.shape[:2])
        dataset_dict["instances"] = instances_from_masks(image.shape[:2], classes, masks, with_boxes=True)
        return dataset_dict


class COCOPanopticNewBaselineDatasetMapper(_LSJMapper):
    """COCO panoptic with LSJ: one bool mask per non-crowd segment of the (cropped) panoptic PNG, with boxes."""

    def map_sample(self, dataset_dict: dict) -> dict:
        image, transforms, source_shape = self._image(dataset_dict)
        if not self.is_train:
            for key in ("pan_seg_file_name", "segments_info"):
                dataset_dict.pop(key, None)
            return dataset_dict
        pan_path = dataset_dict.pop("pan_seg_file_name", None)
        segments_info = dataset_dict.pop("segments_info", None)
        if pan_path is None or segments_info is None:
            raise ValueError(
                f"{dataset_dict['file_name']}: a panoptic dataset dict needs 'pan_seg_file_name' and 'segments_info'"
            )
        pan_rgb = read_label_checked(pan_path, source_shape, "RGB")
        pan = rgb2id(transforms.apply_segmentation(pan_rgb))
        unknown = set(np.unique(pan).tolist()) - {s["id"] for s in segments_info} - {0}
        if unknown:
            raise CorruptSampleError(pan_path, f"segment ids {sorted(unknown)[:5]} are not in segments_info")
        segs = [s for s in segments_info if not s.get("iscrowd", 0)]
        dataset_dict["instances"] = instances_from_masks(
            image.shape[:2], [s["category_id"] for s in segs], [pan == s["id"] for s in segs], with_boxes=True
        )
        return dataset_dict
