"""Generators of tiny datasets in the OFFICIAL on-disk layouts and file formats, for tests.

Each ``make_*(root, ...)`` writes a handful of small images (default 48x64) and their annotations under ``root``
exactly where ``$DETECTRON2_DATASETS`` would hold the real dataset, and returns the ground truth it drew (per image:
the file stem and a list of :class:`Segment`), so tests can check preparation scripts, registrations, mappers and
evaluators against known answers.

- :func:`make_coco`: ``coco/{split}/*.jpg``, ``coco/annotations/instances_{split}.json`` (polygons, one crowd RLE),
  ``coco/annotations/panoptic_{split}.json`` + ``coco/panoptic_{split}/*.png`` (RGB-encoded segment ids).
- :func:`make_ade20k`: ``ADEChallengeData2016/images/{training,validation}/*.jpg``, ``annotations/*`` (uint8, 0 =
  ignore, k = class k-1), ``annotations_instance/*`` (R = instance-benchmark class 1..100, G = instance id),
  ``objectInfo150.txt``.
- :func:`make_ade20k_full`: ``ADE20K_2021_17_01/images/ADE/{training,validation}/<scene>/*.jpg`` + ``*_seg.png``
  (class = R/10*256 + G) and ``index_ade20k.pkl``.
- :func:`make_cityscapes`: ``cityscapes/leftImg8bit/{split}/<city>/*_leftImg8bit.png`` and
  ``gtFine/{split}/<city>/*_gtFine_{polygons.json,labelIds.png,instanceIds.png,color.png}``, the PNGs drawn from
  the polygons by cityscapesscripts' own ``json2labelImg`` / ``json2instanceImg`` (as the official ones were).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "Segment",
    "MiniImage",
    "make_coco",
    "make_ade20k",
    "make_ade20k_full",
    "make_cityscapes",
    "make_mapillary_vistas",
    "make_coco_stuff_10k",
    "corrupt_file",
    "load_prep_script",
    "registered_under",
]

H, W = 48, 64


@dataclass
class Segment:
    """One ground-truth segment. ``category_id`` is the dataset's own id (as written in its files)."""

    category_id: int
    mask: np.ndarray  # bool HxW, the VISIBLE pixels (after occlusion)
    isthing: bool
    iscrowd: bool = False
    segment_id: int = 0  # panoptic id (COCO), instance id (ADE G channel), or Cityscapes instanceIds value


@dataclass
class MiniImage:
    stem: str
    image_id: int | str
    height: int
    width: int
    segments: list[Segment] = field(default_factory=list)

    def semantic(self, ignore: int = 255, id_map: dict[int, int] | None = None) -> np.ndarray:
        """The semantic map of the segments (``id_map`` maps category ids), ``ignore`` where unlabeled."""
        out = np.full((self.height, self.width), ignore, dtype=np.int64)
        for s in self.segments:
            out[s.mask] = id_map[s.category_id] if id_map is not None else s.category_id
        return out


def _rect(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _photo(segments: list[Segment], h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB image whose regions follow the segments (flat colour per segment + mild noise)."""
    img = rng.integers(0, 40, size=(h, w, 3)).astype(np.int64)
    for s in segments:
        color = np.array([(s.category_id * 53) % 256, (s.category_id * 97 + s.segment_id * 31) % 256, 128])
        img[s.mask] += color
    return np.clip(img, 0, 255).astype(np.uint8)


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def corrupt_file(path: str) -> None:
    """Overwrite ``path`` with bytes that no image/JSON reader accepts."""
    with open(path, "wb") as f:
        f.write(b"\x00not-an-image-nor-json\xff" * 4)


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_prep_script(name: str):
    """Import ``datasets/<name>.py`` (the preparation scripts are not a package) as a module."""
    path = os.path.join(_REPO, "datasets", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # worker processes unpickle the script's functions by module name
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def registered_under(root: str) -> Iterator[None]:
    """Point every dataset name of this project at ``root``; restore the previous root afterwards."""
    from dinat_m2f.data.datasets import current_root, register_all

    previous = current_root()
    register_all(root)
    try:
        yield
    finally:
        register_all(previous)


# ----------------------------------------------------------------------------------------------------------- COCO
def make_coco(root: str, split: str = "val2017", num_images: int = 2, seed: int = 0) -> list[MiniImage]:
    """COCO 2017 instances + panoptic for ``split`` (``train2017`` / ``val2017``).

    Image i has two stuff regions (top/bottom), a 3-pixel unlabeled column at the left, a "person" and a "car"
    (polygons), and image 0 also a crowd of "person" (uncompressed RLE, iscrowd=1).
    """
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    from panopticapi.utils import id2rgb
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    coco = os.path.join(root, "coco")
    img_dir = os.path.join(coco, split)
    pan_dir = os.path.join(coco, f"panoptic_{split}")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(pan_dir, exist_ok=True)
    stuff_ids = [c["id"] for c in COCO_CATEGORIES if not c["isthing"]]

    images, ins_anns, pan_anns, out = [], [], [], []
    ann_id = 1
    for i in range(num_images):
        image_id = 1000 + i
        stem = f"{image_id:012d}"
        top, bottom = stuff_ids[(2 * i) % len(stuff_ids)], stuff_ids[(2 * i + 1) % len(stuff_ids)]
        labeled = ~_rect(0, H, 0, 3)
        things = [
            (1, [8 + i, 5, 24 + i, 5, 24 + i, 20, 8 + i, 20], False),  # person, polygon
            (3, [30, 26 + i, 50, 26 + i, 50, 42, 30, 42], False),  # car, polygon
        ]
        if i == 0:
            things.append((1, _rect(6, 16, 40, 60), True))  # a crowd of persons, RLE
        segments: list[Segment] = []
        thing_union = np.zeros((H, W), dtype=bool)
        thing_segments, thing_anns = [], []
        for cat, geom, crowd in things:
            if crowd:
                mask = geom & ~thing_union
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                counts = _uncompressed_counts(mask)
                segm = {"counts": counts, "size": [H, W]}
                area = int(mask_util.area(rle))
            else:
                rle = mask_util.merge(mask_util.frPyObjects([geom], H, W))
                mask = mask_util.decode(rle).astype(bool) & ~thing_union
                segm = [[float(v) for v in geom]]
                area = int(mask.sum())
            thing_union |= mask
            seg = Segment(cat, mask, True, crowd, int(rng.integers(1, 2**24)))
            thing_segments.append(seg)
            thing_anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": segm,
                    "area": area,
                    "bbox": _bbox(mask),
                    "iscrowd": int(crowd),
                }
            )
            ann_id += 1
        for cat, region in ((top, _rect(0, H // 2, 0, W)), (bottom, _rect(H // 2, H, 0, W))):
            mask = region & labeled & ~thing_union
            segments.append(Segment(cat, mask, False, False, int(rng.integers(1, 2**24))))
        segments += thing_segments
        _dedupe_ids(segments, rng)

        pan = np.zeros((H, W), dtype=np.int64)
        for s in segments:
            pan[s.mask] = s.segment_id
        Image.fromarray(id2rgb(pan)).save(os.path.join(pan_dir, stem + ".png"))
        Image.fromarray(_photo(segments, H, W, rng)).save(os.path.join(img_dir, stem + ".jpg"), quality=95)

        images.append({"id": image_id, "file_name": stem + ".jpg", "height": H, "width": W})
        ins_anns += thing_anns
        pan_anns.append(
            {
                "image_id": image_id,
                "file_name": stem + ".png",
                "segments_info": [
                    {
                        "id": s.segment_id,
                        "category_id": s.category_id,
                        "iscrowd": int(s.iscrowd),
                        "bbox": _bbox(s.mask),
                        "area": int(s.mask.sum()),
                    }
                    for s in segments
                ],
            }
        )
        out.append(MiniImage(stem, image_id, H, W, segments))

    info = {"description": "mini COCO 2017 for tests", "year": 2017}
    pan_cats = [
        {
            "id": c["id"],
            "name": c["name"],
            "supercategory": "thing" if c["isthing"] else "stuff",
            "isthing": c["isthing"],
            "color": c["color"],
        }
        for c in COCO_CATEGORIES
    ]
    ins_cats = [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in COCO_CATEGORIES if c["isthing"]]
    ann_dir = os.path.join(coco, "annotations")
    _write_json(
        os.path.join(ann_dir, f"instances_{split}.json"),
        {"info": info, "licenses": [], "images": images, "annotations": ins_anns, "categories": ins_cats},
    )
    _write_json(
        os.path.join(ann_dir, f"panoptic_{split}.json"),
        {"info": info, "licenses": [], "images": images, "annotations": pan_anns, "categories": pan_cats},
    )
    return out


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    return counts


def _dedupe_ids(segments: list[Segment], rng: np.random.Generator) -> None:
    seen = set()
    for s in segments:
        while s.segment_id in seen:
            s.segment_id = int(rng.integers(1, 2**24))
        seen.add(s.segment_id)


# --------------------------------------------------------------------------------------------------------- ADE20K
_ADE_SPLIT_PREFIX = {"training": "ADE_train", "validation": "ADE_val"}


def make_ade20k(root: str, split: str = "validation", num_images: int = 2, seed: int = 0) -> list[MiniImage]:
    """ADEChallengeData2016 for ``split`` (``training`` / ``validation``), with ``annotations_instance``.

    ``Segment.category_id`` is the 0-based scene-parsing id (0..149). Image i: "wall" top, "floor" bottom, a 3-pixel
    unlabeled (0) column, one "bed", and two "person" instances. The semantic PNG holds id+1 (0 = ignore).
    """
    from dinat_m2f.data.datasets.ade20k import ADE20K_150_CATEGORIES, ADE20K_THING_IDS

    rng = np.random.default_rng(seed)
    base = os.path.join(root, "ADEChallengeData2016")
    dirs = {k: os.path.join(base, k, split) for k in ("images", "annotations", "annotations_instance")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    instance_class = {sem: k + 1 for k, sem in enumerate(ADE20K_THING_IDS)}  # R channel: 1..100
    wall, floor, bed, person = 0, 3, 7, 12
    out = []
    for i in range(num_images):
        stem = f"{_ADE_SPLIT_PREFIX[split]}_{i + 1:08d}"
        labeled = ~_rect(0, H, 0, 3)
        things = [
            (bed, _rect(28, 44, 6 + i, 30 + i)),
            (person, _rect(4, 22, 34, 42 + i)),
            (person, _rect(10, 30, 48, 60)),
        ]
        union = np.zeros((H, W), dtype=bool)
        thing_segments = []
        for k, (cat, m) in enumerate(things):
            m = m & ~union
            union |= m
            thing_segments.append(Segment(cat, m, True, False, k + 1))
        segments = [
            Segment(wall, _rect(0, H // 2, 0, W) & labeled & ~union, False),
            Segment(floor, _rect(H // 2, H, 0, W) & labeled & ~union, False),
            *thing_segments,
        ]
        sem = np.zeros((H, W), dtype=np.uint8)
        inst = np.zeros((H, W, 3), dtype=np.uint8)
        for s in segments:
            sem[s.mask] = s.category_id + 1
            if s.isthing:
                inst[s.mask, 0] = instance_class[s.category_id]
                inst[s.mask, 1] = s.segment_id
        Image.fromarray(sem).save(os.path.join(dirs["annotations"], stem + ".png"))
        Image.fromarray(inst).save(os.path.join(dirs["annotations_instance"], stem + ".png"))
        Image.fromarray(_photo(segments, H, W, rng)).save(os.path.join(dirs["images"], stem + ".jpg"), quality=95)
        out.append(MiniImage(stem, stem, H, W, segments))

    info = os.path.join(base, "objectInfo150.txt")
    if not os.path.exists(info):
        with open(info, "w") as f:
            f.write("Idx\tRatio\tTrain\tVal\tName\n")
            for c in ADE20K_150_CATEGORIES:
                f.write(f"{c['id'] + 1}\t0.0100\t100\t10\t{c['name']}\n")
    return out


def make_ade20k_full(
    root: str, num_images: dict[str, int] | None = None, seed: int = 0
) -> tuple[list[str], dict[str, list[MiniImage]]]:
    """ADE20K_2021_17_01 (the full ADE20K release): ``images/ADE/<split>/<scene>/*.jpg`` + ``*_seg.png`` and
    ``index_ade20k.pkl`` (``filename``, ``folder``, ``objectnames``, ``objectPresence``).

    The object list has 6 names; "rare thing" (index 5) appears only in training, so a class selection requiring
    presence in both splits drops it. ``Segment.category_id`` is the 0-based index into ``objectnames``.
    Returns (objectnames, {split: images}).
    """
    num_images = num_images or {"training": 2, "validation": 1}
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "ADE20K_2021_17_01")
    names = ["wall", "floor, flooring", "person, individual", "lamp", "sky", "rare thing"]
    filenames, folders, per_split = [], [], {}
    presence_cols = []
    for split, n in num_images.items():
        per_split[split] = []
        for i in range(n):
            stem = f"{_ADE_SPLIT_PREFIX[split]}_{i + 1:08d}"
            folder = os.path.join("ADE20K_2021_17_01", "images", "ADE", split, "home_or_hotel", "bedroom")
            d = os.path.join(root, folder)
            os.makedirs(d, exist_ok=True)
            objs = [(0, _rect(0, H // 2, 3, W)), (1, _rect(H // 2, H, 3, W)), (2, _rect(6, 30, 10, 20 + i))]
            objs.append((3, _rect(30, 40, 40, 50)) if split == "validation" or i else (5, _rect(30, 40, 40, 50)))
            segments = []
            cls = np.zeros((H, W), dtype=np.int64)  # 1-based object index, 0 = unlabeled
            inst = np.zeros((H, W), dtype=np.uint8)
            for k, (obj, m) in enumerate(objs):
                cls[m] = obj + 1
                inst[m] = k + 1
            for obj, _ in objs:
                segments.append(Segment(obj, cls == obj + 1, obj in (2, 3, 5)))
            seg = np.stack([(cls // 256) * 10, cls % 256, inst], axis=-1).astype(np.uint8)
            Image.fromarray(seg).save(os.path.join(d, stem + "_seg.png"))
            Image.fromarray(_photo(segments, H, W, rng)).save(os.path.join(d, stem + ".jpg"), quality=95)
            filenames.append(stem + ".jpg")
            folders.append(folder)
            col = np.zeros(len(names), dtype=np.int64)
            for obj, _ in objs:
                col[obj] += 1
            presence_cols.append(col)
            per_split[split].append(MiniImage(stem, stem, H, W, segments))
    index = {
        "filename": filenames,
        "folder": folders,
        "objectnames": names,
        "objectPresence": np.stack(presence_cols, axis=1),  # [num objects, num images]
    }
    with open(os.path.join(base, "index_ade20k.pkl"), "wb") as f:
        pickle.dump(index, f)
    return names, per_split


# ----------------------------------------------------------------------------------------------------- Cityscapes
def make_cityscapes(
    root: str, split: str = "val", city: str = "frankfurt", num_images: int = 2, seed: int = 0
) -> list[MiniImage]:
    """Cityscapes fine annotations for ``split``: polygons JSON first, then labelIds / instanceIds / color PNGs
    drawn from them by cityscapesscripts (``json2labelImg``, ``json2instanceImg``), as the official files were.

    Objects, back to front: sky, building, road, sidewalk, two cars, a person, and a "cargroup" (a group label:
    semantic "car", no instance id). ``Segment.category_id`` is the Cityscapes labelId; ``segment_id`` the value in
    ``instanceIds`` (labelId*1000+k for instances, labelId for stuff and groups).
    """
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import name2label
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    h, w = H, 2 * H
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(root, "cityscapes", "leftImg8bit", split, city)
    gt_dir = os.path.join(root, "cityscapes", "gtFine", split, city)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)

    def box(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    out = []
    for i in range(num_images):
        stem = f"{city}_{i:06d}_000019"
        objects = [
            ("sky", box(0, 0, w - 1, h // 3)),
            ("building", box(0, h // 3, w - 1, h // 2)),
            ("road", box(0, h // 2, w - 1, h - 1)),
            ("sidewalk", box(0, h - 8, 20, h - 1)),
            ("car", box(30 + i, 20, 50 + i, 34)),
            ("car", box(56, 22, 70, 36)),
            ("person", box(80, 14, 86, 40)),
            ("cargroup", box(2, 26, 12, 34)),
        ]
        poly = {
            "imgHeight": h,
            "imgWidth": w,
            "objects": [{"label": lab, "polygon": p} for lab, p in objects],
        }
        pjson = os.path.join(gt_dir, stem + "_gtFine_polygons.json")
        _write_json(pjson, poly)
        json2labelImg(pjson, os.path.join(gt_dir, stem + "_gtFine_labelIds.png"), "ids")
        json2labelImg(pjson, os.path.join(gt_dir, stem + "_gtFine_color.png"), "color")
        # json2instanceImg saves a mode "I" image, which Pillow >= 10 cannot write as PNG; the official files are
        # 16-bit PNGs, so draw with cityscapesscripts and save the same values as uint16.
        ann = Annotation()
        ann.fromJsonFile(pjson)
        inst_ids = np.asarray(createInstanceImage(ann, "ids"), dtype=np.uint16)
        Image.fromarray(inst_ids).save(os.path.join(gt_dir, stem + "_gtFine_instanceIds.png"))
        ids = np.asarray(Image.open(os.path.join(gt_dir, stem + "_gtFine_instanceIds.png"))).astype(np.int64)
        segments = []
        for v in np.unique(ids):
            label_id = v // 1000 if v >= 1000 else v
            if label_id == 0:
                continue
            lab = next(lb for lb in name2label.values() if lb.id == label_id)
            segments.append(Segment(int(label_id), ids == v, bool(lab.hasInstances and v >= 1000), False, int(v)))
        Image.fromarray(_photo(segments, h, w, rng)).save(os.path.join(img_dir, stem + "_leftImg8bit.png"))
        out.append(MiniImage(stem, stem, h, w, segments))
    return out


# ---------------------------------------------------------------------------------------------- Mapillary Vistas
def make_mapillary_vistas(root: str, split: str = "validation", num_images: int = 2, seed: int = 0) -> list[MiniImage]:
    """Mapillary Vistas v1.2 ``{split}/{images,labels,panoptic}`` with ``panoptic/panoptic_2018.json``.

    ``labels`` PNGs hold the label index 0..64 (65 = unlabeled); panoptic category ids are index + 1.
    ``Segment.category_id`` is the label index. Image i: "Sky" top, "Road" bottom, an unlabeled 3-pixel column,
    two "Car" instances.
    """
    from panopticapi.utils import id2rgb

    from dinat_m2f.data.datasets.mapillary_vistas import MAPILLARY_VISTAS_CATEGORIES

    rng = np.random.default_rng(seed)
    base = os.path.join(root, "mapillary_vistas", split)
    for d in ("images", "labels", "panoptic"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    names = [c["name"] for c in MAPILLARY_VISTAS_CATEGORIES]
    sky, road, car = names.index("Sky"), names.index("Road"), names.index("Car")
    images, anns, out = [], [], []
    for i in range(num_images):
        stem = f"mv{seed}{i:04d}x"
        labeled = ~_rect(0, H, 0, 3)
        cars = [_rect(20, 34, 8 + i, 24 + i) & labeled, _rect(22, 40, 40, 56)]
        union = cars[0] | cars[1]
        segments = [
            Segment(sky, _rect(0, H // 2, 0, W) & labeled & ~union, False, False, 1),
            Segment(road, _rect(H // 2, H, 0, W) & labeled & ~union, False, False, 2),
            Segment(car, cars[0], True, False, 3),
            Segment(car, cars[1], True, False, 4),
        ]
        label = np.full((H, W), 65, dtype=np.uint8)
        pan = np.zeros((H, W), dtype=np.int64)
        for s in segments:
            label[s.mask] = s.category_id
            pan[s.mask] = s.segment_id
        Image.fromarray(label).save(os.path.join(base, "labels", stem + ".png"))
        Image.fromarray(id2rgb(pan)).save(os.path.join(base, "panoptic", stem + ".png"))
        Image.fromarray(_photo(segments, H, W, rng)).save(os.path.join(base, "images", stem + ".jpg"), quality=95)
        images.append({"id": stem, "file_name": stem + ".jpg", "height": H, "width": W})
        anns.append(
            {
                "image_id": stem,
                "file_name": stem + ".png",
                "segments_info": [
                    {
                        "id": s.segment_id,
                        "category_id": s.category_id + 1,
                        "iscrowd": 0,
                        "area": int(s.mask.sum()),
                        "bbox": _bbox(s.mask),
                    }
                    for s in segments
                ],
            }
        )
        out.append(MiniImage(stem, stem, H, W, segments))
    cats = [
        {"id": c["id"], "name": c["name"], "supercategory": "", "isthing": c["isthing"], "color": c["color"]}
        for c in MAPILLARY_VISTAS_CATEGORIES
    ]
    _write_json(
        os.path.join(base, "panoptic", "panoptic_2018.json"),
        {"images": images, "annotations": anns, "categories": cats},
    )
    return out


# ------------------------------------------------------------------------------------------------- COCO-Stuff-10k
def make_coco_stuff_10k(
    root: str, num_images: dict[str, int] | None = None, seed: int = 0
) -> dict[str, list[MiniImage]]:
    """cocostuff-10k-v1.1: ``coco/coco_stuff_10k/{images/*.jpg, annotations/*.mat, imageLists/{train,test}.txt}``.

    Each ``.mat`` holds ``S`` (uint16 HxW, 0 = unlabeled, k = COCO-Stuff class id k). ``Segment.category_id`` is
    that id. Image i: "sky-other" (157) top, "grass" (124) bottom, a "person" (1) and a "dog" (18), an unlabeled
    3-pixel column.
    """
    import scipy.io

    num_images = num_images or {"train": 2, "test": 1}
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "coco", "coco_stuff_10k")
    for d in ("images", "annotations", "imageLists"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    out: dict[str, list[MiniImage]] = {}
    k = 0
    for split, n in num_images.items():
        out[split] = []
        names = []
        for _ in range(n):
            stem = f"COCO_train2014_{k:012d}"
            k += 1
            labeled = ~_rect(0, H, 0, 3)
            person, dog = _rect(6, 30, 10, 20 + k), _rect(28, 44, 36, 58)
            things = person | dog
            segments = [
                Segment(157, _rect(0, H // 2, 0, W) & labeled & ~things, False),
                Segment(124, _rect(H // 2, H, 0, W) & labeled & ~things, False),
                Segment(1, person, True),
                Segment(18, dog, True),
            ]
            label = np.zeros((H, W), dtype=np.uint16)
            for s in segments:
                label[s.mask] = s.category_id
            scipy.io.savemat(os.path.join(base, "annotations", stem + ".mat"), {"S": label})
            Image.fromarray(_photo(segments, H, W, rng)).save(os.path.join(base, "images", stem + ".jpg"), quality=95)
            names.append(stem)
            out[split].append(MiniImage(stem, stem, H, W, segments))
        with open(os.path.join(base, "imageLists", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    return out
