"""Pieces shared by the Mask2Former training mappers: checked file reading, skipping of corrupt samples,
augmentation lists from the config, fixed-size padding and targets from masks."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances, polygons_to_bitmask

__all__ = [
    "CheckedDatasetMapper",
    "CorruptSampleError",
    "NoReadableSampleError",
    "SkipCorruptMixin",
    "PaddedTrainingMapper",
    "read_image_checked",
    "read_label_checked",
    "flip_augmentations",
    "pad_to_fixed_size",
    "image_to_tensor",
    "instances_from_masks",
    "masks_from_annotations",
    "transformed_instance_masks",
]

logger = logging.getLogger(__name__)


class CorruptSampleError(OSError):
    """A sample's image or annotation is missing, unreadable or inconsistent; the message names the file."""

    def __init__(self, path: str, reason: str | BaseException):
        self.path = path
        super().__init__(f"{path}: {reason}")


class NoReadableSampleError(RuntimeError):
    """With DATALOADER.SKIP_CORRUPT, every sample of the training set failed to load."""


class SkipCorruptMixin:
    """``__call__`` runs ``self.map_sample`` on a copy of the dict. With ``skip_corrupt``, a
    :class:`CorruptSampleError` is logged and counted, and ``None`` is returned: detectron2's MapDataset then
    draws another sample. Without it the error propagates (naming the file).

    MapDataset draws the replacement among the samples that have not failed since they last loaded, and raises a
    bare ``IndexError`` once there is none. Given ``dataset_size`` (the trainer sets it), the mapper keeps the same
    account and raises :class:`NoReadableSampleError` instead, saying that no sample could be read.
    """

    skip_corrupt: bool = False
    num_skipped: int = 0  # per mapper object (and per data-loader worker process)
    dataset_size: int | None = None

    def map_sample(self, dataset_dict: dict) -> dict:
        raise NotImplementedError

    def __call__(self, dataset_dict: dict) -> dict | None:
        key = (dataset_dict.get("file_name"), dataset_dict.get("image_id"))
        try:
            mapped = self.map_sample(copy.deepcopy(dataset_dict))
        except CorruptSampleError as e:
            if not self.skip_corrupt:
                raise
            self.num_skipped += 1
            self._note_unreadable(key, e)
            logger.warning(f"Skipping corrupt sample ({self.num_skipped} skipped so far by this worker): {e}")
            return None
        if self.skip_corrupt:
            self._unreadable_samples().pop(key, None)
        return mapped

    def _unreadable_samples(self) -> dict[tuple, str]:
        """(file name, image id) -> error, of the samples that failed since they last loaded (per worker)."""
        return self.__dict__.setdefault("_unreadable", {})

    def _note_unreadable(self, key: tuple, error: CorruptSampleError) -> None:
        unreadable = self._unreadable_samples()
        unreadable[key] = str(error)
        if self.dataset_size is not None and len(unreadable) >= self.dataset_size:
            examples = "; ".join(list(unreadable.values())[:3])
            raise NoReadableSampleError(
                f"DATALOADER.SKIP_CORRUPT: none of the {self.dataset_size} training samples could be read "
                f"(e.g. {examples}); check the dataset files and DETECTRON2_DATASETS"
            )


class PaddedTrainingMapper(SkipCorruptMixin):
    """Base of the Mask2Former training mappers that pad to a fixed ``size_divisibility`` square: holds the
    arguments they share, and ``from_config`` fills them (subclasses add ``augmentations`` and their own)."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list[T.Augmentation],
        image_format: str,
        size_divisibility: int,
        skip_corrupt: bool = False,
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility
        self.skip_corrupt = skip_corrupt

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        if not is_train:
            raise ValueError(f"{cls.__name__} is a training mapper; evaluation uses detectron2's DatasetMapper")
        return {
            "is_train": is_train,
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "skip_corrupt": cfg.DATALOADER.get("SKIP_CORRUPT", False),
        }


def read_image_checked(dataset_dict: dict, image_format: str) -> np.ndarray:
    """Read ``dataset_dict["file_name"]``; a missing/corrupt file or a size that contradicts the dict's
    ``height``/``width`` raises :class:`CorruptSampleError` naming the file."""
    path = dataset_dict["file_name"]
    try:
        image = utils.read_image(path, format=image_format)
    except Exception as e:  # PIL raises several types (FileNotFoundError, UnidentifiedImageError, OSError, ...)
        raise CorruptSampleError(path, e) from e
    try:
        utils.check_image_size(dataset_dict, image)
    except utils.SizeMismatchError as e:
        raise CorruptSampleError(path, e) from e
    return image


class CheckedDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper (the evaluation loader's) whose unreadable image is an error naming the file:
    detectron2 lets PIL's error through, which names no file."""

    def __call__(self, dataset_dict: dict) -> dict:
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, utils.SizeMismatchError) as e:  # PIL: UnidentifiedImageError, truncated, ...
            if isinstance(e, CorruptSampleError):
                raise
            raise CorruptSampleError(dataset_dict["file_name"], e) from e


def read_label_checked(path: str, image_shape: tuple[int, int], fmt: str | None = None) -> np.ndarray:
    """Read a label image (semantic / panoptic PNG, TIFF); it must exist, decode, and match ``image_shape``."""
    try:
        label = utils.read_image(path, format=fmt)
    except Exception as e:
        raise CorruptSampleError(path, e) from e
    if label.shape[:2] != tuple(image_shape):
        raise CorruptSampleError(path, f"label size {label.shape[:2]} differs from its image's {tuple(image_shape)}")
    return label


def flip_augmentations(random_flip: str) -> list[T.Augmentation]:
    """detectron2's INPUT.RANDOM_FLIP: "horizontal" (Mask2Former's RandomFlip()), "vertical" or "none"."""
    if random_flip == "none":
        return []
    if random_flip not in ("horizontal", "vertical"):
        raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {random_flip!r}")
    return [T.RandomFlip(horizontal=random_flip == "horizontal", vertical=random_flip == "vertical")]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def pad_to_fixed_size(tensor: torch.Tensor, size: int, value: float) -> torch.Tensor:
    """Pad the last two dims at the bottom/right to exactly ``size`` x ``size`` (Mask2Former's fixed padding: the
    crop size equals INPUT.SIZE_DIVISIBILITY). A larger input is a config error, not something to crop silently."""
    h, w = tensor.shape[-2:]
    if h > size or w > size:
        raise ValueError(
            f"Input of size {(h, w)} exceeds INPUT.SIZE_DIVISIBILITY={size}: the mappers pad to exactly that size, "
            "so INPUT.CROP.SIZE must not exceed it"
        )
    return F.pad(tensor, [0, size - w, 0, size - h], value=value).contiguous()


def instances_from_masks(
    image_shape: tuple[int, int], classes: list[int], masks: list[np.ndarray] | list[torch.Tensor], with_boxes: bool
) -> Instances:
    """``Instances`` with ``gt_classes`` (int64) and ``gt_masks`` (bool [N, H, W]); masks emptied by the crop are
    dropped. ``with_boxes`` adds ``gt_boxes`` computed from the masks (the DETR-style LSJ mappers)."""
    h, w = image_shape
    keep = [i for i, m in enumerate(masks) if bool(m.any())]
    instances = Instances(image_shape)
    instances.gt_classes = torch.tensor([classes[i] for i in keep], dtype=torch.int64)
    if keep:
        gt = torch.stack([torch.as_tensor(np.ascontiguousarray(masks[i])).bool() for i in keep])
    else:
        gt = torch.zeros((0, h, w), dtype=torch.bool)
    instances.gt_masks = gt
    if with_boxes:
        instances.gt_boxes = BitMasks(gt).get_bounding_boxes()
    return instances


def masks_from_annotations(annos: list[dict], image_shape: tuple[int, int], file_name: str) -> list[np.ndarray]:
    """Bool masks of transformed instance annotations: polygons, RLE (compressed or not) or an HxW array."""
    h, w = image_shape
    masks = []
    for obj in annos:
        segm = obj.get("segmentation")
        if isinstance(segm, list):
            # [] once a crop has removed every polygon: an empty mask, dropped later with the other empty ones
            m = polygons_to_bitmask(segm, h, w) if segm else np.zeros((h, w), dtype=bool)
        elif isinstance(segm, dict):
            if isinstance(segm.get("counts"), list):
                segm = mask_util.frPyObjects(segm, *segm["size"])
            m = mask_util.decode(segm)
        elif isinstance(segm, np.ndarray):
            m = segm
        else:
            raise CorruptSampleError(file_name, f"annotation {obj.get('id')} has no usable 'segmentation'")
        if m.shape[:2] != (h, w):
            raise CorruptSampleError(file_name, f"annotation mask of size {m.shape[:2]} for an image of {(h, w)}")
        masks.append(m.astype(bool))
    return masks


def transformed_instance_masks(
    dataset_dict: dict, transforms: T.Transform, image_shape: tuple[int, int]
) -> tuple[list[int], list[np.ndarray]]:
    """Pop ``annotations``, drop crowds, apply ``transforms`` and return (category ids, bool masks)."""
    if "annotations" not in dataset_dict:
        raise ValueError(f"{dataset_dict['file_name']}: an instance dataset dict needs 'annotations'")
    annos = [
        utils.transform_instance_annotations(obj, transforms, image_shape)
        for obj in dataset_dict.pop("annotations")
        if obj.get("iscrowd", 0) == 0
    ]
    masks = masks_from_annotations(annos, image_shape, dataset_dict["file_name"])
    return [a["category_id"] for a in annos], masks
