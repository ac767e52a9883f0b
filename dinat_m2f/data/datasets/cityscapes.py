"""Cityscapes registrations: detectron2's fine semantic / instance / panoptic datasets, re-pointable at a root.

Layout::

    cityscapes/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png
    cityscapes/gtFine/{train,val,test}/<city>/*_gtFine_{polygons.json,labelIds.png,instanceIds.png}
    cityscapes/gtFine/.../*_gtFine_labelTrainIds.png            <- datasets/prepare_cityscapes.py (semantic)
    cityscapes/gtFine/cityscapes_panoptic_{train,val}{.json,/}  <- datasets/prepare_cityscapes.py (panoptic)
"""

from __future__ import annotations

import os

from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from detectron2.data.datasets.cityscapes import load_cityscapes_instances, load_cityscapes_semantic

from dinat_m2f.data.datasets._common import dataset_root, load_json, panoptic_metadata, register_dataset, require_path
from dinat_m2f.utils.d2_compat import builtin_metadata

__all__ = ["cityscapes_panoptic_metadata", "load_cityscapes_panoptic", "register_all_cityscapes"]

_PREPARE = "Run datasets/prepare_cityscapes.py."
_IMAGE_SUFFIX = "_leftImg8bit.png"


def cityscapes_panoptic_metadata() -> dict:
    """19 train ids; things (8) and stuff (11) keep their train id as contiguous id."""
    meta = panoptic_metadata(CITYSCAPES_CATEGORIES)
    # Unlike the generic maps: the contiguous id is the train id, and (as detectron2's) the stuff map holds stuff only.
    meta["thing_dataset_id_to_contiguous_id"] = {c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if c["isthing"]}
    meta["stuff_dataset_id_to_contiguous_id"] = {
        c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if not c["isthing"]
    }
    return meta


def load_cityscapes_panoptic(image_dir: str, gt_dir: str, gt_json: str, meta: dict) -> list[dict]:
    """Cityscapes panoptic dicts (as detectron2's loader), with semantic labels from ``*_labelTrainIds.png``.

    Unlike detectron2's loader, the label path is built from the file name only (detectron2 cuts the whole path
    at its first ".", which breaks roots such as ``./datasets``), and a missing image is named.
    """
    require_path(image_dir)
    require_path(gt_json, _PREPARE)
    require_path(gt_dir, _PREPARE)
    info = load_json(gt_json)
    images = {}
    for city in sorted(os.listdir(image_dir)):
        for name in os.listdir(os.path.join(image_dir, city)):
            if name.endswith(_IMAGE_SUFFIX):
                images[name[: -len(_IMAGE_SUFFIX)]] = os.path.join(image_dir, city, name)
    ret = []
    for ann in info["annotations"]:
        image_file = images.get(ann["image_id"])
        if image_file is None:
            raise FileNotFoundError(f"{gt_json}: no image {ann['image_id']}{_IMAGE_SUFFIX} under {image_dir}")
        city = os.path.basename(os.path.dirname(image_file))
        sem_file = os.path.join(
            os.path.dirname(gt_dir),
            os.path.basename(image_dir.rstrip("/")),
            city,
            f"{ann['image_id']}_gtFine_labelTrainIds.png",
        )
        segments = []
        for seg in ann["segments_info"]:
            seg = dict(seg)
            cat = seg["category_id"]
            seg["isthing"] = cat in meta["thing_dataset_id_to_contiguous_id"]
            seg["category_id"] = (
                meta["thing_dataset_id_to_contiguous_id"]
                if seg["isthing"]
                else meta["stuff_dataset_id_to_contiguous_id"]
            )[cat]
            segments.append(seg)
        ret.append(
            {
                "file_name": image_file,
                "image_id": ann["image_id"],
                "sem_seg_file_name": sem_file,
                "pan_seg_file_name": os.path.join(gt_dir, ann["file_name"]),
                "segments_info": segments,
            }
        )
    if not ret:
        raise FileNotFoundError(f"{gt_json} lists no annotations")
    require_path(ret[0]["sem_seg_file_name"], _PREPARE)
    require_path(ret[0]["pan_seg_file_name"], _PREPARE)
    return ret


def _checked(loader, *dirs):
    for d in dirs:
        require_path(d)
    return loader(*dirs)


def register_all_cityscapes(root: str | None = None) -> None:
    """Register ``cityscapes_fine_{instance_seg,sem_seg}_{train,val,test}`` and ``cityscapes_fine_panoptic_*``."""
    root = dataset_root(root)
    meta = builtin_metadata("cityscapes")
    for split in ("train", "val", "test"):
        image_dir = os.path.join(root, "cityscapes", "leftImg8bit", split)
        gt_dir = os.path.join(root, "cityscapes", "gtFine", split)
        register_dataset(
            f"cityscapes_fine_instance_seg_{split}",
            lambda x=image_dir, y=gt_dir: _checked(
                lambda a, b: load_cityscapes_instances(a, b, from_json=True, to_polygons=True), x, y
            ),
            image_dir=image_dir,
            gt_dir=gt_dir,
            evaluator_type="cityscapes_instance",
            **meta,
        )
        register_dataset(
            f"cityscapes_fine_sem_seg_{split}",
            lambda x=image_dir, y=gt_dir: _checked(load_cityscapes_semantic, x, y),
            image_dir=image_dir,
            gt_dir=gt_dir,
            evaluator_type="cityscapes_sem_seg",
            ignore_label=255,
            **meta,
        )
    pan_meta = cityscapes_panoptic_metadata()
    for split in ("train", "val"):
        image_dir = os.path.join(root, "cityscapes", "leftImg8bit", split)
        gt_dir = os.path.join(root, "cityscapes", "gtFine", f"cityscapes_panoptic_{split}")
        gt_json = os.path.join(root, "cityscapes", "gtFine", f"cityscapes_panoptic_{split}.json")
        register_dataset(
            f"cityscapes_fine_panoptic_{split}",
            lambda x=image_dir, y=gt_dir, z=gt_json: load_cityscapes_panoptic(x, y, z, pan_meta),
            panoptic_root=gt_dir,
            image_root=image_dir,
            panoptic_json=gt_json,
            gt_dir=os.path.join(root, "cityscapes", "gtFine", split),
            evaluator_type="cityscapes_panoptic_seg",
            ignore_label=255,
            label_divisor=1000,
            **pan_meta,
        )
