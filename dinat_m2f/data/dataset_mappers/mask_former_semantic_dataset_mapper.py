"""``MaskFormerSemanticDatasetMapper`` (``INPUT.DATASET_MAPPER_NAME: mask_former_semantic``): training mapper of
the semantic datasets (ADE20K, Cityscapes, COCO-Stuff, Mapillary): one target mask per class present."""

from __future__ import annotations

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform

from dinat_m2f.data.dataset_mappers._common import (
    CorruptSampleError,
    PaddedTrainingMapper,
    flip_augmentations,
    image_to_tensor,
    instances_from_masks,
    pad_to_fixed_size,
    read_image_checked,
    read_label_checked,
)

__all__ = ["MaskFormerSemanticDatasetMapper", "semantic_augmentations"]


def semantic_augmentations(
    cfg, crop_with_category_constraint: bool = True, ignore_label: int | None = None
) -> list[T.Augmentation]:
    """ResizeShortestEdge -> crop (category-area-constrained, or plain) -> SSD colour jitter -> flip.

    The category-area constraint does not count ``ignore_label`` (default MODEL.SEM_SEG_HEAD.IGNORE_VALUE)."""
    augs: list[T.Augmentation] = [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    ]
    if cfg.INPUT.CROP.ENABLED:
        if crop_with_category_constraint:
            augs.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE,
                    cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE if ignore_label is None else ignore_label,
                )
            )
        else:
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    augs += flip_augmentations(cfg.INPUT.RANDOM_FLIP)
    return augs


class MaskFormerSemanticDatasetMapper(PaddedTrainingMapper):
    """Read image + ``sem_seg_file_name``, augment both, pad to ``size_divisibility`` (image 128, label
    ``ignore_label``), and build ``instances``: one bool mask per class in the label (``ignore_label`` excluded).

    Output keys: ``image`` (uint8 CHW), ``sem_seg`` (int64 HW), ``instances`` (``gt_classes``, ``gt_masks``).
    """

    @configurable
    def __init__(self, is_train: bool = True, *, ignore_label: int, **kwargs):
        # kwargs: PaddedTrainingMapper's (augmentations, image_format, size_divisibility, skip_corrupt).
        super().__init__(is_train, **kwargs)
        self.ignore_label = ignore_label

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        args = super().from_config(cfg, is_train)
        if not cfg.DATASETS.TRAIN:
            raise ValueError("DATASETS.TRAIN is empty: the mapper reads ignore_label from its metadata")
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        args["ignore_label"] = meta.get("ignore_label", cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        args["augmentations"] = semantic_augmentations(cfg, ignore_label=args["ignore_label"])
        return args

    def _read_sem_seg(self, dataset_dict: dict, image_shape: tuple[int, int]) -> np.ndarray | None:
        path = dataset_dict.pop("sem_seg_file_name", None)
        if path is None:
            return None
        label = read_label_checked(path, image_shape)
        if label.ndim != 2:
            raise CorruptSampleError(path, f"a semantic label must have one channel, got shape {label.shape}")
        return label.astype("double")  # double keeps uint16 labels (ADE-full's 0..846, 65535) exact

    def _finish_semantic(self, dataset_dict: dict, image: np.ndarray, sem_seg: np.ndarray | None) -> tuple:
        image_t = image_to_tensor(image)
        sem_t = torch.as_tensor(sem_seg.astype("long")) if sem_seg is not None else None
        if self.size_divisibility > 0:
            image_t = pad_to_fixed_size(image_t, self.size_divisibility, 128)
            if sem_t is not None:
                sem_t = pad_to_fixed_size(sem_t, self.size_divisibility, self.ignore_label)
        dataset_dict["image"] = image_t
        if sem_t is not None:
            dataset_dict["sem_seg"] = sem_t.long()
        return image_t, sem_t

    def map_sample(self, dataset_dict: dict) -> dict:
        image = read_image_checked(dataset_dict, self.image_format)
        sem_seg = self._read_sem_seg(dataset_dict, image.shape[:2])
        if sem_seg is None:
            raise ValueError(f"{dataset_dict['file_name']}: a semantic dataset dict needs 'sem_seg_file_name'")
        if "annotations" in dataset_dict:
            raise ValueError("A semantic segmentation dataset dict must not have 'annotations'")
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        image_t, sem_t = self._finish_semantic(dataset_dict, aug_input.image, aug_input.sem_seg)

        sem = sem_t.numpy()
        classes = [int(c) for c in np.unique(sem) if c != self.ignore_label]
        dataset_dict["instances"] = instances_from_masks(
            tuple(image_t.shape[-2:]), classes, [sem == c for c in classes], with_boxes=False
        )
        return dataset_dict
