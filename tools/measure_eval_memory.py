#!/usr/bin/env python
"""Peak memory of the instance (COCO mask AP) and semantic evaluators over N synthetic predictions.

    python tools/measure_eval_memory.py [--num-images 1000] [--evaluators instance semantic]

Each evaluator runs in a fresh process (so peaks do not mix) that registers a synthetic dataset, then feeds N
images through ``reset / process / evaluate`` as ``inference_on_dataset`` does (cycling through 4 pre-made
predictions, which the evaluator converts afresh for each image). Predictions look like an
untrained Mask2Former's: 100 blobby instance masks of 480x640 per image (thresholded, upsampled low-resolution
noise: ~0.3 MB of RLE per image), or a 512x512 semantic map of blobs of 20 of 150 classes. Reported, in MiB: the
resident memory after setup, its peak while processing (sampled after every image), and the peak of the whole
run including ``evaluate()`` (Linux VmHWM, reset after setup through /proc/self/clear_refs where allowed; else
the process peak, ru_maxrss).

Run it against another checkout by putting that checkout first on PYTHONPATH (the script imports
``dinat_m2f.evaluation`` from there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

H, W = 480, 640
NUM_INSTANCES = 100
NUM_THINGS = 10
SEM_SIZE, SEM_CLASSES = 512, 150
POOL_SIZE = 4


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _blob_masks(rng, n: int, h: int, w: int, coarse: tuple[int, int] = (6, 8)):
    import torch

    noise = torch.as_tensor(rng.standard_normal((n, 1, *coarse)), dtype=torch.float32) - 0.8
    return torch.nn.functional.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0


def _register_instances(root: str, n: int, pool: list[dict]) -> tuple[str, list[dict]]:
    """Ground truth of image i: 3 of the masks predicted for it (so the AP is not 0), with the predicted class."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from pycocotools import mask as mask_util

    images, anns = [], []
    for i in range(n):
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": H, "width": W})
        predicted = pool[i % len(pool)]["instances"]
        for m, c in zip(predicted.pred_masks[i % 7 : i % 7 + 3].numpy(), predicted.pred_classes[i % 7 : i % 7 + 3]):
            if not m.any():
                continue
            r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            box = [float(v) for v in mask_util.toBbox(r)]
            r["counts"] = r["counts"].decode("ascii")
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                 "segmentation": r, "area": int(m.sum()), "bbox": box, "iscrowd": 0}
            )  # fmt: skip
    categories = [{"id": k, "name": f"thing{k}"} for k in range(1, NUM_THINGS + 1)]
    json_file = os.path.join(root, "instances.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    inputs = [
        {"image_id": i + 1, "file_name": os.path.join(root, f"{i}.jpg"), "height": H, "width": W} for i in range(n)
    ]
    DatasetCatalog.register("memory_instances", lambda: inputs)
    MetadataCatalog.get("memory_instances").set(
        json_file=json_file,
        thing_classes=[c["name"] for c in categories],
        thing_dataset_id_to_contiguous_id={k: k - 1 for k in range(1, NUM_THINGS + 1)},
    )
    return "memory_instances", inputs


def _instance_output(rng) -> dict:
    import torch
    from detectron2.structures import Boxes, Instances

    inst = Instances((H, W))
    inst.pred_masks = _blob_masks(rng, NUM_INSTANCES, H, W)
    inst.pred_boxes = Boxes(torch.zeros((NUM_INSTANCES, 4)))  # Mask2Former's zero boxes
    inst.scores = torch.as_tensor(rng.random(NUM_INSTANCES), dtype=torch.float32)
    inst.pred_classes = torch.as_tensor(rng.integers(0, NUM_THINGS, NUM_INSTANCES))
    return {"instances": inst}


def _register_semantic(root: str, n: int) -> tuple[str, list[dict]]:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    gt_file = os.path.join(root, "gt.png")
    rng = np.random.default_rng(0)
    Image.fromarray(_semantic_labels(rng).astype(np.uint8)).save(gt_file)
    # one ground-truth file for all images: the evaluator reads it per image, the predictions differ
    inputs = [{"file_name": os.path.join(root, f"{i}.jpg"), "sem_seg_file_name": gt_file} for i in range(n)]
    DatasetCatalog.register("memory_semantic", lambda: inputs)
    MetadataCatalog.get("memory_semantic").set(stuff_classes=[f"c{k}" for k in range(SEM_CLASSES)], ignore_label=255)
    return "memory_semantic", inputs


def _semantic_labels(rng) -> np.ndarray:
    import torch

    present = rng.choice(SEM_CLASSES, 20, replace=False)  # ~20 classes per image, as in ADE20K
    coarse = torch.as_tensor(present[rng.integers(0, 20, (1, 1, 32, 32))], dtype=torch.float32)
    labels = torch.nn.functional.interpolate(coarse, size=(SEM_SIZE, SEM_SIZE), mode="nearest")[0, 0]
    # ragged borders, as a real model's: shift rows by a smooth random offset
    shifts = (8 * np.sin(np.arange(SEM_SIZE) / 9.0 + rng.random() * 6)).astype(int)
    return np.stack([np.roll(row, s) for row, s in zip(labels.long().numpy(), shifts)])


def _semantic_output(rng) -> dict:
    import torch

    labels = torch.as_tensor(_semantic_labels(rng))
    # one-hot scores, classes last in memory so the evaluator's argmax over classes is a contiguous reduction
    scores = torch.zeros((SEM_SIZE, SEM_SIZE, SEM_CLASSES), dtype=torch.uint8)
    return {"sem_seg": scores.scatter_(2, labels[..., None], 1).permute(2, 0, 1)}


def run_child(kind: str, num_images: int) -> dict:
    import dinat_m2f.evaluation as evaluation

    with tempfile.TemporaryDirectory(prefix="eval_memory_") as root:
        out_dir = os.path.join(root, "inference")
        # A few distinct predictions, made before the measurement and fed in turn: the evaluator converts each
        # one afresh (new RLE strings per image), and the feeding loop costs only the evaluator's own work.
        rng = np.random.default_rng(1)
        if kind == "instance":
            pool = [_instance_output(rng) for _ in range(POOL_SIZE)]
            name, inputs = _register_instances(root, num_images, pool)
            evaluator = evaluation.COCOEvaluator(name, tasks=("segm",), distributed=True, output_dir=out_dir)
        else:
            pool = [_semantic_output(rng) for _ in range(POOL_SIZE)]
            name, inputs = _register_semantic(root, num_images)
            evaluator = evaluation.SemSegEvaluator(name, distributed=True, output_dir=out_dir)
        evaluator.reset()
        start_rss = _status_mib("VmRSS")
        hwm_reset = _reset_peak()
        process_peak = start_rss
        t0 = time.perf_counter()
        for i, x in enumerate(inputs):
            evaluator.process([x], [pool[i % POOL_SIZE]])
            process_peak = max(process_peak, _status_mib("VmRSS"))
        t1 = time.perf_counter()
        results = evaluator.evaluate()
        t2 = time.perf_counter()
        peak = _status_mib("VmHWM")
        if not hwm_reset:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metric = results["segm"]["AP"] if kind == "instance" else results["sem_seg"]["mIoU"]
        dumped = "coco_instances_results.json" if kind == "instance" else "sem_seg_predictions.json"
        dump_mib = os.path.getsize(os.path.join(out_dir, dumped)) / 2**20
    return {
        "evaluator": kind,
        "images": num_images,
        "start_rss_mib": round(start_rss, 1),
        "process_peak_rss_mib": round(process_peak, 1),
        "total_peak_rss_mib": round(peak, 1),
        "peak_is_since_setup": hwm_reset,
        "dump_mib": round(dump_mib, 1),
        "metric": metric,
        "process_s": round(t1 - t0, 1),
        "evaluate_s": round(t2 - t1, 1),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--evaluators", nargs="+", choices=("instance", "semantic"), default=["instance", "semantic"])
    parser.add_argument("--child", choices=("instance", "semantic"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.num_images)))
        return []
    import dinat_m2f

    print(f"dinat_m2f from {os.path.dirname(dinat_m2f.__file__)}", flush=True)
    rows = []
    for kind in args.evaluators:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--num-images", str(args.num_images)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
