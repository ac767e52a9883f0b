#!/usr/bin/env python
"""ADE20K-full semantic segmentation (847 classes in the paper's setting) for detectron2.

Reads the full ADE20K release ``ADE20K_2021_17_01/`` (``index_ade20k.pkl`` and ``images/ADE/<split>/**/*.jpg`` with
their ``*_seg.png``, whose object class is ``R / 10 * 256 + G``, 1-based into ``objectnames``) and writes
``images_detectron2/<split>/*.jpg``, ``annotations_detectron2/<split>/*.tif`` (uint16 train ids, 65535 = ignore)
and ``ade20k_full_classes.json`` (the class names, in train-id order), read by the registration.

Images whose short side exceeds ``--max-short-side`` (default 512, as MaskFormer's ADE-full setting) are resized
to it, bilinear for the image and nearest for the label.

Classes: ``--classes FILE`` fixes the list, in train-id order: a JSON list of ``objectnames`` entries, or of
``{"name", "id"}`` objects whose ``id`` is the class value of the ``_seg.png`` (the format of MaskFormer's 847-class
table, ordered by its ``trainId`` when present). Without it, every object class annotated in at least one training
AND one validation image (``objectPresence`` of the index) is kept, in index order. Class value ``k`` of a
``_seg.png`` is taken as ``objectnames[k - 1]`` (0 = unlabeled).

    python datasets/prepare_ade20k_full_sem_seg.py [--root $DETECTRON2_DATASETS] [--workers N] [--classes F]
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from functools import partial

import numpy as np
from PIL import Image

from dinat_m2f.data.preparation import (
    base_parser,
    parallel_map,
    read_image_array,
    require_file,
    save_image_atomic,
    save_json_atomic,
)
from dinat_m2f.utils.file_io import atomic_copy

IGNORE = 65535
SPLITS = ("training", "validation")


def _split_of(folder: str) -> str | None:
    parts = folder.replace("\\", "/").split("/")
    return next((s for s in SPLITS if s in parts), None)


def select_classes(index: dict, classes_file: str | None) -> list[tuple[int, str]]:
    """``[(class value in the _seg.png, name)]`` of the kept classes, in train-id order."""
    names = list(index["objectnames"])
    if classes_file is not None:
        with open(require_file(classes_file)) as f:
            wanted = json.load(f)
        if wanted and isinstance(wanted[0], dict):
            wanted = sorted(wanted, key=lambda c: c.get("trainId", 0)) if "trainId" in wanted[0] else wanted
            return [(int(c["id"]), str(c["name"])) for c in wanted]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ValueError(f"{classes_file}: classes not in index_ade20k.pkl objectnames: {unknown[:5]}")
        return [(names.index(n) + 1, n) for n in wanted]
    presence = np.asarray(index["objectPresence"])  # [num objects, num images]
    splits = np.array([_split_of(f) for f in index["folder"]])
    in_train = (presence[:, splits == "training"] > 0).any(axis=1)
    in_val = (presence[:, splits == "validation"] > 0).any(axis=1)
    return [(int(i) + 1, names[i]) for i in np.nonzero(in_train & in_val)[0]]


def _resized_size(h: int, w: int, max_short: int) -> tuple[int, int] | None:
    if max_short <= 0 or min(h, w) <= max_short:
        return None
    if w >= h:
        return max_short, round(w / h * max_short)
    return round(h / w * max_short), max_short


def convert(job: tuple[str, str, str, str], lut: np.ndarray, max_short: int, overwrite: bool = False) -> None:
    image_src, seg_src, image_dst, label_dst = job
    if not overwrite and os.path.exists(label_dst) and os.path.exists(image_dst):
        return
    seg = read_image_array(require_file(seg_src), "RGB").astype(np.int64)
    obj = seg[..., 0] // 10 * 256 + seg[..., 1]  # class value, 0 = unlabeled
    if obj.max() >= len(lut):
        raise ValueError(f"{seg_src}: object class {obj.max()} is beyond index_ade20k.pkl's objectnames")
    image = read_image_array(require_file(image_src), "RGB")
    if image.shape[:2] != obj.shape:
        raise ValueError(f"{seg_src}: size {obj.shape} differs from its image {image_src} {image.shape[:2]}")
    label = lut[obj]
    size = _resized_size(*obj.shape, max_short)
    if size is not None:
        h, w = size
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        label = np.asarray(Image.fromarray(label.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(np.uint16)
        save_image_atomic(image, image_dst)
    else:  # keep the original JPEG bytes rather than re-encoding
        atomic_copy(image_src, image_dst)
    save_image_atomic(label, label_dst)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[1])
    parser.add_argument("--classes", default=None, help="JSON list of classes to keep, in train-id order")
    parser.add_argument("--max-short-side", type=int, default=512, help="resize larger images (0: never)")
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "ADE20K_2021_17_01")
    with open(require_file(os.path.join(base, "index_ade20k.pkl"), "Extract ADE20K_2021_17_01.zip there."), "rb") as f:
        index = pickle.load(f)
    kept = select_classes(index, args.classes)
    lut = np.full(max([len(index["objectnames"])] + [v for v, _ in kept]) + 1, IGNORE, dtype=np.uint16)
    for train_id, (value, _) in enumerate(kept):
        lut[value] = train_id
    names = [n for _, n in kept]
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
        fn = partial(convert, lut=lut, max_short=args.max_short_side, overwrite=args.overwrite)
        parallel_map(fn, jobs, args.workers, f"ADE-full {split}")
    save_json_atomic(names, os.path.join(base, "ade20k_full_classes.json"))


if __name__ == "__main__":
    sys.exit(main())
