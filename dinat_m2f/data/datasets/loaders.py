"""Dataset-dict loaders that fail loudly: a missing file is named, never silently dropped.

detectron2's ``load_sem_seg`` keeps the intersection of images and labels when their counts differ (a warning in
the log); these loaders raise instead, naming the first unmatched files.
"""

from __future__ import annotations

import json
import os

from dinat_m2f.data.datasets._common import DatasetFileError, invalid_json_message, load_json, require_path

__all__ = ["load_sem_seg_strict", "load_panoptic_json", "load_coco_json_checked", "load_coco_instances_mapped"]


def _stems(folder: str, ext: str) -> dict[str, str]:
    """``{relative path without extension: full path}`` of the files ending in ``.ext`` under ``folder``."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith("." + ext):
                full = os.path.join(dirpath, f)
                out[os.path.relpath(full, folder)[: -len(ext) - 1]] = full
    return out


def load_sem_seg_strict(
    gt_root: str, image_root: str, gt_ext: str = "png", image_ext: str = "jpg", prepare_hint: str = ""
) -> list[dict]:
    """Pair every image under ``image_root`` with its label under ``gt_root`` (same relative name).

    Raises FileNotFoundError naming the folder if either is missing or empty, and naming the files if an image has
    no label or a label has no image.
    """
    require_path(image_root)
    require_path(gt_root, prepare_hint)
    images = _stems(image_root, image_ext)
    labels = _stems(gt_root, gt_ext)
    if not images:
        raise FileNotFoundError(f"No *.{image_ext} images found in {image_root}")
    no_label = sorted(set(images) - set(labels))
    if no_label:
        missing = [os.path.join(gt_root, s + "." + gt_ext) for s in no_label[:5]]
        raise FileNotFoundError(f"{len(no_label)} image(s) in {image_root} have no label; missing e.g. {missing}")
    no_image = sorted(set(labels) - set(images))
    if no_image:
        missing = [os.path.join(image_root, s + "." + image_ext) for s in no_image[:5]]
        raise FileNotFoundError(f"{len(no_image)} label(s) in {gt_root} have no image; missing e.g. {missing}")
    return [{"file_name": images[s], "sem_seg_file_name": labels[s]} for s in sorted(images)]


def _convert_segment(seg: dict, meta: dict, json_file: str) -> dict:
    seg = dict(seg)
    cat = seg["category_id"]
    if cat in meta["thing_dataset_id_to_contiguous_id"]:
        seg["category_id"] = meta["thing_dataset_id_to_contiguous_id"][cat]
        seg["isthing"] = True
    elif cat in meta["stuff_dataset_id_to_contiguous_id"]:
        seg["category_id"] = meta["stuff_dataset_id_to_contiguous_id"][cat]
        seg["isthing"] = False
    else:
        raise ValueError(f"{json_file}: segment {seg.get('id')} has unknown category_id {cat}")
    return seg


def _check_categories(categories: list[dict], meta: dict, json_file: str) -> None:
    """The JSON's own ``isthing`` flags must agree with the registered thing ids (else PQ-things would be wrong)."""
    things = meta["thing_dataset_id_to_contiguous_id"]
    wrong = [c["id"] for c in categories if "isthing" in c and bool(c["isthing"]) != (c["id"] in things)]
    if wrong:
        raise ValueError(f"{json_file}: categories {wrong} disagree with the registered thing/stuff split")


def load_panoptic_json(
    json_file: str,
    image_dir: str,
    panoptic_dir: str,
    meta: dict,
    sem_seg_dir: str | None = None,
    image_ext: str = ".jpg",
    prepare_hint: str = "",
    sem_seg_hint: str = "",
) -> list[dict]:
    """Load a COCO-format panoptic JSON into detectron2 dicts with contiguous ``category_id`` and ``isthing``.

    ``meta`` holds ``thing_dataset_id_to_contiguous_id`` / ``stuff_dataset_id_to_contiguous_id``. With
    ``sem_seg_dir``, each dict also gets ``sem_seg_file_name`` (``<sem_seg_dir>/<stem>.png``). Images are named
    after the annotation PNG's stem with ``image_ext``, as in COCO, ADE20K and Mapillary. ``prepare_hint`` /
    ``sem_seg_hint`` say how to make a missing JSON + panoptic folder / semantic folder.
    """
    require_path(json_file, prepare_hint)
    require_path(image_dir)
    require_path(panoptic_dir, prepare_hint)
    if sem_seg_dir is not None:
        require_path(sem_seg_dir, sem_seg_hint)
    info = load_json(json_file, prepare_hint)
    _check_categories(info.get("categories", []), meta, json_file)
    ret = []
    for ann in info["annotations"]:
        stem = os.path.splitext(ann["file_name"])[0]
        record = {
            "file_name": os.path.join(image_dir, stem + image_ext),
            "image_id": ann["image_id"],  # kept as in the JSON (int for COCO, file stem for ADE20K)
            "pan_seg_file_name": os.path.join(panoptic_dir, ann["file_name"]),
            "segments_info": [_convert_segment(s, meta, json_file) for s in ann["segments_info"]],
        }
        if sem_seg_dir is not None:
            record["sem_seg_file_name"] = os.path.join(sem_seg_dir, stem + ".png")
        ret.append(record)
    if not ret:
        raise FileNotFoundError(f"{json_file} lists no annotations")
    # Check the first record's files exist (as detectron2 does): a wrong root fails here, not mid-training.
    hints = {"file_name": "", "pan_seg_file_name": prepare_hint, "sem_seg_file_name": sem_seg_hint}
    for key, hint in hints.items():
        if key in ret[0]:
            require_path(ret[0][key], hint)
    return ret


def load_coco_json_checked(json_file: str, image_root: str, dataset_name: str | None = None, **kwargs) -> list[dict]:
    """detectron2's ``load_coco_json``, with a missing or truncated JSON named (pycocotools' parse error is not)."""
    from detectron2.data.datasets.coco import load_coco_json

    try:
        return load_coco_json(require_path(json_file), require_path(image_root), dataset_name, **kwargs)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFileError(invalid_json_message(json_file, e)) from e


def load_coco_instances_mapped(json_file: str, image_root: str, meta: dict, prepare_hint: str = "") -> list[dict]:
    """COCO-format instances with ``category_id`` mapped through ``meta["thing_dataset_id_to_contiguous_id"]``.

    Unlike ``load_coco_json(..., dataset_name)``, the class names of the JSON are not written into the registered
    metadata, so a JSON whose names are spelled differently (e.g. made by Mask2Former's script from ADE20K's
    ``imgCatIds.json``) still loads; an id outside the registered classes raises, naming the file.
    """
    dicts = load_coco_json_checked(require_path(json_file, prepare_hint), image_root)
    id_map = meta["thing_dataset_id_to_contiguous_id"]
    for d in dicts:
        for ann in d.get("annotations", []):
            if ann["category_id"] not in id_map:
                raise ValueError(f"{json_file}: category_id {ann['category_id']} is not a registered thing class")
            ann["category_id"] = id_map[ann["category_id"]]
    return dicts
