#!/usr/bin/env python
"""Run a trained DiNAT + Mask2Former on images, a folder or a video; write panoptic/instance/semantic overlays (PNG).

    python demo/demo.py --config-file configs/coco/panoptic-segmentation/dinat/\
maskformer2_dinat_large_IN21k_bs16_100ep.yaml --input photos/*.jpg --output out/ \
        --opts MODEL.WEIGHTS mask2former_dinat_large_coco_panoptic.pth
    python demo/demo.py --config-file ... --video-input clip.mp4 --output out/ --opts MODEL.WEIGHTS ... MODEL.DEVICE cpu

Each input gives ``<stem>_<task>.png`` per task the model produces (panoptic, instance, semantic), drawn with
detectron2's Visualizer; video frames give ``<video stem>_<frame>_<task>.png``. 16-bit images are scaled to 8
bits; an unreadable image stops the run naming it, or with ``--skip-bad-images`` is skipped and listed at the end.
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
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine.defaults import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

import dinat_m2f  # noqa: F401  (registers datasets and model parts)
from dinat_m2f.config import ConfigError, check_config, load_config
from dinat_m2f.engine import AtomicCheckpointer

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TASKS = ("panoptic", "instance", "semantic")


def setup_cfg(config_file: str, opts: list[str]) -> CfgNode:
    cfg = load_config(config_file, opts)
    check_config(cfg)
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("MODEL.WEIGHTS is empty: pass --opts MODEL.WEIGHTS /path/to/model.pth")
    return cfg


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


class ImageReadError(OSError):
    """An input image is missing, truncated or not an image; the message names the file."""


def image_to_rgb8(image) -> np.ndarray:
    """A PIL image -> HxWx3 uint8 RGB. 16-bit images (grayscale PNG/TIFF: modes I;16*, or I holding 16-bit values)
    are scaled by 255/65535; PIL's own ``convert("RGB")`` would clip them to 255, an almost white image."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"a {image.mode} image with values outside 0..65535 (not a 16-bit image)")
        gray = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise ValueError("a floating-point (mode F) image: convert it to 8 or 16 bits first")
    return np.asarray(image.convert("RGB"))  # 8-bit modes; PIL reads 16-bit-per-channel RGB as 8-bit RGB


def read_image_bgr(path: str) -> np.ndarray:
    """Read ``path`` as HxWx3 uint8 BGR (EXIF orientation applied, as detectron2's ``read_image``); a missing,
    truncated or undecodable file raises ImageReadError naming it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            rgb = image_to_rgb8(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from e
    return np.ascontiguousarray(rgb[:, :, ::-1])


def readable_images(paths: list[str], skip_bad: bool, skipped: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(stem, BGR image) of each path; with ``skip_bad`` an unreadable one is logged, appended to ``skipped``
    and left out, otherwise its ImageReadError propagates."""
    for path in paths:
        try:
            image = read_image_bgr(path)
        except ImageReadError as e:
            if not skip_bad:
                raise
            logging.getLogger("dinat_m2f.demo").warning(f"skipping {e}")
            skipped.append(str(e))
            continue
        yield os.path.splitext(os.path.basename(path))[0], image


class Overlayer:
    """Runs the model on one BGR image and draws each of its outputs with detectron2's Visualizer."""

    def __init__(self, cfg: CfgNode, confidence_threshold: float = 0.5) -> None:
        # DefaultPredictor would read MODEL.WEIGHTS with plain pickle and load whatever fits: build it without
        # weights, then load them safely and strictly (MODEL.TRUST_WEIGHTS, MODEL.WEIGHTS_REINIT).
        no_weights = cfg.clone()
        no_weights.defrost()
        no_weights.MODEL.WEIGHTS = ""
        self.predictor = DefaultPredictor(no_weights)
        AtomicCheckpointer.from_config(cfg, self.predictor.model).load(cfg.MODEL.WEIGHTS)
        # class names and colours: those of the test set, else of the training set
        names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
        if not names:
            raise ConfigError("DATASETS.TEST and DATASETS.TRAIN are empty: the demo needs class names")
        self.metadata = MetadataCatalog.get(names[0])
        self.confidence_threshold = confidence_threshold

    def __call__(self, image_bgr: np.ndarray, tasks: tuple[str, ...] = TASKS) -> dict[str, np.ndarray]:
        predictions = self.predictor(image_bgr)
        rgb = image_bgr[:, :, ::-1]
        out: dict[str, np.ndarray] = {}
        if "panoptic" in tasks and "panoptic_seg" in predictions:
            panoptic_seg, segments_info = predictions["panoptic_seg"]
            vis = Visualizer(rgb, self.metadata, instance_mode=ColorMode.IMAGE)
            out["panoptic"] = vis.draw_panoptic_seg(panoptic_seg.to("cpu"), segments_info).get_image()
        if "instance" in tasks and "instances" in predictions:
            instances = predictions["instances"].to("cpu")
            instances = instances[instances.scores > self.confidence_threshold]
            if instances.has("pred_boxes") and not instances.pred_boxes.tensor.any():
                instances.remove("pred_boxes")  # all-zero boxes (Mask2Former's default): label the masks instead
            vis = Visualizer(rgb, self.metadata, instance_mode=ColorMode.IMAGE)
            out["instance"] = vis.draw_instance_predictions(instances).get_image()
        if "semantic" in tasks and "sem_seg" in predictions:
            vis = Visualizer(rgb, self.metadata, instance_mode=ColorMode.IMAGE)
            labels = predictions["sem_seg"].argmax(dim=0).to("cpu")
            out["semantic"] = vis.draw_sem_seg(labels).get_image()
        return out


def write_png(path: str, rgb: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)


def video_frames(path: str) -> Iterator[np.ndarray]:
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
            yield frame
    finally:
        video.release()


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DiNAT + Mask2Former demo: overlays of predictions as PNG")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders or globs")
    source.add_argument("--video-input", help="a video file (every frame is written as PNG)")
    parser.add_argument("--output", required=True, help="folder for the PNG overlays")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which overlays to write")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of drawn instances")
    parser.add_argument("--max-frames", type=int, default=0, help="stop a video after this many frames (0 = all)")
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
    cfg = setup_cfg(args.config_file, args.opts + (["MODEL.TRUST_WEIGHTS", "True"] if args.trust_weights else []))
    overlayer = Overlayer(cfg, args.confidence_threshold)
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
    with torch.no_grad():
        for stem, image in sources:
            for task, overlay in overlayer(image, tasks).items():
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
