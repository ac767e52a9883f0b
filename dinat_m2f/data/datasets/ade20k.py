"""ADE20K registrations: semantic (150), panoptic (150 = 100 things + 50 stuff), instance (100), full (847).

Layout (under the datasets root, see ``datasets/README.md``)::

    ADEChallengeData2016/images/{training,validation}/*.jpg
    ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png      <- prepare_ade20k_sem_seg.py
    ADEChallengeData2016/ade20k_panoptic_{train,val}{.json,/}                    <- prepare_ade20k_pan_seg.py
    ADEChallengeData2016/ade20k_instance_{train,val}.json                        <- prepare_ade20k_ins_seg.py
    ADE20K_2021_17_01/{images,annotations}_detectron2/{training,validation}/     <- prepare_ade20k_full_sem_seg.py
"""

from __future__ import annotations

import os

from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from dinat_m2f.data.datasets._common import color_palette, dataset_root, load_json, panoptic_metadata, register_dataset
from dinat_m2f.data.datasets.loaders import load_coco_instances_mapped, load_panoptic_json, load_sem_seg_strict

__all__ = [
    "ADE20K_150_CATEGORIES",
    "ADE20K_THING_IDS",
    "ADE20K_FULL_IGNORE_LABEL",
    "register_all_ade20k",
    "register_all_ade20k_full",
]

# 0-based ids (in the 150-class scene-parsing list) of the 100 classes of the ADE20K instance benchmark, in the
# order of the instance benchmark's own class ids 1..100 (R channel of ``annotations_instance`` PNGs).
ADE20K_THING_IDS: tuple[int, ...] = (
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43, 44, 45, 47,
    49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86, 87,
    88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124,
    125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
)  # fmt: skip

# The official ADE20K-150 RGB colours of the classes 0..149 (the scene-parsing benchmark's palette, as used by
# Mask2Former's ADE20K registration; "road, route" and "skyscraper" share (140, 140, 140) there too).
_ADE20K_150_COLORS: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0),
    (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255),
    (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255),
    (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10),
    (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255),
    (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0),
    (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122),
    (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255),
    (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255),
    (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194),
    (102, 255, 0), (92, 0, 255),
)  # fmt: skip
assert len(_ADE20K_150_COLORS) == len(ADE20K_SEM_SEG_CATEGORIES) == 150

ADE20K_150_CATEGORIES: list[dict] = [
    {"id": i, "name": name.strip(), "isthing": int(i in ADE20K_THING_IDS), "color": list(color)}
    for i, (name, color) in enumerate(zip(ADE20K_SEM_SEG_CATEGORIES, _ADE20K_150_COLORS))
]

ADE20K_FULL_IGNORE_LABEL = 65535
ADE20K_FULL_NUM_CLASSES = 847
# Written by datasets/prepare_ade20k_full_sem_seg.py: the class names of the trainIds 0..846, in order.
ADE20K_FULL_CLASSES_FILE = "ADE20K_2021_17_01/ade20k_full_classes.json"

_SPLITS = {"train": "training", "val": "validation"}


def _ade20k_instance_metadata() -> dict:
    things = [ADE20K_150_CATEGORIES[i] for i in sorted(ADE20K_THING_IDS)]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
    }


def register_all_ade20k(root: str | None = None) -> None:
    """Register ``ade20k_sem_seg_*``, ``ade20k_panoptic_*`` and ``ade20k_instance_*`` under ``root``."""
    base = os.path.join(dataset_root(root), "ADEChallengeData2016")
    # thing ids stay at their 0..149 position, interleaved with stuff (ADE20K_150_CATEGORIES ids are positions)
    meta150 = panoptic_metadata(ADE20K_150_CATEGORIES)
    ins_meta = _ade20k_instance_metadata()
    for split, dirname in _SPLITS.items():
        image_dir = os.path.join(base, "images", dirname)
        sem_dir = os.path.join(base, "annotations_detectron2", dirname)
        register_dataset(
            f"ade20k_sem_seg_{split}",
            lambda x=image_dir, y=sem_dir: load_sem_seg_strict(y, x, gt_ext="png", image_ext="jpg"),
            stuff_classes=meta150["stuff_classes"],
            stuff_colors=meta150["stuff_colors"],
            image_root=image_dir,
            sem_seg_root=sem_dir,
            evaluator_type="sem_seg",
            ignore_label=255,
        )

        pan_dir = os.path.join(base, f"ade20k_panoptic_{split}")
        pan_json = os.path.join(base, f"ade20k_panoptic_{split}.json")
        ins_json = os.path.join(base, f"ade20k_instance_{split}.json")
        register_dataset(
            f"ade20k_panoptic_{split}",
            lambda x=image_dir, p=pan_dir, j=pan_json, s=sem_dir: load_panoptic_json(
                j, x, p, meta150, sem_seg_dir=s, prepare_hint="Run datasets/prepare_ade20k_pan_seg.py."
            ),
            panoptic_root=pan_dir,
            image_root=image_dir,
            panoptic_json=pan_json,
            sem_seg_root=sem_dir,
            json_file=ins_json,
            evaluator_type="ade20k_panoptic_seg",
            ignore_label=255,
            label_divisor=1000,
            **meta150,
        )

        register_dataset(
            f"ade20k_instance_{split}",
            lambda j=ins_json, x=image_dir: load_coco_instances_mapped(
                j, x, ins_meta, "Run datasets/prepare_ade20k_ins_seg.py."
            ),
            json_file=ins_json,
            image_root=image_dir,
            evaluator_type="coco",
            **ins_meta,
        )


def _ade20k_full_classes(base_root: str) -> list[str] | None:
    path = os.path.join(base_root, ADE20K_FULL_CLASSES_FILE)
    if not os.path.isfile(path):
        return None
    names = load_json(path)
    return [str(n) for n in names]


def register_all_ade20k_full(root: str | None = None) -> None:
    """Register ``ade20k_full_sem_seg_{train,val}`` (847 classes, uint16 TIFF labels, ignore 65535).

    The class names come from the prepared dataset (``ADE20K_2021_17_01/ade20k_full_classes.json``, written by
    ``datasets/prepare_ade20k_full_sem_seg.py``); before preparation the metadata has no ``stuff_classes``.
    """
    root = dataset_root(root)
    base = os.path.join(root, "ADE20K_2021_17_01")
    names = _ade20k_full_classes(root)
    extra = {"stuff_classes": names, "stuff_colors": color_palette(len(names))} if names else {}
    for split, dirname in _SPLITS.items():
        image_dir = os.path.join(base, "images_detectron2", dirname)
        sem_dir = os.path.join(base, "annotations_detectron2", dirname)
        register_dataset(
            f"ade20k_full_sem_seg_{split}",
            lambda x=image_dir, y=sem_dir: load_sem_seg_strict(
                y, x, gt_ext="tif", image_ext="jpg", prepare_hint="Run datasets/prepare_ade20k_full_sem_seg.py."
            ),
            image_root=image_dir,
            sem_seg_root=sem_dir,
            evaluator_type="sem_seg",
            ignore_label=ADE20K_FULL_IGNORE_LABEL,
            **extra,
        )
