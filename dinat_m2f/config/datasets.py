"""``DATASETS.REGISTER``: the user's own datasets, registered from the config (dinat_m2f.data.datasets.custom)."""

from __future__ import annotations

from detectron2.config import CfgNode as CN  # noqa: N817 (detectron2 convention)


def add_custom_datasets_config(cfg: CN) -> None:
    """Add ``DATASETS.REGISTER`` (idempotent).

    A list of entries ``[name, format, image_root, annotation, class_names]``:
    - ``coco_instances``: annotation = a COCO instances JSON;
    - ``coco_panoptic``: annotation = a COCO panoptic JSON, its PNGs in the folder of the same name without
      ``.json`` (COCO's layout), or ``[json, png_folder]``;
    - ``sem_seg``: annotation = a folder of label PNGs named like the images (value k = class k, 255 = ignore).
    ``class_names`` lists the classes in contiguous-id order (for the JSON formats, in the JSON's category-id order).
    """
    cfg.DATASETS.REGISTER = []
