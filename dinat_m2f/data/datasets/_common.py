"""Helpers shared by the dataset registrations: root resolution, (re-)registration, colour palettes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

__all__ = [
    "DatasetFileError",
    "dataset_root",
    "register_dataset",
    "color_palette",
    "require_path",
    "panoptic_metadata",
    "load_json",
]


class DatasetFileError(ValueError):
    """A dataset file (annotation JSON) exists but cannot be parsed; the message names it."""


def dataset_root(root: str | None = None) -> str:
    """The datasets root: ``root`` if given, else ``$DETECTRON2_DATASETS`` (default ``datasets``)."""
    return root if root is not None else os.getenv("DETECTRON2_DATASETS", "datasets")


def register_dataset(name: str, loader: Callable[[], list[dict]], **metadata) -> None:
    """Register ``name`` in the Dataset/MetadataCatalog, replacing an earlier registration of the same name.

    Replacing (rather than asserting) lets ``register_all_*(root)`` re-point the standard names at another root
    (tests, or a user with two copies of a dataset); detectron2's Metadata refuses to change a set value otherwise.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def panoptic_metadata(categories: list[dict]) -> dict:
    """Panoptic metadata of ``categories`` (dicts with id/name/color/isthing), contiguous id = list position.

    ``stuff_*`` cover ALL classes (so SemSegEvaluator scores things too) and ``thing_classes``/``thing_colors``
    repeat the full lists, as detectron2's Visualizer indexes both by the same contiguous id.
    """
    names = [c["name"] for c in categories]
    colors = [c["color"] for c in categories]
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories) if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


def require_path(path: str, hint: str = "") -> str:
    """Return ``path`` if it exists, else raise FileNotFoundError naming it (and how to produce it)."""
    if not os.path.exists(path):
        msg = f"Dataset file or folder not found: {path}"
        raise FileNotFoundError(msg + (f". {hint}" if hint else ""))
    return path


def load_json(path: str, hint: str = "") -> Any:
    """``json.load`` of ``path``; a truncated or non-JSON file raises DatasetFileError naming it (json's own error
    gives only a line and column)."""
    try:
        with PathManager.open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFileError(invalid_json_message(path, e, hint)) from e


def invalid_json_message(path: str, error: Exception, hint: str = "") -> str:
    return f"{path} is not valid JSON ({error}): the file is truncated or corrupt; download or regenerate it" + (
        f" ({hint})" if hint else ""
    )


def color_palette(num: int) -> list[list[int]]:
    """A deterministic, well-spread RGB palette (the PASCAL VOC bit-interleaving scheme), skipping black.

    Used where the official colour table is not part of the dataset's on-disk files.
    """
    colors = []
    i = 1
    while len(colors) < num:
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append([r, g, b])
        i += 1
    return colors
