"""A DetectionCheckpointer whose saves are atomic, whose reads cannot run code and whose loads must fit the model.

- Saves go through a temporary file and ``os.replace``; temporaries left by a killed save are removed when a run
  starts (``resume_or_load``).
- Files are read with ``dinat_m2f.utils.safe_load.load_weights_file`` (no code runs unless ``trust_weights``).
- A file that does not fit the model (missing / mis-shaped tensors) is an error (``dinat_m2f.engine.weights_fit``),
  except what ``MODEL.WEIGHTS_REINIT`` declares.
- A truncated last checkpoint on ``--resume`` names itself and the newest intact checkpoint to resume from.
"""

from __future__ import annotations

import os
import re
import shlex
import zipfile
from collections.abc import Sequence
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

from dinat_m2f.engine.weights_fit import (
    WeightsMismatchError,
    check_weights_fit,
    fit_from_incompatible,
    match_weights,
)
from dinat_m2f.utils.d2_compat import really_missing_keys
from dinat_m2f.utils.file_io import atomic_write
from dinat_m2f.utils.safe_load import CorruptWeightsError, load_weights_file


class MissingWeightsError(FileNotFoundError):
    """MODEL.WEIGHTS (or a checkpoint path) names a file that does not exist."""


def _is_remote(path: str) -> bool:
    return "://" in path


# The temporaries of ``atomic_write`` (".<target name>.<random part>.tmp<target's extension>") for checkpoints and the
# tag; the form without the extension is what earlier versions (tempfile.mkstemp) left behind.
_STALE_TEMP = re.compile(r"^\.(?P<target>.+\.pth|last_checkpoint)\.[A-Za-z0-9_]+\.tmp(\.pth)?$")


_FROM_CONFIG = ("pixel_mean", "pixel_std")


def _is_intact_checkpoint(path: str) -> bool:
    """Cheap test of a torch.save zip: its central directory (at the end, lost on truncation) reads."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that never leaves a truncated checkpoint or ``last_checkpoint`` behind, reads files
    without running code from them, and refuses weights that do not fit the model.

    A save writes ``<name>.pth`` through a temporary file and ``os.replace``, then re-tags ``last_checkpoint`` the
    same way, so a kill at any moment leaves the previous checkpoint (and the tag pointing at it) intact.

    ``trust_weights``: unpickle files fully (``MODEL.TRUST_WEIGHTS``; can run code from the file).
    ``weights_reinit``: fnmatch patterns of model tensors that may be missing from / mis-shaped in a file
    (``MODEL.WEIGHTS_REINIT``); see ``dinat_m2f.engine.weights_fit`` for the rules.
    """

    def __init__(
        self,
        *args: Any,
        atomic: bool = True,
        trust_weights: bool = False,
        weights_reinit: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.atomic = atomic
        self.trust_weights = trust_weights
        self.weights_reinit = tuple(weights_reinit)
        self._loading: str = ""  # the file being loaded, for error messages

    @classmethod
    def from_config(cls, cfg, model: torch.nn.Module, save_dir: str = "", **checkpointables: Any) -> AtomicCheckpointer:
        """The checkpointer ``cfg`` asks for: ``CHECKPOINT.ATOMIC``, ``MODEL.TRUST_WEIGHTS``, ``MODEL.WEIGHTS_REINIT``."""
        return cls(
            model,
            save_dir,
            atomic=cfg.CHECKPOINT.ATOMIC,
            trust_weights=cfg.MODEL.TRUST_WEIGHTS,
            weights_reinit=cfg.MODEL.WEIGHTS_REINIT,
            **checkpointables,
        )

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
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self.atomic or _is_remote(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(save_file, lambda f: f.write(last_filename_basename.encode()))

    # ---- starting a run ------------------------------------------------------------------------------------------

    def remove_stale_temp_files(self) -> list[str]:
        """Delete the temporaries a killed save left in ``save_dir`` (GBs each for DiNAT-L); returns their paths."""
        if not self.save_dir or not self.save_to_disk or _is_remote(self.save_dir) or not os.path.isdir(self.save_dir):
            return []
        removed = []
        for name in sorted(os.listdir(self.save_dir)):
            path = os.path.join(self.save_dir, name)
            if _STALE_TEMP.match(name) and os.path.isfile(path):
                size = os.path.getsize(path)
                os.remove(path)
                self.logger.info(f"Removed {path} ({size / 2**20:.1f} MiB), left by a save that was killed")
                removed.append(path)
        return removed

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        self.remove_stale_temp_files()
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        last = self.get_checkpoint_file()
        try:
            return self.load(last)
        except CorruptWeightsError as exc:
            raise CorruptWeightsError(self._resume_advice(last, exc)) from exc

    def _resume_advice(self, bad: str, exc: Exception) -> str:
        """The error of a --resume whose last checkpoint is unreadable: which file, and what to resume from."""
        others = [p for p in self.get_all_checkpoint_files() if os.path.abspath(p) != os.path.abspath(bad)]
        intact = [p for p in sorted(others, key=os.path.getmtime, reverse=True) if _is_intact_checkpoint(p)]
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if not intact:
            return (
                f"{exc}. --resume: {bad} (named by {tag}) is unreadable and no other intact checkpoint is in "
                f"{self.save_dir}: remove {tag} to start the run afresh"
            )
        good = intact[0]
        return (
            f"{exc}. --resume: the last checkpoint {bad} (named by {tag}) is unreadable; the newest intact one is "
            f"{good}. To resume from it: printf '%s' {shlex.quote(os.path.basename(good))} > {shlex.quote(tag)} and "
            "run the same command with --resume again"
        )

    # ---- reading files -------------------------------------------------------------------------------------------

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        if path and not _is_remote(path) and not os.path.isfile(path):
            local = self.path_manager.get_local_path(path)
            if not os.path.isfile(local):
                raise MissingWeightsError(
                    f"weights file not found: {path!r} (set MODEL.WEIGHTS to an existing .pth/.pkl file, a URL, "
                    "or '' to train from scratch)"
                )
        self._loading = path
        try:
            return super().load(path, checkpointables=checkpointables)
        finally:
            self._loading = ""

    def _load_file(self, filename: str) -> dict[str, Any]:
        data = load_weights_file(filename, trust=self.trust_weights)
        if filename.endswith(".pkl"):
            if "model" in data and "__author__" in data:  # detectron2's format
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            # Caffe2 / Detectron1 model zoo, as detectron2 reads it
            blobs = data.get("blobs", data)
            blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
            return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            if "model_state" not in data:
                raise CorruptWeightsError(f"{filename}: a pycls .pyth file must contain 'model_state'")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if "model" not in data:
            data = {"model": data}
        return data

    # ---- fitting the model ---------------------------------------------------------------------------------------

    def _load_model(self, checkpoint: dict[str, Any]):
        """Load, then raise WeightsMismatchError unless the file fits (``dinat_m2f.engine.weights_fit``).

        The fit is judged on what was really loaded: a file by exact names goes through ``load_state_dict``, whose
        hooks rename legacy keys (``static_query``); with ``matching_heuristics`` detectron2 drops mis-shaped tensors
        silently, so those are found by its own longest-suffix rule (``match_weights``).
        """
        file_shapes = self._file_shapes(checkpoint)  # before detectron2 renames / drops entries
        heuristics = bool(checkpoint.get("matching_heuristics", False))
        incompatible = super()._load_model(checkpoint)
        model_shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        unloaded = set(really_missing_keys(self.model, incompatible.missing_keys)) - set(_FROM_CONFIG)
        if heuristics:
            fit = match_weights(model_shapes, file_shapes, heuristics=True)
            misshaped = {k for k, _, _ in fit.misshaped}
            unforeseen = sorted(unloaded - set(fit.missing) - misshaped)
            if unforeseen:  # detectron2 left out tensors its own rule should have paired: say so, never ignore it
                raise WeightsMismatchError(f"{self._loading}: {len(unforeseen)} tensors were not loaded: {unforeseen}")
        else:
            fit = fit_from_incompatible(model_shapes, incompatible)
        fit.missing = [k for k in fit.missing if k in unloaded]  # as detectron2: shared params, pixel_mean/std
        for line in check_weights_fit(fit, self._loading or "the weight file", self.weights_reinit):
            self.logger.info(line)
        return incompatible

    def _file_shapes(self, checkpoint: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the file's tensors, as detectron2 will match them."""
        state = checkpoint["model"]
        if not isinstance(state, dict):
            raise WeightsMismatchError(f"{self._loading}: 'model' holds {type(state).__name__}, not a dict of tensors")
        bad = [k for k, v in state.items() if not hasattr(v, "shape")]
        if bad:
            raise WeightsMismatchError(f"{self._loading}: 'model' entries that are not tensors or arrays: {bad[:10]}")
        if checkpoint.get("matching_heuristics", False) and checkpoint.get("__author__") == "Caffe2":
            state, _ = convert_c2_detectron_names(dict(state))
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes and all(k.startswith("module.") for k in shapes):  # fvcore drops DataParallel's prefix
            shapes = {k[len("module.") :]: v for k, v in shapes.items()}
        return shapes
