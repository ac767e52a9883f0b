"""A DetectionCheckpointer whose saves are atomic and whose missing files are clear errors."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer


class MissingWeightsError(FileNotFoundError):
    """MODEL.WEIGHTS (or a checkpoint path) names a file that does not exist."""


def _is_remote(path: str) -> bool:
    return "://" in path


def _atomic_write(path: str, write_fn) -> None:
    """Write through ``write_fn(file)`` to a temp file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that never leaves a truncated checkpoint or ``last_checkpoint`` behind.

    A save writes ``<name>.pth`` through a temporary file and ``os.replace``, then re-tags ``last_checkpoint`` the
    same way, so a kill at any moment leaves the previous checkpoint (and the tag pointing at it) intact.
    """

    def __init__(self, *args: Any, atomic: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.atomic = atomic

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self.atomic or _is_remote(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self.atomic or _is_remote(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(save_file, lambda f: f.write(last_filename_basename.encode()))

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        if path and not _is_remote(path) and not os.path.isfile(path):
            local = self.path_manager.get_local_path(path)
            if not os.path.isfile(local):
                raise MissingWeightsError(
                    f"weights file not found: {path!r} (set MODEL.WEIGHTS to an existing .pth/.pkl file, a URL, "
                    "or '' to train from scratch)"
                )
        return super().load(path, checkpointables=checkpointables)

    def _load_file(self, filename: str) -> dict[str, Any]:
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)
        # Our own checkpoints hold only tensors and plain containers, but official ones may hold numpy arrays or
        # other pickled objects; they are trusted files named by the user, as in detectron2.
        loaded = torch.load(filename, map_location=torch.device("cpu"), weights_only=False)
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded
