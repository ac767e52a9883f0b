#!/usr/bin/env python
"""ADE20K-full semantic segmentation (847 classes in the paper's setting) for detectron2.

Reads the full ADE20K release ``ADE20K_2021_17_01/`` (``index_ade20k.pkl`` and ``images/ADE/<split>/**/*.jpg`` with
their ``*_seg.png``, whose object class is ``R / 10 * 256 + G``, 1-based into ``objectnames``) and writes
``images_detectron2/<split>/*.jpg``, ``annotations_detectron2/<split>/*.tif`` (uint16 train ids, 65535 = ignore)
and ``ade20k_full_classes.json`` (the class names, in train-id order), read by the registration.

Classes: ``--classes FILE`` (a JSON list of ``objectnames`` entries, in train-id order) fixes the list, e.g. to
MaskFormer's 847; without it, every object class annotated in at least one training AND one validation image
(``objectPresence`` of the index) is kept, in index order.

    python datasets/prepare_ade20k_full_sem_seg.py [--root $DETECTRON2_DATASETS] [--workers N] [--classes F]
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from functools import partial

import numpy as np

from dinat_m2f.data.preparation import (
    base_parser,
    parallel_map,
    read_image_array,
    require_file,
    save_image_atomic,
    save_json_atomic,
)

IGNORE = 65535
SPLITS = ("training", "validation")


def _split_of(folder: str) -> str | None:
    parts = folder.replace("\\", "/").split("/")
    return next((s for s in SPLITS if s in parts), None)


def select_classes(index: dict, classes_file: str | None) -> list[int]:
    """0-based ``objectnames`` indices of the kept classes, in train-id order."""
    names = list(index["objectnames"])
    if classes_file is not None:
        with open(require_file(classes_file)) as f:
            wanted = json.load(f)
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ValueError(f"{classes_file}: classes not in index_ade20k.pkl objectnames: {unknown[:5]}")
        return [names.index(n) for n in wanted]
    presence = np.asarray(index["objectPresence"])  # [num objects, num images]
    splits = np.array([_split_of(f) for f in index["folder"]])
    in_train = (presence[:, splits == "training"] > 0).any(axis=1)
    in_val = (presence[:, splits == "validation"] > 0).any(axis=1)
    return [int(i) for i in np.nonzero(in_train & in_val)[0]]


def convert(job: tuple[str, str, str, str], lut: np.ndarray, overwrite: bool = False) -> None:
    image_src, seg_src, image_dst, label_dst = job
    if overwrite or not os.path.exists(label_dst):
        seg = read_image_array(require_file(seg_src), "RGB").astype(np.int64)
        obj = seg[..., 0] // 10 * 256 + seg[..., 1]  # 1-based object index, 0 = unlabeled
        if obj.max() >= len(lut):
            raise ValueError(f"{seg_src}: object class {obj.max()} is beyond index_ade20k.pkl's objectnames")
        save_image_atomic(lut[obj], label_dst)
    if overwrite or not os.path.exists(image_dst):
        require_file(image_src)
        os.makedirs(os.path.dirname(image_dst), exist_ok=True)
        shutil.copyfile(image_src, image_dst + ".tmp")
        os.replace(image_dst + ".tmp", image_dst)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[1])
    parser.add_argument("--classes", default=None, help="JSON list of objectnames to keep, in train-id order")
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "ADE20K_2021_17_01")
    with open(require_file(os.path.join(base, "index_ade20k.pkl"), "Extract ADE20K_2021_17_01.zip there."), "rb") as f:
        index = pickle.load(f)
    kept = select_classes(index, args.classes)
    lut = np.full(len(index["objectnames"]) + 1, IGNORE, dtype=np.uint16)
    for train_id, obj in enumerate(kept):
        lut[obj + 1] = train_id
    names = [index["objectnames"][i] for i in kept]
    print(f"ADE20K-full: {len(names)} classes")
    for split in SPLITS:
        jobs = []
        for fname, folder in zip(index["filename"], index["folder"]):
            if _split_of(folder) != split:
                continue
            stem = os.path.splitext(fname)[0]
            src_dir = os.path.join(args.root, folder) if not os.path.isabs(folder) else folder
            jobs.append(
                (
                    os.path.join(src_dir, fname),
                    os.path.join(src_dir, stem + "_seg.png"),
                    os.path.join(base, "images_detectron2", split, stem + ".jpg"),
                    os.path.join(base, "annotations_detectron2", split, stem + ".tif"),
                )
            )
        parallel_map(partial(convert, lut=lut, overwrite=args.overwrite), jobs, args.workers, f"ADE-full {split}")
    save_json_atomic(names, os.path.join(base, "ade20k_full_classes.json"))


if __name__ == "__main__":
    sys.exit(main())
