#!/usr/bin/env python
"""Cityscapes label images for detectron2, made by cityscapesscripts' own tools.

1. ``*_gtFine_labelTrainIds.png`` from ``*_gtFine_polygons.json`` (semantic / panoptic training), with
   ``json2labelImg(..., "trainIds")`` -- what ``createTrainIdLabelImgs.py`` runs, here in parallel and resumable.
2. ``gtFine/cityscapes_panoptic_{train,val}.json`` + PNG folders from ``*_gtFine_instanceIds.png`` with
   ``createPanopticImgs.convert2panoptic`` (label ids as category ids, as detectron2 expects). A split whose JSON
   exists is skipped.

    python datasets/prepare_cityscapes.py [--root $DETECTRON2_DATASETS] [--workers N] [--skip-panoptic]
"""

from __future__ import annotations

import glob
import os
import sys
from functools import partial

from dinat_m2f.data.preparation import base_parser, parallel_map, require_dir
from dinat_m2f.utils.file_io import atomic_write

SPLITS = ("train", "val", "test")


def make_train_ids(polygons_json: str, overwrite: bool = False) -> bool:
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    dst = polygons_json.replace("_polygons.json", "_labelTrainIds.png")
    if not overwrite and os.path.exists(dst):
        return False
    try:
        atomic_write(dst, lambda f: json2labelImg(polygons_json, f, "trainIds"))  # PIL: PNG from dst's extension
    except Exception as e:
        raise OSError(f"Cannot convert {polygons_json}: {e}") from e
    return True


def make_panoptic(cityscapes: str, split: str, overwrite: bool = False) -> None:
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    gt_fine = os.path.join(cityscapes, "gtFine")
    out_json = os.path.join(gt_fine, f"cityscapes_panoptic_{split}.json")
    if os.path.exists(out_json) and not overwrite:
        print(f"{out_json} exists, skipping")
        return
    if not glob.glob(os.path.join(gt_fine, split, "*", "*_instanceIds.png")):
        raise FileNotFoundError(f"No *_gtFine_instanceIds.png under {os.path.join(gt_fine, split)}")
    # convert2panoptic appends "gtFine" only to the path it finds itself; an explicit path must include it.
    convert2panoptic(cityscapesPath=gt_fine, outputFolder=gt_fine, useTrainId=False, setNames=[split])


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[1])
    parser.add_argument("--skip-panoptic", action="store_true", help="only make the labelTrainIds PNGs")
    args = parser.parse_args(argv)
    cityscapes = os.path.join(args.root, "cityscapes")
    gt_fine = require_dir(os.path.join(cityscapes, "gtFine"), "Extract gtFine_trainvaltest.zip there.")
    require_dir(os.path.join(cityscapes, "leftImg8bit"), "Extract leftImg8bit_trainvaltest.zip there.")
    files = sorted(glob.glob(os.path.join(gt_fine, "*", "*", "*_gtFine_polygons.json")))
    if not files:
        raise FileNotFoundError(f"No */*/*_gtFine_polygons.json under {gt_fine}")
    parallel_map(partial(make_train_ids, overwrite=args.overwrite), files, args.workers, "Cityscapes trainIds")
    if not args.skip_panoptic:
        for split in ("train", "val"):
            if os.path.isdir(os.path.join(gt_fine, split)):
                make_panoptic(cityscapes, split, args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
