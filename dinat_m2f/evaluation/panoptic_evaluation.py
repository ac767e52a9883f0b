"""Panoptic quality (PQ/SQ/RQ) with every prediction PNG on disk, not in RAM.

detectron2's ``COCOPanopticEvaluator`` keeps the PNG bytes of every image in memory until ``evaluate()``; on a
5000-image validation set that is gigabytes. This evaluator writes each prediction PNG to a scratch directory
as it comes (shared by all ranks of a machine, like detectron2's Cityscapes evaluators), keeps only the small
``segments_info`` lists, and then runs panopticapi's ``pq_compute`` (COCO / ADE20K / Mapillary) or
cityscapesscripts' ``evaluatePanoptic`` (Cityscapes) on the files.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import tempfile
from collections import OrderedDict
from typing import Any

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from dinat_m2f.utils.d2_compat import print_panoptic_results

__all__ = ["COCOPanopticEvaluator", "CityscapesPanopticEvaluator", "pq_results_to_dict"]


def pq_results_to_dict(pq_res: dict[str, Any]) -> dict[str, float]:
    """panopticapi's result dict -> detectron2's flat {"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"} in percent."""
    res = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("pq", "sq", "rq"):
            res[metric.upper() + suffix] = 100 * pq_res[group][metric]
    return res


class COCOPanopticEvaluator(DatasetEvaluator):
    """PQ through panopticapi, streaming prediction PNGs to disk.

    Needs the dataset metadata ``panoptic_json``, ``panoptic_root``, ``thing_dataset_id_to_contiguous_id`` and
    ``stuff_dataset_id_to_contiguous_id`` (and ``label_divisor`` when a model returns ``segments_info=None``).

    It contains a synchronization and must be called on all ranks. Ranks on different machines need an
    ``output_dir`` on a shared file system: the PNGs go to a scratch directory inside it.
    """

    def __init__(self, dataset_name: str, output_dir: str | None = None):
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        for key in ("panoptic_json", "panoptic_root", "thing_dataset_id_to_contiguous_id"):
            if not hasattr(self._metadata, key):
                raise ValueError(f"{type(self).__name__}: dataset {dataset_name!r} has no metadata {key!r}")
        self._thing_contiguous_id_to_dataset_id = {
            v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()
        }
        self._stuff_contiguous_id_to_dataset_id = {
            v: k for k, v in self._metadata.get("stuff_dataset_id_to_contiguous_id", {}).items()
        }
        self._output_dir = output_dir
        if output_dir is not None:
            PathManager.mkdirs(output_dir)
        self._scratch: tempfile.TemporaryDirectory | None = None

    # ---------------------------------------------------------------- scratch directory
    def reset(self) -> None:
        self._cleanup()
        self._predictions: list[dict[str, Any]] = []
        # Rank 0 creates the directory, every rank writes into it.
        if comm.is_main_process():
            self._scratch = tempfile.TemporaryDirectory(prefix="panoptic_eval_", dir=self._output_dir)
            pred_dir = self._scratch.name
        else:
            pred_dir = None
        self._pred_dir = comm.all_gather(pred_dir)[0]
        os.makedirs(self._pred_dir, exist_ok=True)

    def _cleanup(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    # ---------------------------------------------------------------- per image
    def _convert_category_id(self, segment_info: dict[str, Any]) -> dict[str, Any]:
        """Training (contiguous) ids -> dataset category ids, as panopticapi compares with the json."""
        segment_info = dict(segment_info)
        isthing = segment_info.pop("isthing", None)
        if isthing is None:  # the model already produced dataset category ids
            return segment_info
        mapping = self._thing_contiguous_id_to_dataset_id if isthing else self._stuff_contiguous_id_to_dataset_id
        category_id = segment_info["category_id"]
        if category_id not in mapping:
            kind = "thing" if isthing else "stuff"
            raise ValueError(
                f"{type(self).__name__}: segment {segment_info.get('id')} has {kind} class {category_id}, "
                f"not a {kind} class of {self._dataset_name!r}"
            )
        segment_info["category_id"] = int(mapping[category_id])
        return segment_info

    def _segments_from_label_divisor(self, panoptic_img: np.ndarray) -> list[dict[str, Any]]:
        """Segments of an image holding ``class * label_divisor + instance`` with -1 = void (DeepLab style)."""
        label_divisor = self._metadata.label_divisor
        thing_ids = set(self._metadata.thing_dataset_id_to_contiguous_id.values())
        segments = []
        for panoptic_label in np.unique(panoptic_img):
            if panoptic_label == -1:
                continue
            pred_class = int(panoptic_label) // label_divisor
            segments.append(
                {"id": int(panoptic_label) + 1, "category_id": pred_class, "isthing": pred_class in thing_ids}
            )
        return segments

    def process(self, inputs, outputs) -> None:
        from panopticapi.utils import id2rgb

        for input, output in zip(inputs, outputs):
            if "panoptic_seg" not in output:
                raise KeyError(
                    f"{type(self).__name__}: the model output for {input.get('file_name')} has no 'panoptic_seg' "
                    f"(keys: {sorted(output)}); is MODEL.MASK_FORMER.TEST.PANOPTIC_ON off, or is this semantic-only TTA?"
                )
            panoptic_img, segments_info = output["panoptic_seg"]
            panoptic_img = panoptic_img.cpu().numpy().astype(np.int64)
            if segments_info is None:
                segments_info = self._segments_from_label_divisor(panoptic_img)
                panoptic_img = panoptic_img + 1  # panopticapi uses 0 for VOID
            file_name = os.path.splitext(os.path.basename(input["file_name"]))[0] + ".png"
            Image.fromarray(id2rgb(panoptic_img)).save(os.path.join(self._pred_dir, file_name))
            self._predictions.append(
                {
                    "image_id": input["image_id"],
                    "file_name": file_name,
                    "segments_info": [self._convert_category_id(s) for s in segments_info],
                }
            )

    # ---------------------------------------------------------------- whole dataset
    def _compute_pq(self, gt_json: str, pred_json: str, gt_folder: str, pred_folder: str) -> dict[str, Any]:
        from panopticapi.evaluation import pq_compute

        with contextlib.redirect_stdout(io.StringIO()):
            return pq_compute(gt_json, pred_json, gt_folder=gt_folder, pred_folder=pred_folder)

    def evaluate(self):
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self._predictions)))
        if not comm.is_main_process():
            return None

        missing = [
            p["file_name"] for p in predictions if not os.path.exists(os.path.join(self._pred_dir, p["file_name"]))
        ]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} panoptic prediction PNGs are missing from {self._pred_dir} (e.g. {missing[0]}); "
                "ranks on several machines need an output_dir on a shared file system"
            )
        gt_json = PathManager.get_local_path(self._metadata.panoptic_json)
        gt_folder = PathManager.get_local_path(self._metadata.panoptic_root)
        if not os.path.isfile(gt_json):
            raise FileNotFoundError(f"panoptic ground-truth json {gt_json} of {self._dataset_name!r} does not exist")
        if not os.path.isdir(gt_folder):
            raise FileNotFoundError(
                f"panoptic ground-truth folder {gt_folder} of {self._dataset_name!r} does not exist"
            )
        with open(gt_json) as f:
            json_data = json.load(f)
        json_data["annotations"] = predictions

        pred_json = os.path.join(self._output_dir or self._pred_dir, "predictions.json")
        with PathManager.open(pred_json, "w") as f:
            f.write(json.dumps(json_data))
        del json_data

        try:
            pq_res = self._compute_pq(gt_json, pred_json, gt_folder, self._pred_dir)
        finally:
            self._cleanup()
        print_panoptic_results(pq_res)
        return OrderedDict({"panoptic_seg": pq_results_to_dict(pq_res)})


class CityscapesPanopticEvaluator(COCOPanopticEvaluator):
    """Cityscapes PQ through cityscapesscripts' ``evalPanopticSemanticLabeling.evaluatePanoptic``.

    Works on detectron2's ``cityscapes_fine_panoptic_*`` registration: ``panoptic_json`` and ``panoptic_root``
    are the ``gtFine/cityscapes_panoptic_{split}.json`` and folder made by cityscapesscripts'
    ``createPanopticImgs``, whose category ids are the Cityscapes label ids.
    """

    def _compute_pq(self, gt_json: str, pred_json: str, gt_folder: str, pred_folder: str) -> dict[str, Any]:
        from cityscapesscripts.evaluation.evalPanopticSemanticLabeling import evaluatePanoptic

        results_file = os.path.join(self._output_dir or pred_folder, "cityscapes_panoptic_results.json")
        with contextlib.redirect_stdout(io.StringIO()):
            return evaluatePanoptic(gt_json, gt_folder, pred_json, pred_folder, results_file)
