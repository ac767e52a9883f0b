"""The built-in synthetic panoptic dataset: shapes of four thing classes over three textured stuff regions.

Generated deterministically (numpy seeded per image) on first use under ``<datasets root>/synthetic/``, in the same
formats as COCO so the real loaders, mappers and evaluators run on it unchanged::

    synthetic/
      images/{train,val}/<id>.jpg                  RGB images
      panoptic_{train,val}.json, panoptic_{train,val}/<id>.png     COCO panoptic (rgb2id PNGs)
      panoptic_semseg_{train,val}/<id>.png         semantic labels, contiguous ids (255 = ignore)
      instances_{train,val}.json                   COCO instances (thing classes, RLE masks)
      spec.json                                    what was generated (sizes, counts, version)

Registered names (like COCO's): ``synthetic_panoptic_{train,val}`` (+ ``_with_sem_seg``), ``synthetic_instance_{train,
val}`` and ``synthetic_sem_seg_{train,val}``. Run ``python -m dinat_m2f.data.synthetic`` to generate it explicitly.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
from detectron2.data.datasets.coco import load_coco_json
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json
from PIL import Image
from pycocotools import mask as mask_util

from dinat_m2f.data.datasets._common import dataset_root, register_dataset
from dinat_m2f.utils.file_io import make_temp_dir_beside

__all__ = [
    "CATEGORIES",
    "SyntheticSpec",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
    "register_all_synthetic",
    "synthetic_metadata",
]

GENERATOR_VERSION = 1
# Things first (so thing contiguous ids are 0..3, like COCO), then stuff. "color" is the mean RGB.
CATEGORIES: list[dict] = [
    {"id": 1, "name": "disc", "isthing": 1, "color": [220, 50, 50]},
    {"id": 2, "name": "square", "isthing": 1, "color": [40, 70, 220]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [240, 200, 30]},
    {"id": 4, "name": "cross", "isthing": 1, "color": [170, 40, 200]},
    {"id": 5, "name": "sky", "isthing": 0, "color": [150, 200, 240]},
    {"id": 6, "name": "grass", "isthing": 0, "color": [60, 150, 60]},
    {"id": 7, "name": "sand", "isthing": 0, "color": [200, 170, 120]},
]
THINGS = [c for c in CATEGORIES if c["isthing"]]
SKY, GRASS, SAND = 5, 6, 7
MIN_VISIBLE_AREA_FRACTION = 0.004  # instances more occluded than this are dropped (and painted as what covers them)


@dataclass(frozen=True)
class SyntheticSpec:
    num_train: int = 300
    num_val: int = 50
    size: int = 256
    seed: int = 0
    version: int = GENERATOR_VERSION


# ---------------------------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------------------------
def _stuff_texture(cat_id: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 float texture characteristic of a stuff class (gradient sky, noisy grass, striped sand)."""
    base = np.array(CATEGORIES[cat_id - 1]["color"], dtype=np.float32) + rng.uniform(-15, 15, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if cat_id == SKY:
        tex = base + (yy / h)[..., None] * np.array([40.0, 30.0, 10.0]) - 20.0
    elif cat_id == GRASS:
        tex = base + rng.normal(0, 18, (h, w, 1)) * np.array([0.5, 1.0, 0.5])
    else:
        period = rng.uniform(6, 12)
        phase = rng.uniform(0, 2 * np.pi)
        tex = base + (12 * np.sin((xx + 0.5 * yy) * 2 * np.pi / period + phase))[..., None]
    return tex


def _thing_mask(cat_id: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of one thing of class ``cat_id`` at a random place and size."""
    s = min(h, w)
    r = rng.uniform(0.08, 0.2) * s
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if cat_id == 1:  # disc
        return dy**2 + dx**2 <= r**2
    if cat_id == 2:  # square, rotated
        a = rng.uniform(0, np.pi / 2)
        u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    if cat_id == 3:  # triangle, rotated: inside three half-planes
        a = rng.uniform(0, 2 * np.pi)
        inside = np.ones((h, w), dtype=bool)
        for k in range(3):
            t = a + k * 2 * np.pi / 3
            inside &= dx * np.cos(t) + dy * np.sin(t) <= 0.5 * r * 1.2
        return inside
    # cross (plus sign), rotated
    a = rng.uniform(0, np.pi / 2)
    u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
    arm = 0.33 * r
    return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))


def _stuff_layout(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """HxW dataset category ids: sky above a wavy horizon, grass and/or sand below (maybe split by a wavy line)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = rng.uniform(0.25, 0.6) * h + rng.uniform(3, 0.08 * h) * np.sin(xx / w * 2 * np.pi * rng.uniform(0.5, 2))
    layout = np.where(yy < horizon, SKY, GRASS).astype(np.int32)
    r = rng.random()
    if r < 0.3:
        layout[layout == GRASS] = SAND
    elif r < 0.7:
        split = rng.uniform(0.3, 0.7) * w + rng.uniform(2, 0.06 * w) * np.sin(yy / h * 2 * np.pi * rng.uniform(0.5, 2))
        layout[(layout == GRASS) & (xx > split)] = SAND
    return layout


def render_sample(index: int, split_seed: int, size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(image HxWx3 uint8, segment-id map HxW int32, segments [{id, category_id}]) of one sample."""
    rng = np.random.default_rng([split_seed, index])
    h = w = size
    layout = _stuff_layout(h, w, rng)
    image = np.zeros((h, w, 3), dtype=np.float32)
    for cat_id in (SKY, GRASS, SAND):
        region = layout == cat_id
        if region.any():
            image[region] = _stuff_texture(cat_id, h, w, rng)[region]
    # panoptic ids: stuff segments first, then things painted in order (later ones occlude earlier ones)
    seg_ids = np.zeros((h, w), dtype=np.int32)
    segments: list[dict] = []
    for cat_id in (SKY, GRASS, SAND):
        if (layout == cat_id).any():
            segments.append({"id": len(segments) + 1, "category_id": cat_id})
            seg_ids[layout == cat_id] = segments[-1]["id"]
    for _ in range(int(rng.integers(1, 6))):
        cat = THINGS[int(rng.integers(len(THINGS)))]
        same_class = np.isin(seg_ids, [s["id"] for s in segments if s["category_id"] == cat["id"]])
        for _ in range(10):  # same-class things do not touch (they would be one blob); other classes may occlude
            mask = _thing_mask(cat["id"], h, w, rng)
            if not (mask & same_class).any():
                break
        else:
            continue
        color = np.array(cat["color"], dtype=np.float32) + rng.uniform(-25, 25, 3)
        shade = 1.0 + 0.15 * (np.mgrid[0:h, 0:w][0] / h - 0.5)[..., None]  # a little vertical shading
        image[mask] = (color * shade)[mask]
        segments.append({"id": len(segments) + 1, "category_id": cat["id"]})
        seg_ids[mask] = segments[-1]["id"]
    image += rng.normal(0, 4, image.shape)  # sensor noise
    # drop things that ended up (almost) hidden: they take the label of what is underneath/over them
    min_area = MIN_VISIBLE_AREA_FRACTION * h * w
    kept = []
    for seg in segments:
        area = int((seg_ids == seg["id"]).sum())
        if area == 0:
            continue
        if seg["category_id"] <= len(THINGS) and area < min_area:
            under = layout[seg_ids == seg["id"]]
            stuff_id = {s["category_id"]: s["id"] for s in segments if s["category_id"] > len(THINGS)}
            seg_ids[seg_ids == seg["id"]] = [stuff_id[c] for c in under]
            continue
        kept.append(seg)
    return np.clip(image, 0, 255).astype(np.uint8), seg_ids, kept


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_split(root: str, split: str, count: int, seed: int, size: int) -> None:
    img_dir = os.path.join(root, "images", split)
    pan_dir = os.path.join(root, f"panoptic_{split}")
    sem_dir = os.path.join(root, f"panoptic_semseg_{split}")
    for d in (img_dir, pan_dir, sem_dir):
        os.makedirs(d, exist_ok=True)
    contiguous = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    images, pan_anns, inst_anns = [], [], []
    for i in range(count):
        image, seg_ids, segments = render_sample(i, seed, size)
        image_id = i + 1
        stem = f"{image_id:06d}"
        Image.fromarray(image).save(os.path.join(img_dir, stem + ".jpg"), quality=95)
        rgb = np.stack([seg_ids % 256, seg_ids // 256 % 256, seg_ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(pan_dir, stem + ".png"))
        sem = np.full(seg_ids.shape, 255, dtype=np.uint8)
        segments_info = []
        for seg in segments:
            mask = seg_ids == seg["id"]
            sem[mask] = contiguous[seg["category_id"]]
            area, bbox = int(mask.sum()), _bbox(mask)
            segments_info.append(
                {"id": seg["id"], "category_id": seg["category_id"], "area": area, "bbox": bbox, "iscrowd": 0}
            )
            if seg["category_id"] <= len(THINGS):
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                inst_anns.append(
                    {
                        "id": len(inst_anns) + 1,
                        "image_id": image_id,
                        "category_id": seg["category_id"],
                        "segmentation": rle,
                        "area": area,
                        "bbox": bbox,
                        "iscrowd": 0,
                    }
                )
        Image.fromarray(sem).save(os.path.join(sem_dir, stem + ".png"))
        images.append({"id": image_id, "file_name": stem + ".jpg", "height": size, "width": size})
        pan_anns.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": segments_info})
    categories = [
        {k: c[k] for k in ("id", "name", "isthing", "color")} | {"supercategory": "shape"} for c in CATEGORIES
    ]
    with open(os.path.join(root, f"panoptic_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": pan_anns, "categories": categories}, f)
    thing_cats = [c for c in categories if c["isthing"]]
    with open(os.path.join(root, f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": inst_anns, "categories": thing_cats}, f)


def generate_synthetic_dataset(root: str, spec: SyntheticSpec = SyntheticSpec()) -> str:
    """Write the dataset to ``root`` (replacing what is there) and return ``root``.

    Writes into a temporary sibling folder and renames it into place, so an interrupted run leaves no half dataset.
    """
    tmp = make_temp_dir_beside(root)
    try:
        _write_split(tmp, "train", spec.num_train, spec.seed * 2 + 0, spec.size)
        _write_split(tmp, "val", spec.num_val, spec.seed * 2 + 1, spec.size)
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(asdict(spec), f)
        if os.path.exists(root):
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def read_spec(root: str) -> SyntheticSpec | None:
    try:
        with open(os.path.join(root, "spec.json")) as f:
            return SyntheticSpec(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def ensure_synthetic_dataset(root: str, spec: SyntheticSpec | None = None) -> str:
    """Generate the dataset at ``root`` unless it is there already (with ``spec``, if given). Process-safe."""
    existing = read_spec(root)
    if existing is not None and (spec is None or existing == spec):
        return root
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"dinat_m2f-synthetic-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other processes wait here, then find it generated
        existing = read_spec(root)
        if existing is None or (spec is not None and existing != spec):
            generate_synthetic_dataset(root, spec or SyntheticSpec())
    return root


# ---------------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------------
def synthetic_metadata() -> dict:
    """Metadata in Mask2Former's COCO-panoptic convention (stuff_* covers all classes, thing_* the things)."""
    return {
        "thing_classes": [c["name"] for c in THINGS],
        "thing_colors": [c["color"] for c in THINGS],
        "stuff_classes": [c["name"] for c in CATEGORIES],
        "stuff_colors": [c["color"] for c in CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(CATEGORIES) if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(CATEGORIES)},
    }


def register_all_synthetic(datasets_root: str | None = None) -> None:
    """Register the synthetic dataset names for ``<datasets_root>/synthetic`` (generated when first loaded)."""
    root = os.path.join(dataset_root(datasets_root), "synthetic")
    meta = synthetic_metadata()
    for split in ("train", "val"):
        image_root = os.path.join(root, "images", split)
        pan_root = os.path.join(root, f"panoptic_{split}")
        pan_json = os.path.join(root, f"panoptic_{split}.json")
        sem_root = os.path.join(root, f"panoptic_semseg_{split}")
        inst_json = os.path.join(root, f"instances_{split}.json")

        def load_panoptic(image_root=image_root, pan_root=pan_root, pan_json=pan_json, sem_root=None):
            ensure_synthetic_dataset(root)
            dicts = load_coco_panoptic_json(pan_json, image_root, pan_root, meta)
            if sem_root is not None:
                for d in dicts:
                    stem = os.path.splitext(os.path.basename(d["pan_seg_file_name"]))[0]
                    d["sem_seg_file_name"] = os.path.join(sem_root, stem + ".png")
            return dicts

        def load_instances(inst_json=inst_json, image_root=image_root, name=f"synthetic_instance_{split}"):
            ensure_synthetic_dataset(root)
            return load_coco_json(inst_json, image_root, name)

        def load_sem_seg(image_root=image_root, sem_root=sem_root, pan_json=pan_json):
            ensure_synthetic_dataset(root)
            with open(pan_json) as f:
                images = json.load(f)["images"]
            return [
                {
                    "file_name": os.path.join(image_root, im["file_name"]),
                    "sem_seg_file_name": os.path.join(sem_root, os.path.splitext(im["file_name"])[0] + ".png"),
                    "height": im["height"],
                    "width": im["width"],
                }
                for im in images
            ]

        common = {"image_root": image_root, "ignore_label": 255, **meta}
        panoptic = {
            "panoptic_root": pan_root,
            "panoptic_json": pan_json,
            "json_file": inst_json,
            "sem_seg_root": sem_root,
            "label_divisor": 1000,
            "evaluator_type": "coco_panoptic_seg",
        }
        register_dataset(f"synthetic_panoptic_{split}", load_panoptic, **common, **panoptic)
        register_dataset(
            f"synthetic_panoptic_{split}_with_sem_seg",
            lambda load=load_panoptic, sem_root=sem_root: load(sem_root=sem_root),
            **common,
            **panoptic,
        )
        inst_meta = {
            "thing_classes": meta["thing_classes"],
            "thing_colors": meta["thing_colors"],
            "thing_dataset_id_to_contiguous_id": meta["thing_dataset_id_to_contiguous_id"],
        }
        register_dataset(
            f"synthetic_instance_{split}",
            load_instances,
            image_root=image_root,
            json_file=inst_json,
            evaluator_type="coco",
            **inst_meta,
        )
        register_dataset(
            f"synthetic_sem_seg_{split}",
            load_sem_seg,
            image_root=image_root,
            sem_seg_root=sem_root,
            ignore_label=255,
            evaluator_type="sem_seg",
            stuff_classes=meta["stuff_classes"],
            stuff_colors=meta["stuff_colors"],
        )


register_all_synthetic()


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic panoptic dataset.")
    parser.add_argument("--root", default=os.path.join(dataset_root(), "synthetic"))
    parser.add_argument("--num-train", type=int, default=SyntheticSpec.num_train)
    parser.add_argument("--num-val", type=int, default=SyntheticSpec.num_val)
    parser.add_argument("--size", type=int, default=SyntheticSpec.size)
    parser.add_argument("--seed", type=int, default=SyntheticSpec.seed)
    args = parser.parse_args()
    spec = SyntheticSpec(args.num_train, args.num_val, args.size, args.seed)
    ensure_synthetic_dataset(args.root, spec)
    print(f"synthetic dataset at {args.root}: {spec}")


if __name__ == "__main__":
    main()
