"""Your own dataset in one step: ``DATASETS.REGISTER`` entries registered with metadata and the right evaluator.

    DATASETS:
      REGISTER:
        - [pets_train, coco_instances, /data/pets/train, /data/pets/instances_train.json, [cat, dog]]
        - [pets_val, coco_instances, /data/pets/val, /data/pets/instances_val.json, [cat, dog]]
      TRAIN: ("pets_train",)
      TEST: ("pets_val",)

Formats: ``coco_instances`` (mask AP), ``coco_panoptic`` (PQ; things and stuff from the JSON's ``isthing``) and
``sem_seg`` (a folder of label PNGs, mIoU). Registration checks the paths and the class list against the
annotation's categories; loading checks every annotation's category id (and, for ``sem_seg``, every label value)
against the class list. Each error names the dataset entry, the file and the fix.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence

import numpy as np

from dinat_m2f.data.datasets._common import color_palette, panoptic_metadata, register_dataset
from dinat_m2f.data.datasets.loaders import load_coco_instances_mapped, load_panoptic_json

__all__ = ["FORMATS", "CustomDatasetError", "register_custom_dataset", "register_from_config"]

FORMATS = ("coco_instances", "coco_panoptic", "sem_seg")
IGNORE_LABEL = 255
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class CustomDatasetError(ValueError):
    """A ``DATASETS.REGISTER`` entry is malformed or disagrees with its files."""


def _require(path: str, what: str, name: str) -> str:
    if not os.path.exists(path):
        raise CustomDatasetError(f"DATASETS.REGISTER {name!r}: {what} not found: {path}")
    return path


def _json_categories(json_file: str, name: str, class_names: list[str]) -> list[dict]:
    """The JSON's categories sorted by id, checked against ``class_names`` (same names, same order)."""
    with open(json_file) as f:
        categories = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
    names = [c["name"] for c in categories]
    if names != class_names:
        raise CustomDatasetError(
            f"DATASETS.REGISTER {name!r}: the class names {class_names} differ from the categories of {json_file} "
            f"(by id: {names}); list the JSON's category names in id order"
        )
    return categories


def _check_ids(dicts: list[dict], key: str, valid: set[int], json_file: str, name: str) -> None:
    for d in dicts:
        for item in d.get(key, []):
            if item["category_id"] not in valid:
                raise CustomDatasetError(
                    f"DATASETS.REGISTER {name!r}: {json_file}: image {d.get('image_id')} has category_id "
                    f"{item['category_id']} outside the {len(valid)} listed classes"
                )


def _register_coco_instances(name: str, image_root: str, json_file: str, class_names: list[str]) -> None:
    categories = _json_categories(json_file, name, class_names)
    id_map = {c["id"]: i for i, c in enumerate(categories)}
    meta = {"thing_dataset_id_to_contiguous_id": id_map}

    def load() -> list[dict]:
        # load_coco_instances_mapped raises on an id outside the map, naming the file
        return load_coco_instances_mapped(json_file, image_root, meta)

    register_dataset(
        name,
        load,
        thing_classes=class_names,
        thing_colors=color_palette(len(class_names)),
        thing_dataset_id_to_contiguous_id=id_map,
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        ignore_label=IGNORE_LABEL,
    )


def _image_ext(image_root: str, name: str) -> str:
    exts = Counter(os.path.splitext(f)[1].lower() for f in os.listdir(image_root))
    exts = Counter({e: n for e, n in exts.items() if e in _IMAGE_EXTENSIONS})
    if not exts:
        raise CustomDatasetError(
            f"DATASETS.REGISTER {name!r}: no images ({', '.join(_IMAGE_EXTENSIONS)}) in {image_root}"
        )
    return exts.most_common(1)[0][0]


def _register_coco_panoptic(name: str, image_root: str, annotation, class_names: list[str]) -> None:
    if isinstance(annotation, str):
        json_file, png_root = annotation, os.path.splitext(annotation)[0]
    else:
        json_file, png_root = annotation
    _require(png_root, "panoptic PNG folder", name)
    categories = _json_categories(json_file, name, class_names)
    for c in categories:
        if "isthing" not in c:
            raise CustomDatasetError(f"DATASETS.REGISTER {name!r}: {json_file}: category {c['id']} has no 'isthing'")
    categories = [
        {**c, "color": c.get("color") or color} for c, color in zip(categories, color_palette(len(categories)))
    ]
    meta = panoptic_metadata(categories)
    image_ext = _image_ext(image_root, name)

    def load() -> list[dict]:
        try:
            return load_panoptic_json(json_file, image_root, png_root, meta, image_ext=image_ext)
        except ValueError as e:  # an unknown category id, named by the loader
            raise CustomDatasetError(f"DATASETS.REGISTER {name!r}: {e}") from None

    register_dataset(
        name,
        load,
        **meta,
        panoptic_root=png_root,
        panoptic_json=json_file,
        image_root=image_root,
        label_divisor=1000,
        ignore_label=IGNORE_LABEL,
        evaluator_type="coco_panoptic_seg",
    )


def _register_sem_seg(name: str, image_root: str, label_root: str, class_names: list[str]) -> None:
    from PIL import Image

    image_ext = _image_ext(image_root, name)

    def load() -> list[dict]:
        labels = {os.path.splitext(f)[0] for f in os.listdir(label_root) if f.lower().endswith(".png")}
        images = sorted(f for f in os.listdir(image_root) if f.lower().endswith(image_ext))
        stems = [os.path.splitext(f)[0] for f in images]
        missing = [s for s in stems if s not in labels]
        if missing:
            raise CustomDatasetError(
                f"DATASETS.REGISTER {name!r}: {len(missing)} image(s) in {image_root} have no label PNG in "
                f"{label_root}, e.g. {missing[:3]}"
            )
        dicts = []
        for file, stem in zip(images, stems):
            label_file = os.path.join(label_root, stem + ".png")
            with Image.open(label_file) as im:
                label = np.asarray(im)
                width, height = im.size
            if label.ndim != 2:
                raise CustomDatasetError(
                    f"DATASETS.REGISTER {name!r}: {label_file} has {label.ndim} dimensions; a label PNG is one channel "
                    "(class index per pixel)"
                )
            bad = [int(v) for v in np.unique(label) if v >= len(class_names) and v != IGNORE_LABEL]
            if bad:
                raise CustomDatasetError(
                    f"DATASETS.REGISTER {name!r}: {label_file} has label values {bad[:5]} but only "
                    f"{len(class_names)} classes are listed (0..{len(class_names) - 1}, {IGNORE_LABEL} = ignore)"
                )
            dicts.append(
                {
                    "file_name": os.path.join(image_root, file),
                    "sem_seg_file_name": label_file,
                    "height": height,
                    "width": width,
                }
            )
        return dicts

    register_dataset(
        name,
        load,
        stuff_classes=class_names,
        stuff_colors=color_palette(len(class_names)),
        sem_seg_root=label_root,
        image_root=image_root,
        ignore_label=IGNORE_LABEL,
        evaluator_type="sem_seg",
    )


def register_custom_dataset(
    name: str, fmt: str, image_root: str, annotation: str | Sequence[str], class_names: Sequence[str]
) -> None:
    """Register one dataset (see the module doc for the formats); raises CustomDatasetError on a bad entry."""
    if fmt not in FORMATS:
        raise CustomDatasetError(f"DATASETS.REGISTER {name!r}: unknown format {fmt!r}; use one of {FORMATS}")
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise CustomDatasetError(f"DATASETS.REGISTER {name!r}: the class-name list is empty")
    duplicates = sorted(c for c, n in Counter(class_names).items() if n > 1)
    if duplicates:
        raise CustomDatasetError(f"DATASETS.REGISTER {name!r}: duplicate class names {duplicates}")
    _require(image_root, "image folder", name)
    for path in [annotation] if isinstance(annotation, str) else annotation:
        _require(path, "annotation", name)
    if fmt == "coco_instances":
        _register_coco_instances(name, image_root, annotation, class_names)
    elif fmt == "coco_panoptic":
        _register_coco_panoptic(name, image_root, annotation, class_names)
    else:
        _register_sem_seg(name, image_root, annotation, class_names)


def _check_model_fits(cfg, name: str, num_classes: int, fmt: str) -> None:
    if num_classes != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
        raise CustomDatasetError(
            f"DATASETS.REGISTER {name!r} has {num_classes} classes but MODEL.SEM_SEG_HEAD.NUM_CLASSES is "
            f"{cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}: set it to {num_classes} (fine-tuning: see datasets/README.md)"
        )
    test = cfg.MODEL.MASK_FORMER.TEST
    if fmt == "coco_panoptic" and name in cfg.DATASETS.TEST and (test.INSTANCE_ON or test.SEMANTIC_ON):
        raise CustomDatasetError(
            f"DATASETS.REGISTER {name!r}: a panoptic JSON alone gives PQ only; set MODEL.MASK_FORMER.TEST.INSTANCE_ON "
            "False and MODEL.MASK_FORMER.TEST.SEMANTIC_ON False"
        )


def register_from_config(cfg) -> list[str]:
    """Register every ``DATASETS.REGISTER`` entry of ``cfg``; checks that the model's class count fits them."""
    names = []
    for i, entry in enumerate(cfg.DATASETS.REGISTER):
        if not isinstance(entry, (list, tuple)) or len(entry) != 5:
            raise CustomDatasetError(
                f"DATASETS.REGISTER[{i}] is {entry!r}; each entry is [name, format, image_root, annotation, "
                "[class names]]"
            )
        name, fmt, image_root, annotation, class_names = entry
        register_custom_dataset(name, fmt, image_root, annotation, class_names)
        if name in cfg.DATASETS.TRAIN or name in cfg.DATASETS.TEST:
            _check_model_fits(cfg, name, len(class_names), fmt)
        names.append(name)
    return names
