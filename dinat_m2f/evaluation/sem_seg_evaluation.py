"""Semantic segmentation metrics (mIoU, fwIoU, mACC, pACC) from a running confusion matrix.

detectron2's ``SemSegEvaluator`` accumulates a (C+1)x(C+1) confusion matrix per image, but also keeps a per-class
RLE json of every prediction (~0.3 MB per image) for ``sem_seg_predictions.json`` and gathers them all on rank 0.
This subclass streams those records to a file of the output folder (:mod:`dinat_m2f.evaluation.spool`; nothing at
all without an output folder, where they were never written), so its memory does not grow with the dataset.
It also checks each ground-truth map before it enters the matrix: a label outside 0..C-1 that is not the ignore
label would otherwise land in another class's cell, and a size mismatch would raise a bare numpy error.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from detectron2.evaluation import SemSegEvaluator as D2SemSegEvaluator
from detectron2.utils.file_io import PathManager
from PIL import Image

from dinat_m2f.evaluation.spool import PredictionSpool, write_json_array

__all__ = ["SemSegEvaluator"]


class SemSegEvaluator(D2SemSegEvaluator):
    """detectron2's SemSegEvaluator with per-image predictions streamed to disk and a clear error for a missing,
    unreadable or inconsistent ground truth. Same metrics and files (``sem_seg_predictions.json``,
    ``sem_seg_evaluation.pth``) as detectron2's."""

    def reset(self) -> None:
        super().reset()
        if self._output_dir:
            if not hasattr(self, "_spool"):
                self._spool = PredictionSpool("sem_seg_", self._output_dir, self._distributed)
            self._spool.reset()

    def _load_gt(self, file_name: str) -> tuple[np.ndarray, str]:
        gt_file = self.input_file_to_gt_file.get(file_name)
        if gt_file is None:
            raise KeyError(f"{file_name} is not an image of dataset {self._dataset_name!r}")
        try:
            with PathManager.open(gt_file, "rb") as f:
                gt = np.array(Image.open(f), dtype=np.int64)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"semantic ground truth {gt_file} of {file_name} does not exist") from e
        except OSError as e:
            raise OSError(f"cannot read semantic ground truth {gt_file}: {e}") from e
        return gt, gt_file

    def process(self, inputs, outputs) -> None:
        n = self._num_classes
        for input, output in zip(inputs, outputs):
            pred = output["sem_seg"].argmax(dim=0).to(self._cpu_device).numpy().astype(np.int64)
            gt, gt_file = self._load_gt(input["file_name"])
            if gt.shape != pred.shape:
                raise ValueError(f"prediction of size {pred.shape} for ground truth {gt_file} of size {gt.shape}")
            ignored = gt == self._ignore_label
            bad = ~ignored & ((gt < 0) | (gt >= n))
            if bad.any():
                raise ValueError(
                    f"{gt_file} holds labels {np.unique(gt[bad])[:5].tolist()} outside 0..{n - 1} that are not the "
                    f"ignore label {self._ignore_label} of {self._dataset_name!r}"
                )
            if pred.max(initial=0) >= n:
                raise ValueError(f"the model predicts {pred.max() + 1} classes, dataset {self._dataset_name!r} has {n}")
            gt[ignored] = n
            self._conf_matrix += np.bincount(
                (n + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=self._conf_matrix.size
            ).reshape(self._conf_matrix.shape)
            if self._output_dir:
                for record in self.encode_json_sem_seg(pred, input["file_name"]):
                    self._spool.write(record)

    def evaluate(self):
        """detectron2's metrics (its ``evaluate`` on the confusion matrices, with no predictions to gather), then
        ``sem_seg_predictions.json`` and ``sem_seg_evaluation.pth`` written by rank 0 from the spooled records."""
        spooled = self._spool.finish() if self._output_dir else None
        output_dir, self._output_dir = self._output_dir, None  # detectron2 would dump its (empty) prediction list
        self._predictions = []
        try:
            results = super().evaluate()
        finally:
            self._output_dir = output_dir
        if results is None or not output_dir:  # not rank 0, or nothing to write
            return results
        try:
            write_json_array(os.path.join(output_dir, "sem_seg_predictions.json"), spooled)
        finally:
            self._spool.cleanup()
        with PathManager.open(os.path.join(output_dir, "sem_seg_evaluation.pth"), "wb") as f:
            torch.save(results["sem_seg"], f)
        return results
