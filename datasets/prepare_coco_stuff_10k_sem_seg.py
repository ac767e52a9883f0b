#!/usr/bin/env python
"""COCO-Stuff-10k (cocostuff-10k-v1.1) semantic labels for detectron2.

Reads ``coco/coco_stuff_10k/{images/*.jpg, annotations/*.mat, imageLists/{train,test}.txt}`` (the official
zip's layout; each ``.mat`` holds ``S``, the label map with 0 = unlabeled and k = COCO-Stuff class id k, 1..182)
and writes ``images_detectron2/{train,test}/*.jpg`` and ``annotations_detectron2/{train,test}/*.png`` with the 171
classes as 0..170 (80 things then 91 stuff, in id order) and 255 = ignore.

    python datasets/prepare_coco_stuff_10k_sem_seg.py [--root $DETECTRON2_DATASETS] [--workers N]
"""

from __future__ import annotations

import os
import sys
from functools import partial

import numpy as np
import scipy.io

from dinat_m2f.data.datasets.coco import COCO_STUFF_171_CATEGORIES
from dinat_m2f.data.preparation import base_parser, parallel_map, require_dir, require_file, save_image_atomic
from dinat_m2f.utils.file_io import atomic_copy

SPLITS = ("train", "test")
LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(COCO_STUFF_171_CATEGORIES):
    LUT[_c["id"]] = _i


def convert(job: tuple[str, str, str, str], overwrite: bool = False) -> None:
    image_src, mat_src, image_dst, label_dst = job
    if overwrite or not os.path.exists(label_dst):
        try:
            label = np.asarray(scipy.io.loadmat(require_file(mat_src))["S"])
        except (KeyError, ValueError, OSError) as e:
            raise OSError(f"Cannot read the label map 'S' of {mat_src}: {e}") from e
        if label.ndim != 2 or label.min() < 0 or label.max() > 182:
            raise ValueError(
                f"{mat_src}: 'S' must be a 2-D map of 0..182, got {label.shape} in {label.min()}..{label.max()}"
            )
        save_image_atomic(LUT[label.astype(np.int64)], label_dst)
    if overwrite or not os.path.exists(image_dst):
        require_file(image_src)
        atomic_copy(image_src, image_dst)


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__.splitlines()[1]).parse_args(argv)
    base = os.path.join(args.root, "coco", "coco_stuff_10k")
    hint = "Extract cocostuff-10k-v1.1.zip there."
    image_dir = require_dir(os.path.join(base, "images"), hint)
    mat_dir = require_dir(os.path.join(base, "annotations"), hint)
    for split in SPLITS:
        with open(require_file(os.path.join(base, "imageLists", f"{split}.txt"), hint)) as f:
            names = [line.strip() for line in f if line.strip()]
        jobs = [
            (
                os.path.join(image_dir, n + ".jpg"),
                os.path.join(mat_dir, n + ".mat"),
                os.path.join(base, "images_detectron2", split, n + ".jpg"),
                os.path.join(base, "annotations_detectron2", split, n + ".png"),
            )
            for n in names
        ]
        parallel_map(partial(convert, overwrite=args.overwrite), jobs, args.workers, f"COCO-Stuff-10k {split}")


if __name__ == "__main__":
    sys.exit(main())
