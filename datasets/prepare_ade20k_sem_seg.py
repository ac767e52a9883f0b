#!/usr/bin/env python
"""ADE20K (ADEChallengeData2016) semantic labels for detectron2: ``annotations/`` -> ``annotations_detectron2/``.

The official PNGs hold 0 = "other/ignore" and k = class k-1; detectron2 wants 0..149 with 255 = ignore, i.e.
``label - 1`` in uint8 arithmetic (0 wraps to 255).

    python datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS] [--workers N]
"""

from __future__ import annotations

import os
import sys
from functools import partial

import numpy as np

from dinat_m2f.data.preparation import base_parser, parallel_map, read_image_array, require_dir, save_image_atomic

SPLITS = ("training", "validation")


def convert(job: tuple[str, str], overwrite: bool = False) -> bool:
    src, dst = job
    if not overwrite and os.path.exists(dst):
        return False
    label = read_image_array(src)
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"{src}: expected a single-channel uint8 label PNG, got {label.dtype} {label.shape}")
    save_image_atomic(label - np.uint8(1), dst)  # 0 (ignore) -> 255, k -> k-1
    return True


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__.splitlines()[1]).parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")
    for split in SPLITS:
        src_dir = require_dir(os.path.join(base, "annotations", split), "Extract ADEChallengeData2016.zip there.")
        dst_dir = os.path.join(base, "annotations_detectron2", split)
        jobs = [(os.path.join(src_dir, f), os.path.join(dst_dir, f)) for f in sorted(os.listdir(src_dir))]
        jobs = [j for j in jobs if j[0].endswith(".png")]
        parallel_map(partial(convert, overwrite=args.overwrite), jobs, args.workers, f"ADE20K sem-seg {split}")


if __name__ == "__main__":
    sys.exit(main())
