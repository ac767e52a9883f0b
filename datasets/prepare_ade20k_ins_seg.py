#!/usr/bin/env python
"""ADE20K instance annotations (COCO instances JSON, RLE masks) from ``annotations_instance``.

Reads ``ADEChallengeData2016/annotations_instance/<split>/*.png`` (R = instance-benchmark class 1..100, G =
instance id) and writes ``ade20k_instance_{train,val}.json``. Category ids are the 0-based scene-parsing ids of the
100 thing classes (shared with the panoptic annotations); ``image_id`` is the file stem.

    python datasets/prepare_ade20k_ins_seg.py [--root $DETECTRON2_DATASETS] [--workers N] [--catid-mapping F]
"""

from __future__ import annotations

import os
import sys
from functools import partial

import numpy as np
from pycocotools import mask as mask_util

from dinat_m2f.data.datasets.ade20k import ADE20K_150_CATEGORIES
from dinat_m2f.data.preparation import (
    ade20k_instance_masks,
    base_parser,
    load_ade20k_catid_mapping,
    mask_bbox,
    parallel_map,
    read_image_array,
    require_dir,
    save_json_atomic,
)

SPLITS = {"train": "training", "val": "validation"}


def convert(job: tuple[str, str], catid_mapping: dict[int, int]) -> dict:
    image_file, ins_file = job
    stem = os.path.splitext(os.path.basename(image_file))[0]
    ins = read_image_array(ins_file, "RGB")  # read once: the masks and the image size both come from it
    instances = ade20k_instance_masks(ins_file, catid_mapping, ins)
    h, w = ins.shape[:2]
    anns = []
    for _, cat, mask in instances:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append(
            {
                "image_id": stem,
                "category_id": cat,
                "segmentation": rle,
                "area": int(mask.sum()),
                "bbox": mask_bbox(mask),
                "iscrowd": 0,
            }
        )
    return {"image": {"id": stem, "file_name": os.path.basename(image_file), "height": h, "width": w}, "anns": anns}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[1])
    parser.add_argument("--catid-mapping", default=None, help="Mask2Former's ade20k_instance_catid_mapping.txt")
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")
    mapping = load_ade20k_catid_mapping(args.catid_mapping)
    thing_ids = sorted(set(mapping.values()))
    categories = [{"id": i, "name": ADE20K_150_CATEGORIES[i]["name"], "isthing": 1} for i in thing_ids]
    for split, dirname in SPLITS.items():
        out_file = os.path.join(base, f"ade20k_instance_{split}.json")
        if os.path.exists(out_file) and not args.overwrite:
            print(f"{out_file} exists, skipping (use --overwrite to redo)")
            continue
        image_dir = require_dir(os.path.join(base, "images", dirname), "Extract ADEChallengeData2016.zip there.")
        ins_dir = require_dir(
            os.path.join(base, "annotations_instance", dirname),
            "Extract ChallengeData2017/annotations_instance.tar into ADEChallengeData2016/.",
        )
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.endswith(".jpg"))
        jobs = [(os.path.join(image_dir, s + ".jpg"), os.path.join(ins_dir, s + ".png")) for s in stems]
        results = parallel_map(partial(convert, catid_mapping=mapping), jobs, args.workers, f"ADE20K ins {split}")
        anns = [a for r in results for a in r["anns"]]
        for k, a in enumerate(anns):
            a["id"] = k + 1
        save_json_atomic(
            {
                "info": {"description": "ADE20K instances, made by datasets/prepare_ade20k_ins_seg.py"},
                "images": [r["image"] for r in results],
                "annotations": anns,
                "categories": categories,
            },
            out_file,
        )


if __name__ == "__main__":
    sys.exit(main())
