"""Mask2Former's training dataset mappers, selected by ``INPUT.DATASET_MAPPER_NAME``.

| name                   | mapper                                   |
|------------------------|------------------------------------------|
| ``mask_former_semantic`` | :class:`MaskFormerSemanticDatasetMapper` |
| ``mask_former_panoptic`` | :class:`MaskFormerPanopticDatasetMapper` |
| ``mask_former_instance`` | :class:`MaskFormerInstanceDatasetMapper` |
| ``coco_instance_lsj``    | :class:`COCOInstanceNewBaselineDatasetMapper` |
| ``coco_panoptic_lsj``    | :class:`COCOPanopticNewBaselineDatasetMapper` |
| ``default``              | detectron2's ``DatasetMapper``            |

This is the one mapper registry of the project (the trainer builds its loader through ``build_train_mapper``).
"""

from __future__ import annotations

from collections.abc import Callable

from detectron2.config import CfgNode
from detectron2.data import DatasetMapper

from dinat_m2f.config import ConfigError
from dinat_m2f.data.dataset_mappers._common import CheckedDatasetMapper, CorruptSampleError
from dinat_m2f.data.dataset_mappers.coco_lsj_dataset_mappers import (
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
)
from dinat_m2f.data.dataset_mappers.mask_former_instance_dataset_mapper import MaskFormerInstanceDatasetMapper
from dinat_m2f.data.dataset_mappers.mask_former_panoptic_dataset_mapper import MaskFormerPanopticDatasetMapper
from dinat_m2f.data.dataset_mappers.mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper

# INPUT.DATASET_MAPPER_NAME -> mapper class (each is built as ``cls(cfg, is_train)``)
MAPPERS: dict[str, Callable[[CfgNode, bool], Callable[[dict], dict]]] = {
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "mask_former_instance": MaskFormerInstanceDatasetMapper,
    "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
    "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
    "default": DatasetMapper,
}


def build_train_mapper(cfg: CfgNode) -> Callable[[dict], dict]:
    """The training mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``; an unknown name is a ConfigError."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPERS:
        raise ConfigError(f"INPUT.DATASET_MAPPER_NAME: unknown mapper {name!r}; known: {', '.join(sorted(MAPPERS))}")
    return MAPPERS[name](cfg, True)


__all__ = [
    "MAPPERS",
    "CorruptSampleError",
    "COCOInstanceNewBaselineDatasetMapper",
    "CheckedDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "build_train_mapper",
]
