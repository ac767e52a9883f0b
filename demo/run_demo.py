#!/usr/bin/env python
"""`make demo`: generate the synthetic data, train a small DiNAT-Mask2Former from scratch on the CPU, evaluate it with
the real evaluators (PQ, mask AP, mIoU), write overlays of validation images to output/demo/, print one summary line.

    .venv/bin/python demo/run_demo.py [--config-file configs/demo/maskformer2_dinat_demo.yaml] [--opts KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "demo"))  # its sibling demo.py (already there when run as a script)

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import default_setup  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from demo import Overlayer, write_png  # noqa: E402
from dinat_m2f.config import check_config, load_config  # noqa: E402
from dinat_m2f.data.datasets import dataset_root  # noqa: E402
from dinat_m2f.data.synthetic import ensure_synthetic_dataset  # noqa: E402
from dinat_m2f.engine.trainer import Trainer  # noqa: E402
from dinat_m2f.utils.cpu_memory import keep_freed_cpu_memory  # noqa: E402
from dinat_m2f.utils.d2_compat import last_eval_results  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "configs", "demo", "maskformer2_dinat_demo.yaml")


def summarize(results: dict) -> tuple[float, float, float]:
    """(PQ, mask AP, mIoU) from detectron2's evaluator results; a missing metric is an error naming it."""
    try:
        return results["panoptic_seg"]["PQ"], results["segm"]["AP"], results["sem_seg"]["mIoU"]
    except KeyError as e:
        raise RuntimeError(f"evaluation did not report {e.args[0]!r}; got {json.dumps(results, default=str)}") from None


def write_overlays(cfg, weights: str, out_dir: str, count: int) -> list[str]:
    """Overlays (panoptic, instance, semantic) of the first ``count`` validation images."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    overlayer = Overlayer(cfg, confidence_threshold=0.5)
    written = []
    with torch.no_grad():
        for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[:count]:
            stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
            for task, rgb in overlayer(read_image(d["file_name"], format="BGR")).items():
                path = os.path.join(out_dir, f"val_{stem}_{task}.png")
                write_png(path, rgb)
                written.append(path)
    return written


def main(argv: list[str] | None = None) -> tuple[float, float, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--num-overlays", type=int, default=8, help="validation images to draw")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    # One compute thread, the data-loader worker on the other core: on a small (or shared) machine, two spinning
    # OpenMP threads next to the loader made each step several times slower. OMP_NUM_THREADS overrides this.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    keep_freed_cpu_memory()  # reuse the activations' memory between steps (DINAT_M2F_KEEP_FREED_MEMORY=0: off)
    os.chdir(REPO)  # datasets/ and output/ live in the repository

    setup_logger(name="dinat_m2f")
    logger = logging.getLogger("dinat_m2f.demo")
    root = os.path.join(dataset_root(), "synthetic")
    logger.info(f"demo: preparing the synthetic dataset in {root} ...")
    ensure_synthetic_dataset(root)
    logger.info(f"demo: dataset ready ({time.perf_counter() - start:.0f}s)")

    cfg = load_config(args.config_file, args.opts)
    check_config(cfg)
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False, opts=args.opts))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # ends with an evaluation on DATASETS.TEST (detectron2's EvalHook)
    pq, ap, miou = summarize(last_eval_results(trainer))

    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    overlays = write_overlays(cfg, final, cfg.OUTPUT_DIR, args.num_overlays)
    logger.info(f"demo: wrote {len(overlays)} overlays to {cfg.OUTPUT_DIR}/ ; total {time.perf_counter() - start:.0f}s")
    print(f"demo: PQ={pq:.1f} AP={ap:.1f} mIoU={miou:.1f}", flush=True)
    return pq, ap, miou


if __name__ == "__main__":
    main()
