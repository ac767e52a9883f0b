"""Helpers of the dataset preparation scripts in ``datasets/``: checked inputs, a parallel loop with a progress
bar, and atomic writes so that an interrupted run can be resumed (finished files are skipped)."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dinat_m2f.data.datasets._common import dataset_root
from dinat_m2f.utils.file_io import atomic_write, atomic_write_text

__all__ = [
    "require_dir",
    "require_file",
    "parallel_map",
    "save_image_atomic",
    "save_json_atomic",
    "read_image_array",
    "base_parser",
]


def require_dir(path: str, hint: str = "") -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Folder not found: {path}" + (f". {hint}" if hint else ""))
    return path


def require_file(path: str, hint: str = "") -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"File not found: {path}" + (f". {hint}" if hint else ""))
    return path


def read_image_array(path: str, mode: str | None = None) -> np.ndarray:
    """Read an image as an array; a missing or unreadable file raises an error naming it."""
    require_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            if mode is not None and img.mode != mode:
                img = img.convert(mode)
            return np.asarray(img)
    except Exception as e:
        raise OSError(f"Cannot read image {path}: {e}") from e


# Atomic, so that a killed run never leaves a half-written file that looks finished (finished files are skipped).
def save_image_atomic(array: np.ndarray, path: str) -> None:
    atomic_write(path, Image.fromarray(array).save)  # the format follows the extension of ``path``


def save_json_atomic(obj: Any, path: str) -> None:
    atomic_write_text(path, json.dumps(obj))


def parallel_map(fn: Callable, jobs: Iterable, workers: int, desc: str) -> list:
    """``[fn(job) for job in jobs]`` over ``workers`` processes (in-process when ``workers <= 1``), with tqdm."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc)]
    with mp.get_context("fork").Pool(workers) as pool:
        chunks = max(1, len(jobs) // (workers * 8))
        return list(tqdm(pool.imap(fn, jobs, chunksize=chunks), total=len(jobs), desc=desc))


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--root",
        default=dataset_root(),
        help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)",
    )
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="worker processes")
    p.add_argument("--overwrite", action="store_true", help="redo files that already exist")
    return p


def load_ade20k_catid_mapping(path: str | None) -> dict[int, int]:
    """Instance-benchmark class (R channel, 1..100) -> 0-based scene-parsing id (0..149).

    Default: :data:`dinat_m2f.data.datasets.ade20k.ADE20K_THING_IDS`. ``path`` may name a mapping file in the
    format of Mask2Former's ``ade20k_instance_catid_mapping.txt`` (a header line, then "instance_id semantic_id
    ..." per line, both 1-based).
    """
    if path is None:
        from dinat_m2f.data.datasets.ade20k import ADE20K_THING_IDS

        return {k + 1: sem for k, sem in enumerate(ADE20K_THING_IDS)}
    mapping = {}
    with open(require_file(path)) as f:
        for line in f.read().splitlines()[1:]:
            if line.strip():  # "ins<TAB><TAB>sem<TAB><TAB>full"; an instance class may repeat with another full id
                ins, sem = (int(v) for v in line.split()[:2])
                if mapping.setdefault(ins, sem - 1) != sem - 1:
                    raise ValueError(f"{path}: instance class {ins} maps to two semantic classes")
    return mapping


def ade20k_instance_masks(
    path: str, catid_mapping: dict[int, int], ins: np.ndarray | None = None
) -> list[tuple[int, int, np.ndarray]]:
    """``[(instance id, 0-based semantic class, bool mask)]`` from an ``annotations_instance`` PNG.

    The PNG's R channel is the instance-benchmark class (1..100), G the instance id (0 = none). An instance whose
    pixels carry several classes, or a class outside the mapping, raises an error naming the file. ``ins``: the
    PNG already read as RGB (then ``path`` only names it in errors).
    """
    if ins is None:
        ins = read_image_array(path, "RGB")
    cls, ids = ins[..., 0], ins[..., 1]
    out = []
    for inst_id in np.unique(ids):
        if inst_id == 0:
            continue
        mask = ids == inst_id
        classes = np.unique(cls[mask])
        if len(classes) != 1 or int(classes[0]) not in catid_mapping:
            raise ValueError(
                f"{path}: instance {inst_id} has class value(s) {classes.tolist()}, expected one of 1..100"
            )
        out.append((int(inst_id), catid_mapping[int(classes[0])], mask))
    return out


def mask_bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, w, h]`` of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
