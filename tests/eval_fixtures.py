"""Helpers of the evaluation tests: ground truth in the official evaluation formats, model outputs, registrations.

The mini datasets come from ``mini_datasets.py``; this module writes the few evaluation files the preparation
scripts would (COCO-panoptic json + PNGs, COCO instance json, detectron2 semantic PNGs), turns the ground truth
into model outputs (perfect, or corrupted in a known way), and registers throw-away dataset names.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
from collections.abc import Callable, Iterable

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from mini_datasets import MiniImage, Segment
from PIL import Image

_names = itertools.count()


def register(prefix: str, dicts: list[dict], **metadata) -> str:
    """Register ``dicts`` under a fresh name (so tests never collide) and return the name."""
    name = f"{prefix}__test{next(_names)}"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(**metadata)
    return name


def bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


# ------------------------------------------------------------------------------------------------ ground truth
def write_panoptic_gt(
    root: str, name: str, images: list[MiniImage], categories: list[dict], category_of: Callable[[Segment], int]
) -> tuple[str, str]:
    """COCO-panoptic ``{root}/{name}.json`` + ``{root}/{name}/*.png``; segment ids 1..n per image."""
    from panopticapi.utils import id2rgb

    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    annotations, image_infos = [], []
    for img in images:
        pan = np.zeros((img.height, img.width), dtype=np.int64)
        infos = []
        for k, s in enumerate(img.segments, start=1):
            pan[s.mask] = k
            infos.append(
                {
                    "id": k,
                    "category_id": category_of(s),
                    "iscrowd": int(s.iscrowd),
                    "bbox": bbox(s.mask),
                    "area": int(s.mask.sum()),
                }
            )
        Image.fromarray(id2rgb(pan)).save(os.path.join(folder, img.stem + ".png"))
        annotations.append({"image_id": img.image_id, "file_name": img.stem + ".png", "segments_info": infos})
        image_infos.append(
            {"id": img.image_id, "file_name": img.stem + ".jpg", "height": img.height, "width": img.width}
        )
    path = os.path.join(root, name + ".json")
    with open(path, "w") as f:
        json.dump({"images": image_infos, "annotations": annotations, "categories": categories}, f)
    return path, folder


def write_instances_gt(
    path: str, images: list[MiniImage], categories: list[dict], category_of: Callable[[Segment], int]
) -> str:
    """COCO instance json of the thing segments (RLE masks), image ids as in ``images``."""
    anns, infos = [], []
    for img in images:
        infos.append({"id": img.image_id, "file_name": img.stem + ".jpg", "height": img.height, "width": img.width})
        for s in img.segments:
            if s.isthing:
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": img.image_id,
                        "category_id": category_of(s),
                        "segmentation": rle(s.mask),
                        "area": int(s.mask.sum()),
                        "bbox": bbox(s.mask),
                        "iscrowd": int(s.iscrowd),
                    }
                )
    with open(path, "w") as f:
        json.dump({"images": infos, "annotations": anns, "categories": categories}, f)
    return path


# ------------------------------------------------------------------------------------------------ model outputs
def panoptic_output(img: MiniImage, contiguous_of: Callable[[Segment], int], segments: Iterable[Segment] | None = None):
    """``{"panoptic_seg": (ids HxW int32, segments_info)}`` as Mask2Former returns it (contiguous ids, isthing)."""
    segments = img.segments if segments is None else list(segments)
    pan = torch.zeros((img.height, img.width), dtype=torch.int32)
    infos = []
    for k, s in enumerate(segments, start=1):
        pan[torch.as_tensor(s.mask)] = k
        infos.append({"id": k, "category_id": contiguous_of(s), "isthing": s.isthing})
    return {"panoptic_seg": (pan, infos)}


def instances_output(h: int, w: int, masks: list[np.ndarray], classes: list[int], scores: list[float]) -> dict:
    """``{"instances": Instances}`` as Mask2Former returns it (boxes are zero: only mask AP is meaningful)."""
    inst = Instances((h, w))
    inst.pred_masks = torch.as_tensor(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.bool)
    inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64)
    inst.scores = torch.as_tensor(scores, dtype=torch.float32)
    inst.pred_boxes = Boxes(torch.zeros((len(masks), 4)))
    return {"instances": inst}


def sem_seg_output(labels: np.ndarray, num_classes: int) -> dict:
    """``{"sem_seg": C x H x W scores}`` whose argmax is ``labels`` (values outside 0..C-1 become class 0)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    labels = torch.where((labels >= 0) & (labels < num_classes), labels, torch.zeros_like(labels))
    return {"sem_seg": torch.nn.functional.one_hot(labels, num_classes).permute(2, 0, 1).float()}


def run(evaluator, inputs: list[dict], outputs: list[dict]):
    """detectron2's evaluation loop, one image per batch."""
    evaluator.reset()
    for x, y in zip(inputs, outputs):
        evaluator.process([x], [y])
    return evaluator.evaluate()


# ------------------------------------------------------------------------------------------------ references
def pq_directly(
    gt_json: str,
    gt_folder: str,
    images: list[MiniImage],
    outputs: list[dict],
    to_dataset_id,
    folder: str,
    *,
    lib: str = "panopticapi",
) -> dict:
    """PQ of ``outputs`` from panopticapi's ``pq_compute`` (or cityscapesscripts' ``evaluatePanoptic``) called
    directly on prediction files written here, independently of the evaluators. ``to_dataset_id(category_id,
    isthing)`` maps the outputs' contiguous ids to the json's category ids."""
    from panopticapi.utils import id2rgb

    os.makedirs(folder, exist_ok=True)
    anns = []
    for im, out in zip(images, outputs):
        pan, infos = out["panoptic_seg"]
        png = im.stem + ".png"
        Image.fromarray(id2rgb(pan.numpy())).save(os.path.join(folder, png))
        segs = [{"id": s["id"], "category_id": to_dataset_id(s["category_id"], s["isthing"])} for s in infos]
        anns.append({"image_id": im.image_id, "file_name": png, "segments_info": segs})
    with open(gt_json) as f:
        pred = json.load(f)
    pred["annotations"] = anns
    pred_json = folder + ".json"
    with open(pred_json, "w") as f:
        json.dump(pred, f)
    with contextlib.redirect_stdout(io.StringIO()):
        if lib == "panopticapi":
            from panopticapi.evaluation import pq_compute

            res = pq_compute(gt_json, pred_json, gt_folder, folder)
        else:
            from cityscapesscripts.evaluation.evalPanopticSemanticLabeling import evaluatePanoptic

            res = evaluatePanoptic(gt_json, gt_folder, pred_json, folder, folder + "_results.json")
    return {
        key + suffix: 100 * res[group][key.lower()]
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st"))
        for key in ("PQ", "SQ", "RQ")
    }


def pycocotools_segm(json_file: str, images: list[MiniImage], outputs: list[dict], to_dataset_id) -> np.ndarray:
    """[AP, AP50, AP75, APs, APm, APl] of ``outputs`` from pycocotools' COCOeval called directly (NaN for -1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = []
    for im, out in zip(images, outputs):
        inst = out["instances"]
        for m, c, sc in zip(inst.pred_masks.numpy(), inst.pred_classes.tolist(), inst.scores.tolist()):
            results.append(
                {"image_id": im.image_id, "category_id": to_dataset_id(c), "segmentation": rle(m), "score": sc}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        ev = COCOeval(gt, gt.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats[:6] * 100
    return np.where(stats >= 0, stats, np.nan)  # detectron2 reports "cannot compute" (-1) as NaN


def miou_by_hand(gts: list[np.ndarray], preds: list[np.ndarray], ignore: int = 255) -> float:
    """mIoU over the classes present in ground truth or prediction (on non-ignored pixels), in percent."""
    gt = np.concatenate([g.ravel() for g in gts])
    pred = np.concatenate([p.ravel() for p in preds])
    valid = gt != ignore
    gt, pred = gt[valid], pred[valid]
    ious = []
    for c in np.union1d(np.unique(gt), np.unique(pred)):
        tp = np.sum((gt == c) & (pred == c))
        union = np.sum((gt == c) | (pred == c))
        ious.append(tp / union)
    return 100 * float(np.mean(ious))
