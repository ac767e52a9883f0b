"""Mask2Former's training dataset mappers, selected by ``INPUT.DATASET_MAPPER_NAME``.

| name                   | mapper                                   |
|------------------------|------------------------------------------|
| ``mask_former_semantic`` | :class:`MaskFormerSemanticDatasetMapper` |
| ``mask_former_panoptic`` | :class:`MaskFormerPanopticDatasetMapper` |
| ``mask_former_instance`` | :class:`MaskFormerInstanceDatasetMapper` |
| ``coco_instance_lsj``    | :class:`COCOInstanceNewBaselineDatasetMapper` |
| ``coco_panoptic_lsj``    | :class:`COCOPanopticNewBaselineDatasetMapper` |
"""

from dinat_m2f.data.dataset_mappers._common import CorruptSampleError
from dinat_m2f.data.dataset_mappers.coco_lsj_dataset_mappers import (
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
)
from dinat_m2f.data.dataset_mappers.mask_former_instance_dataset_mapper import MaskFormerInstanceDatasetMapper
from dinat_m2f.data.dataset_mappers.mask_former_panoptic_dataset_mapper import MaskFormerPanopticDatasetMapper
from dinat_m2f.data.dataset_mappers.mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper

MAPPERS = {
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "mask_former_instance": MaskFormerInstanceDatasetMapper,
    "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
    "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
}


def build_train_mapper(cfg):
    """The mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``, or None (detectron2's default DatasetMapper)."""
    cls = MAPPERS.get(cfg.INPUT.DATASET_MAPPER_NAME)
    return cls(cfg, True) if cls is not None else None


__all__ = [
    "MAPPERS",
    "CorruptSampleError",
    "COCOInstanceNewBaselineDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "build_train_mapper",
]
