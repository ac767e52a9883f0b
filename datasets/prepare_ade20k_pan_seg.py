#!/usr/bin/env python
"""ADE20K panoptic annotations (COCO panoptic format) from the semantic and instance annotations.

Reads ``ADEChallengeData2016/annotations/<split>/*.png`` (semantic, 0 = ignore, k = class k-1) and
``annotations_instance/<split>/*.png`` (R = instance-benchmark class 1..100, G = instance id), writes
``ade20k_panoptic_{train,val}/*.png`` (RGB-encoded ids) and ``ade20k_panoptic_{train,val}.json``.

Stuff segments come from the semantic map (one per stuff class); thing segments from the instance map, pasted on
top (the two annotations overlap in places). Thing-class pixels without an instance stay void. Categories use the
0-based scene-parsing ids 0..149; a segment id is ``(category + 1) * 1000 + k``, so a finished PNG can be re-read
on resume without redoing it.

    python datasets/prepare_ade20k_pan_seg.py [--root $DETECTRON2_DATASETS] [--workers N] [--catid-mapping F]
"""

from __future__ import annotations

import os
import sys
from functools import partial

import numpy as np
from panopticapi.utils import id2rgb, rgb2id

from dinat_m2f.data.datasets.ade20k import ADE20K_150_CATEGORIES
from dinat_m2f.data.preparation import (
    ade20k_instance_masks,
    base_parser,
    load_ade20k_catid_mapping,
    mask_bbox,
    parallel_map,
    read_image_array,
    require_dir,
    require_file,
    save_image_atomic,
    save_json_atomic,
)

SPLITS = {"train": "training", "val": "validation"}
IS_THING = {c["id"]: bool(c["isthing"]) for c in ADE20K_150_CATEGORIES}


def _segments_info(pan: np.ndarray) -> list[dict]:
    info = []
    for seg_id in np.unique(pan):
        if seg_id == 0:
            continue
        mask = pan == seg_id
        cat = int(seg_id) // 1000 - 1
        info.append(
            {"id": int(seg_id), "category_id": cat, "iscrowd": 0, "area": int(mask.sum()), "bbox": mask_bbox(mask)}
        )
    return info


def convert(job: tuple[str, str, str, str], catid_mapping: dict[int, int], overwrite: bool = False) -> dict:
    image_file, sem_file, ins_file, out_file = job
    if overwrite or not os.path.exists(out_file):
        sem = read_image_array(require_file(sem_file))
        if sem.ndim != 2:
            raise ValueError(f"{sem_file}: expected a single-channel label PNG, got shape {sem.shape}")
        pan = np.zeros(sem.shape, dtype=np.int64)
        for label in np.unique(sem):
            cat = int(label) - 1
            if label == 0:
                continue  # "other" / ignore
            if cat not in IS_THING:
                raise ValueError(f"{sem_file}: label {label} is outside 0..150")
            if not IS_THING[cat]:  # thing pixels come from the instance map only
                pan[sem == label] = (cat + 1) * 1000
        for k, (_, cat, mask) in enumerate(ade20k_instance_masks(require_file(ins_file), catid_mapping)):
            if mask.shape != sem.shape:
                raise ValueError(f"{ins_file}: shape {mask.shape} differs from {sem_file} {sem.shape}")
            pan[mask] = (cat + 1) * 1000 + k + 1
        save_image_atomic(id2rgb(pan), out_file)
    else:
        pan = rgb2id(read_image_array(out_file, "RGB"))
    stem = os.path.splitext(os.path.basename(image_file))[0]
    h, w = pan.shape
    return {
        "image": {"id": stem, "file_name": os.path.basename(image_file), "height": h, "width": w},
        "annotation": {"image_id": stem, "file_name": stem + ".png", "segments_info": _segments_info(pan)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[1])
    parser.add_argument("--catid-mapping", default=None, help="Mask2Former's ade20k_instance_catid_mapping.txt")
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")
    mapping = load_ade20k_catid_mapping(args.catid_mapping)
    categories = [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in ADE20K_150_CATEGORIES]
    for split, dirname in SPLITS.items():
        image_dir = require_dir(os.path.join(base, "images", dirname), "Extract ADEChallengeData2016.zip there.")
        sem_dir = require_dir(os.path.join(base, "annotations", dirname), "Extract ADEChallengeData2016.zip there.")
        ins_dir = require_dir(
            os.path.join(base, "annotations_instance", dirname),
            "Extract ChallengeData2017/annotations_instance.tar into ADEChallengeData2016/.",
        )
        out_dir = os.path.join(base, f"ade20k_panoptic_{split}")
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.endswith(".jpg"))
        jobs = [
            (
                os.path.join(image_dir, s + ".jpg"),
                os.path.join(sem_dir, s + ".png"),
                os.path.join(ins_dir, s + ".png"),
                os.path.join(out_dir, s + ".png"),
            )
            for s in stems
        ]
        results = parallel_map(
            partial(convert, catid_mapping=mapping, overwrite=args.overwrite), jobs, args.workers, f"ADE20K pan {split}"
        )
        save_json_atomic(
            {
                "info": {"description": "ADE20K panoptic, made by datasets/prepare_ade20k_pan_seg.py"},
                "images": [r["image"] for r in results],
                "annotations": [r["annotation"] for r in results],
                "categories": categories,
            },
            os.path.join(base, f"ade20k_panoptic_{split}.json"),
        )


if __name__ == "__main__":
    sys.exit(main())
