#!/usr/bin/env python
"""Run a trained DiNAT + Mask2Former on images, a folder or a video; write panoptic/instance/semantic overlays (PNG).

A thin command line over ``dinat_m2f.Predictor``:

    python demo/demo.py --config-file configs/coco/panoptic-segmentation/dinat/\
maskformer2_dinat_large_IN21k_bs16_100ep.yaml --input photos/*.jpg --output out/ \
        --opts MODEL.WEIGHTS mask2former_dinat_large_coco_panoptic.pth
    python demo/demo.py --config-file dinat_l_coco_panoptic --input photos/ --output out/   # a model-zoo name
    python demo/demo.py --config-file ... --video-input clip.mp4 --output out/ --opts MODEL.WEIGHTS ... MODEL.DEVICE cpu

Each input gives ``<stem>_<task>.png`` per task the model produces (panoptic, instance, semantic), drawn with
detectron2's Visualizer; video frames give ``<video stem>_<frame>_<task>.png``.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np
from detectron2.config import CfgNode
from detectron2.utils.logger import setup_logger

from dinat_m2f.predictor import ImageReadError, Predictor, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TASKS = ("panoptic", "instance", "semantic")


def list_images(inputs: list[str]) -> list[str]:
    """Files, globs and folders (their images, sorted) -> image paths; anything that matches nothing is an error."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
        if not found:
            raise FileNotFoundError(f"--input {item!r}: no such image file, folder or glob match")
        paths.extend(found)
    return paths


def readable_images(paths: list[str], skip_bad: bool, skipped: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(stem, RGB image) of each path; with ``skip_bad`` an unreadable one is logged, appended to ``skipped`` and
    left out, otherwise its ImageReadError propagates."""
    for path in paths:
        try:
            image = read_image(path)
        except ImageReadError as e:
            if not skip_bad:
                raise
            logging.getLogger("dinat_m2f.demo").warning(f"skipping {e}")
            skipped.append(str(e))
            continue
        yield os.path.splitext(os.path.basename(path))[0], image


def overlays(
    predictor: Predictor, image_rgb: np.ndarray, tasks: tuple[str, ...] = TASKS, confidence_threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Task -> overlay (RGB) for each requested task the model produced."""
    result = predictor(image_rgb)
    present = {"panoptic": result.panoptic, "instance": result.instances, "semantic": result.semantic}
    return {
        task: predictor.draw(image_rgb, result, task=task, confidence_threshold=confidence_threshold)
        for task in tasks
        if present[task] is not None
    }


class Overlayer:
    """Overlays of a loaded config's model on BGR images (what demo/run_demo.py draws with)."""

    def __init__(self, cfg: CfgNode, confidence_threshold: float = 0.5) -> None:
        self.predictor = Predictor.from_cfg(cfg)
        self.confidence_threshold = confidence_threshold

    def __call__(self, image_bgr: np.ndarray, tasks: tuple[str, ...] = TASKS) -> dict[str, np.ndarray]:
        return overlays(self.predictor, np.ascontiguousarray(image_bgr[:, :, ::-1]), tasks, self.confidence_threshold)


def write_png(path: str, rgb: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)


def video_frames(path: str) -> Iterator[np.ndarray]:
    """The frames of a video as RGB arrays."""
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--video-input {path!r}: no such file")
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise ValueError(f"--video-input {path!r}: OpenCV cannot decode this file")
    try:
        while True:
            ok, frame = video.read()
            if not ok:
                return
            yield np.ascontiguousarray(frame[:, :, ::-1])
    finally:
        video.release()


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DiNAT + Mask2Former demo: overlays of predictions as PNG")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a config file or a model-zoo name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders or globs")
    source.add_argument("--video-input", help="a video file (every frame is written as PNG)")
    parser.add_argument("--output", required=True, help="folder for the PNG overlays")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which overlays to write")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of drawn instances")
    parser.add_argument("--max-frames", type=int, default=0, help="stop a video after this many frames (0 = all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="inference precision (autocast; default: the config's MODEL.MASK_FORMER.TEST.DTYPE, float32)",
    )
    parser.add_argument(
        "--trust-weights",
        action="store_true",
        help="unpickle MODEL.WEIGHTS fully (MODEL.TRUST_WEIGHTS True): can run code from the file; trusted files only",
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip input images that cannot be read (listed at the end) instead of stopping at the first",
    )
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return parser


def main(argv: list[str] | None = None) -> list[str]:
    args = get_parser().parse_args(argv)
    setup_logger(name="dinat_m2f")
    logger = logging.getLogger("dinat_m2f.demo")
    opts = args.opts + (["MODEL.TRUST_WEIGHTS", "True"] if args.trust_weights else [])
    predictor = Predictor(args.config_file, device=args.device, dtype=args.dtype, opts=opts)
    tasks = tuple(args.tasks)
    written: list[str] = []
    skipped: list[str] = []
    if args.input:
        paths = list_images(args.input)
        sources = readable_images(paths, args.skip_bad_images, skipped)
    else:
        # Its own name: the lazy generator below would otherwise read the loop's ``stem`` (v_000000_000001...).
        video_stem = os.path.splitext(os.path.basename(args.video_input))[0]
        frames = video_frames(args.video_input)
        if args.max_frames:
            frames = itertools.islice(frames, args.max_frames)  # stop decoding there, not just stop drawing
        sources = ((f"{video_stem}_{i:06d}", f) for i, f in enumerate(frames))
    for stem, image in sources:
        for task, overlay in overlays(predictor, image, tasks, args.confidence_threshold).items():
            path = os.path.join(args.output, f"{stem}_{task}.png")
            write_png(path, overlay)
            written.append(path)
        logger.info(f"{stem}: done ({len(written)} PNGs so far)")
    if skipped:
        print(f"Skipped {len(skipped)} unreadable image(s):\n  " + "\n  ".join(skipped), file=sys.stderr)
        if len(skipped) == len(paths):
            raise ImageReadError(f"none of the {len(paths)} input images could be read")
    if not written:
        raise RuntimeError(f"the model produced none of the requested outputs {tasks} (check MODEL.MASK_FORMER.TEST.*)")
    return written


if __name__ == "__main__":
    main()
