"""COCO registrations: panoptic (with semantic maps from panoptic), instances, and COCO-Stuff-10k.

Layout::

    coco/{train,val}2017/*.jpg
    coco/annotations/{instances,panoptic}_{train,val}2017.json
    coco/panoptic_{train,val}2017/*.png
    coco/panoptic_semseg_{train,val}2017/*.png        <- prepare_coco_semantic_annos_from_panoptic_annos.py
    coco/coco_stuff_10k/{images,annotations}_detectron2/{train,test}/
"""

from __future__ import annotations

import os

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from dinat_m2f.data.datasets._common import (
    color_palette,
    dataset_root,
    panoptic_metadata,
    register_dataset,
)
from dinat_m2f.data.datasets.loaders import load_coco_json_checked, load_panoptic_json, load_sem_seg_strict
from dinat_m2f.utils.d2_compat import builtin_metadata

__all__ = [
    "COCO_STUFF_171_CATEGORIES",
    "coco_panoptic_metadata",
    "register_all_coco_panoptic",
    "register_all_coco_instances",
    "register_all_coco_stuff_10k",
]

# The 91 stuff classes of COCO-Stuff (ids 92..182), in id order.
_COCO_STUFF_NAMES = (  # noqa: SIM905  (a compact table)
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other ceiling-tile "
    "cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence floor-marble floor-other "
    "floor-stone floor-tile floor-wood flower fog food-other fruit furniture-other grass gravel ground-other hill "
    "house leaves light mat metal mirror-stuff moss mountain mud napkin net paper pavement pillow plant-other "
    "plastic platform playingfield railing railroad river road rock roof rug salad sand sea shelf sky-other "
    "skyscraper snow solid-other stairs stone straw structural-other table tent textile-other towel tree vegetable "
    "wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops "
    "window-blind window-other wood"
).split()
assert len(_COCO_STUFF_NAMES) == 91

# COCO-Stuff's 171 classes: the 80 COCO things (their instance ids and detectron2's colours) + the 91 stuff classes
# (ids 92..182). The reference COCO-Stuff-10k registration gives the stuff classes no colours, so they get a
# deterministic generated palette.
COCO_STUFF_171_CATEGORIES: list[dict] = [
    {"id": c["id"], "name": c["name"], "isthing": 1, "color": c["color"]} for c in COCO_CATEGORIES if c["isthing"]
] + [
    {"id": 92 + i, "name": name, "isthing": 0, "color": color}
    for i, (name, color) in enumerate(zip(_COCO_STUFF_NAMES, color_palette(91)))
]

_PANOPTIC_SPLITS = {
    "train": ("coco/train2017", "coco/panoptic_train2017", "coco/annotations/panoptic_train2017.json"),
    "val": ("coco/val2017", "coco/panoptic_val2017", "coco/annotations/panoptic_val2017.json"),
}


def coco_panoptic_metadata() -> dict:
    """COCO panoptic's 133 classes mapped to 0..132 in COCO_CATEGORIES order.

    ``stuff_dataset_id_to_contiguous_id`` holds ALL 133 (so SemSegEvaluator scores things too, on the semantic
    maps of prepare_coco_semantic_annos_from_panoptic_annos.py); ``thing_*`` lists repeat the full class list as
    detectron2's Visualizer indexes them by the same contiguous id.
    """
    return panoptic_metadata(COCO_CATEGORIES)


def register_all_coco_instances(root: str | None = None) -> None:
    """(Re-)register detectron2's ``coco_2017_{train,val}`` instance datasets under ``root``."""
    root = dataset_root(root)
    meta = builtin_metadata("coco")
    for split in ("train", "val"):
        name = f"coco_2017_{split}"
        json_file = os.path.join(root, f"coco/annotations/instances_{split}2017.json")
        image_root = os.path.join(root, f"coco/{split}2017")
        register_dataset(
            name,
            lambda j=json_file, x=image_root, n=name: load_coco_json_checked(j, x, n),
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            **meta,
        )


def register_all_coco_panoptic(root: str | None = None) -> None:
    """Register ``coco_2017_{train,val}_panoptic`` and ``coco_2017_{train,val}_panoptic_with_sem_seg``.

    The plain ``_panoptic`` names are detectron2's builtins (its "standard" metadata, whose stuff map holds only
    the 53 stuff classes) re-pointed at ``root``; both give the same contiguous ids 0..132.
    """
    root = dataset_root(root)
    meta = coco_panoptic_metadata()
    std_meta = builtin_metadata("coco_panoptic_standard")
    for split, (image_dir, pan_dir, pan_json) in _PANOPTIC_SPLITS.items():
        image_dir, pan_dir, pan_json = (os.path.join(root, p) for p in (image_dir, pan_dir, pan_json))
        sem_dir = os.path.join(root, f"coco/panoptic_semseg_{split}2017")
        ins_json = os.path.join(root, f"coco/annotations/instances_{split}2017.json")
        common = {
            "panoptic_root": pan_dir,
            "image_root": image_dir,
            "panoptic_json": pan_json,
            "json_file": ins_json,
            "evaluator_type": "coco_panoptic_seg",
            "ignore_label": 255,
            "label_divisor": 1000,
        }
        register_dataset(
            f"coco_2017_{split}_panoptic",
            lambda j=pan_json, x=image_dir, p=pan_dir: load_panoptic_json(j, x, p, std_meta),
            **common,
            **std_meta,
        )
        register_dataset(
            f"coco_2017_{split}_panoptic_with_sem_seg",
            lambda j=pan_json, x=image_dir, p=pan_dir, s=sem_dir: load_panoptic_json(
                j,
                x,
                p,
                meta,
                sem_seg_dir=s,
                sem_seg_hint="Run datasets/prepare_coco_semantic_annos_from_panoptic_annos.py.",
            ),
            sem_seg_root=sem_dir,
            **common,
            **meta,
        )


def register_all_coco_stuff_10k(root: str | None = None) -> None:
    """Register ``coco_2017_{train,test}_stuff_10k_sem_seg`` (171 classes, labels 0..170, ignore 255)."""
    base = os.path.join(dataset_root(root), "coco", "coco_stuff_10k")
    names = [c["name"] for c in COCO_STUFF_171_CATEGORIES]
    colors = [c["color"] for c in COCO_STUFF_171_CATEGORIES]
    for split in ("train", "test"):
        image_dir = os.path.join(base, "images_detectron2", split)
        sem_dir = os.path.join(base, "annotations_detectron2", split)
        register_dataset(
            f"coco_2017_{split}_stuff_10k_sem_seg",
            lambda x=image_dir, y=sem_dir: load_sem_seg_strict(y, x, gt_ext="png", image_ext="jpg"),
            image_root=image_dir,
            sem_seg_root=sem_dir,
            stuff_classes=names,
            stuff_colors=colors,
            stuff_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(COCO_STUFF_171_CATEGORIES)},
            evaluator_type="sem_seg",
            ignore_label=255,
        )
