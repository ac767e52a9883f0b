"""Semantic segmentation metrics (mIoU, fwIoU, mACC, pACC) from a running confusion matrix.

detectron2's ``SemSegEvaluator`` already accumulates a (C+1)x(C+1) confusion matrix per image, so nothing of the
size of a prediction is kept (only a per-class RLE json of each prediction, for ``sem_seg_predictions.json``).
This subclass checks each ground-truth map before it enters the matrix: a label outside 0..C-1 that is not the
ignore label would otherwise land in another class's cell, and a size mismatch would raise a bare numpy error.
"""

from __future__ import annotations

import numpy as np
from detectron2.evaluation import SemSegEvaluator as D2SemSegEvaluator
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["SemSegEvaluator"]


class SemSegEvaluator(D2SemSegEvaluator):
    """detectron2's SemSegEvaluator with a clear error for a missing, unreadable or inconsistent ground truth."""

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
            self._predictions.extend(self.encode_json_sem_seg(pred, input["file_name"]))
