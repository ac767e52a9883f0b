#!/usr/bin/env python
"""What bfloat16 inference (MODEL.MASK_FORMER.TEST.DTYPE) changes: the same model and images run in float32 and in
bfloat16, their outputs compared.

    python tools/compare_inference_dtype.py --config-file CFG --weights W [--dataset NAME] [--max-images N]
        [--dtype bfloat16] [--threads N] [KEY VALUE ...]

Images: the dataset's (default: the config's first test set) in its order. Per image and in total:
- semantic: the share of pixels whose predicted class (argmax of sem_seg) is the same, and the largest difference of
  a class score;
- panoptic: the segments of each run, and how many float32 segments have no bfloat16 segment of the same class with
  IoU > 0.5 (the PQ matching rule) and the other way round ("changed"), the mean IoU of the matched ones, and the
  share of pixels with the same class (void included);
- instances: how many have a score > 0.5 in each run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def panoptic_changes(a: tuple, b: tuple) -> dict:
    """Segments of panoptic results ``a`` and ``b`` ((ids, segments_info)) matched by class and IoU > 0.5."""
    ids_a, info_a = a[0].cpu().numpy(), a[1]
    ids_b, info_b = b[0].cpu().numpy(), b[1]
    ious = []
    unmatched_a = 0
    matched_b = set()
    for sa in info_a:
        mask_a = ids_a == sa["id"]
        best, best_id = 0.0, None
        for sb in info_b:
            if sb["category_id"] != sa["category_id"]:
                continue
            mask_b = ids_b == sb["id"]
            iou = (mask_a & mask_b).sum() / max((mask_a | mask_b).sum(), 1)
            if iou > best:
                best, best_id = float(iou), sb["id"]
        if best > 0.5:
            ious.append(best)
            matched_b.add(best_id)
        else:
            unmatched_a += 1
    classes_a = category_map(ids_a, info_a)
    classes_b = category_map(ids_b, info_b)
    return {
        "segments_float32": len(info_a),
        "segments_other": len(info_b),
        "changed": unmatched_a + len(info_b) - len(matched_b),
        "matched_iou_sum": sum(ious),
        "matched": len(ious),
        "same_class_pixels": int((classes_a == classes_b).sum()),
        "pixels": classes_a.size,
    }


def category_map(ids: np.ndarray, info: list[dict]) -> np.ndarray:
    """The class of every pixel of a panoptic result, -1 for void."""
    lut = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    for s in info:
        lut[s["id"]] = s["category_id"]
    return lut[ids]


def compare(predictor, images: list[np.ndarray], dtype: torch.dtype) -> dict:
    totals: dict = {"images": 0, "same_label_pixels": 0, "pixels": 0, "max_score_diff": 0.0, "seconds": {}}
    panoptic: dict = {}
    instances = {"float32": 0, "other": 0}
    for rgb in images:
        runs = {}
        for name, run_dtype in (("float32", None), ("other", dtype)):
            predictor.model.inference_dtype = run_dtype
            start = time.perf_counter()
            runs[name] = predictor(rgb).raw
            totals["seconds"][name] = totals["seconds"].get(name, 0.0) + time.perf_counter() - start
        ref, other = runs["float32"], runs["other"]
        totals["images"] += 1
        if "sem_seg" in ref:
            if other["sem_seg"].dtype != torch.float32:
                raise RuntimeError(f"sem_seg of the {dtype} run is {other['sem_seg'].dtype}, not float32")
            same = ref["sem_seg"].argmax(0) == other["sem_seg"].argmax(0)
            totals["same_label_pixels"] += int(same.sum())
            totals["pixels"] += same.numel()
            diff = (ref["sem_seg"] - other["sem_seg"]).abs().max().item()
            totals["max_score_diff"] = max(totals["max_score_diff"], diff)
        if "panoptic_seg" in ref:
            for k, v in panoptic_changes(ref["panoptic_seg"], other["panoptic_seg"]).items():
                panoptic[k] = panoptic.get(k, 0) + v
        if "instances" in ref:
            instances["float32"] += int((ref["instances"].scores > 0.5).sum())
            instances["other"] += int((other["instances"].scores > 0.5).sum())
    predictor.model.inference_dtype = None
    result = {"dtype": str(dtype).removeprefix("torch."), "images": totals["images"]}
    result["seconds"] = {k: round(v, 2) for k, v in totals["seconds"].items()}
    if totals["pixels"]:
        result["semantic_same_label_share"] = totals["same_label_pixels"] / totals["pixels"]
        result["semantic_max_score_diff"] = totals["max_score_diff"]
    if panoptic:
        result["panoptic"] = {
            "segments_float32": panoptic["segments_float32"],
            "segments_other": panoptic["segments_other"],
            "changed": panoptic["changed"],
            "matched_mean_iou": panoptic["matched_iou_sum"] / max(panoptic["matched"], 1),
            "same_class_pixel_share": panoptic["same_class_pixels"] / panoptic["pixels"],
        }
    result["instances_score_over_0.5"] = instances
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--dataset", default=None, help="a registered dataset (default: the config's first test set)")
    parser.add_argument("--max-images", type=int, default=0, help="0: all")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from detectron2.data import DatasetCatalog

    from dinat_m2f import Predictor
    from dinat_m2f.predictor import read_image

    predictor = Predictor(args.config_file, weights=args.weights, device="cpu", dtype="float32", opts=args.opts)
    name = args.dataset or predictor.cfg.DATASETS.TEST[0]
    dicts = DatasetCatalog.get(name)
    if args.max_images:
        dicts = dicts[: args.max_images]
    images = [read_image(d["file_name"]) for d in dicts]
    result = compare(predictor, images, getattr(torch, args.dtype))
    result.update(config=args.config_file, weights=args.weights, dataset=name, threads=torch.get_num_threads())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
