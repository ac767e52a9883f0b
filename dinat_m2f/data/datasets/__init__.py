"""Dataset registrations, run on import under ``$DETECTRON2_DATASETS`` (default ``datasets``).

Every ``register_all_*`` takes a ``root`` argument and may be called again to re-point the names elsewhere
(it replaces the earlier registration of the same names).
"""

from __future__ import annotations

from dinat_m2f.data.datasets._common import dataset_root
from dinat_m2f.data.datasets.ade20k import register_all_ade20k, register_all_ade20k_full
from dinat_m2f.data.datasets.cityscapes import register_all_cityscapes
from dinat_m2f.data.datasets.coco import (
    register_all_coco_instances,
    register_all_coco_panoptic,
    register_all_coco_stuff_10k,
)
from dinat_m2f.data.datasets.mapillary_vistas import register_all_mapillary_vistas

_current_root: str | None = None


def current_root() -> str | None:
    """The root of the last :func:`register_all`."""
    return _current_root


def register_all(root: str | None = None) -> None:
    """(Re-)register every dataset of this project under ``root`` (default: ``$DETECTRON2_DATASETS``)."""
    global _current_root
    _current_root = dataset_root(root)
    register_all_coco_instances(root)
    register_all_coco_panoptic(root)
    register_all_coco_stuff_10k(root)
    register_all_ade20k(root)
    register_all_ade20k_full(root)
    register_all_cityscapes(root)
    register_all_mapillary_vistas(root)


register_all()

__all__ = [
    "current_root",
    "dataset_root",
    "register_all",
    "register_all_ade20k",
    "register_all_ade20k_full",
    "register_all_cityscapes",
    "register_all_coco_instances",
    "register_all_coco_panoptic",
    "register_all_coco_stuff_10k",
    "register_all_mapillary_vistas",
]
