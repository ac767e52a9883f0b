#!/usr/bin/env python
"""COCO semantic maps from the panoptic annotations: ``panoptic_{split}2017`` -> ``panoptic_semseg_{split}2017``.

Every panoptic category (80 things AND 53 stuff) gets its contiguous id 0..132 in detectron2's COCO_CATEGORIES
order (the ids of the ``coco_2017_*_panoptic_with_sem_seg`` registration); unlabeled pixels become 255.

    python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py [--root $DETECTRON2_DATASETS] [--workers N]
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial

import numpy as np
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from panopticapi.utils import rgb2id

from dinat_m2f.data.preparation import (
    base_parser,
    parallel_map,
    read_image_array,
    require_dir,
    require_file,
    save_image_atomic,
)

CONTIGUOUS_ID = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}


def convert(job: tuple[str, str, list[dict]], overwrite: bool = False) -> bool:
    src, dst, segments = job
    if not overwrite and os.path.exists(dst):
        return False
    pan = rgb2id(read_image_array(src, "RGB"))
    sem = np.full(pan.shape, 255, dtype=np.uint8)
    for seg in segments:
        if seg["category_id"] not in CONTIGUOUS_ID:
            raise ValueError(f"{src}: segment {seg['id']} has unknown category_id {seg['category_id']}")
        sem[pan == seg["id"]] = CONTIGUOUS_ID[seg["category_id"]]
    save_image_atomic(sem, dst)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[1])
    parser.add_argument("--splits", nargs="+", default=["val2017", "train2017"])
    args = parser.parse_args(argv)
    coco = os.path.join(args.root, "coco")
    for split in args.splits:
        json_file = require_file(os.path.join(coco, "annotations", f"panoptic_{split}.json"))
        pan_dir = require_dir(os.path.join(coco, f"panoptic_{split}"), "Extract panoptic_annotations_trainval2017.")
        out_dir = os.path.join(coco, f"panoptic_semseg_{split}")
        with open(json_file) as f:
            anns = json.load(f)["annotations"]
        jobs = [
            (os.path.join(pan_dir, a["file_name"]), os.path.join(out_dir, a["file_name"]), a["segments_info"])
            for a in anns
        ]
        parallel_map(partial(convert, overwrite=args.overwrite), jobs, args.workers, f"COCO sem-seg {split}")


if __name__ == "__main__":
    sys.exit(main())
