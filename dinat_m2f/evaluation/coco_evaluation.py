"""COCO-style box/mask AP without detectron2's compiled COCOeval.

detectron2's ``COCOEvaluator(use_fast_impl=True)`` runs ``COCOeval_opt``, which lives in ``detectron2._C``; that
extension cannot be built on today's stack. Here the fast path is faster-coco-eval's ``COCOeval_faster`` (a C++
COCOeval that gives the same numbers as pycocotools) and the slow path the official pycocotools ``COCOeval``.

Predictions are COCO json with RLE-compressed masks (as in detectron2), but streamed per image to a file of the
output folder (:mod:`dinat_m2f.evaluation.spool`) instead of a list in memory that ``evaluate()`` pickles to rank 0
and copies several times over: while the dataset runs the memory stays that of one image, and ``evaluate()`` holds
one copy of the results (the one COCOeval needs).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator as D2COCOEvaluator
from detectron2.evaluation.coco_evaluation import COCOevalMaxDets, instances_to_coco_json
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dinat_m2f.data.datasets._common import DatasetFileError, invalid_json_message
from dinat_m2f.evaluation.spool import PredictionSpool, SpooledRecords, write_json_array

logger = logging.getLogger(__name__)

__all__ = ["COCOEvaluator", "InstanceSegEvaluator", "evaluate_predictions_on_coco"]


def _int_image_ids(
    dataset: dict, coco_results: list[dict], img_ids: Sequence | None
) -> tuple[dict, list[dict], list[int] | None]:
    """Renumber image ids 0..N-1 when some are not ints (faster-coco-eval casts ids with ``int()``; ADE20K and
    Cityscapes jsons may use file stems)."""
    ids = [img["id"] for img in dataset["images"]]
    if all(isinstance(i, int) for i in ids):
        return dataset, coco_results, None if img_ids is None else list(img_ids)
    to_int = {image_id: k for k, image_id in enumerate(ids)}

    def lookup(image_id):
        if image_id not in to_int:
            raise ValueError(f"image id {image_id!r} is not an image of the ground-truth json")
        return to_int[image_id]

    dataset = dict(
        dataset,
        images=[dict(img, id=lookup(img["id"])) for img in dataset["images"]],
        annotations=[dict(a, image_id=lookup(a["image_id"])) for a in dataset.get("annotations", [])],
    )
    coco_results = [dict(r, image_id=lookup(r["image_id"])) for r in coco_results]
    return dataset, coco_results, None if img_ids is None else [lookup(i) for i in img_ids]


def _fast_cocoeval(coco_gt: COCO, coco_results: list[dict], iou_type: str, img_ids: Sequence | None):
    """faster-coco-eval's C++ COCOeval on a private copy of the ground truth (it annotates gt dicts in place)."""
    import faster_coco_eval

    dataset, coco_results, img_ids = _int_image_ids(copy.deepcopy(coco_gt.dataset), coco_results, img_ids)
    gt = faster_coco_eval.COCO(dataset)
    coco_eval = faster_coco_eval.COCOeval_faster(gt, gt.loadRes(coco_results), iou_type, print_function=logger.debug)
    return coco_eval, img_ids


def evaluate_predictions_on_coco(
    coco_gt: COCO,
    coco_results: list[dict],
    iou_type: str,
    *,
    use_fast_impl: bool = True,
    img_ids: Sequence[int] | None = None,
    max_dets_per_image: Sequence[int] | None = None,
    copy_results: bool = True,
):
    """Run COCOeval (``iou_type`` "bbox" or "segm") and return the evaluated object (``.stats``, ``.eval``).

    ``use_fast_impl`` picks faster-coco-eval; otherwise pycocotools. Both report the 12 COCO summary numbers
    with AP, AP50, AP75, APs, APm, APl first. COCOeval annotates the result dicts in place; with the default
    ``copy_results`` it works on a deep copy, ``copy_results=False`` is for a caller that made the list for this
    call only (the evaluator: the results of a whole dataset are the one big thing held in ``evaluate()``).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if len(coco_results) == 0:
        raise ValueError("COCOeval needs at least one prediction")
    max_dets_per_image = list(max_dets_per_image or [1, 10, 100])
    if len(max_dets_per_image) < 3:
        raise ValueError(f"max_dets_per_image needs at least 3 entries (COCOeval), got {max_dets_per_image}")

    if copy_results:
        coco_results = copy.deepcopy(coco_results)
    if iou_type == "segm":
        # With a "bbox" in the results, COCO would use the box area (not the mask area) for small/medium/large.
        for c in coco_results:
            c.pop("bbox", None)

    if use_fast_impl:
        coco_eval, img_ids = _fast_cocoeval(coco_gt, coco_results, iou_type, img_ids)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(coco_results)
        # pycocotools' summarize() hard-codes maxDets=100 for AP; detectron2's subclass follows params.maxDets.
        coco_eval = (COCOeval if max_dets_per_image[2] == 100 else COCOevalMaxDets)(coco_gt, coco_dt, iou_type)
    coco_eval.params.maxDets = max_dets_per_image
    if img_ids is not None:
        coco_eval.params.imgIds = list(img_ids)

    with contextlib.redirect_stdout(io.StringIO()) as summary:
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.debug(summary.getvalue())
    return coco_eval


class COCOEvaluator(D2COCOEvaluator):
    """detectron2's COCOEvaluator whose fast path is faster-coco-eval instead of the missing ``detectron2._C``.

    Same constructor as detectron2's (``dataset_name, tasks, distributed, output_dir, max_dets_per_image,
    use_fast_impl``). Keypoints are not supported (no keypoint model in this project).
    """

    def __init__(self, dataset_name: str, *args, **kwargs) -> None:
        try:
            super().__init__(dataset_name, *args, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # pycocotools' parse error names no file
            json_file = MetadataCatalog.get(dataset_name).get("json_file")
            raise DatasetFileError(invalid_json_message(json_file, e, f"ground truth of {dataset_name!r}")) from e

    def _unmap_category_ids(self, coco_results: list[dict[str, Any]]) -> None:
        """Contiguous training ids -> dataset category ids, in place (detectron2's rule: ids are 0..N-1)."""
        if not hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            return
        dataset_id_to_contiguous_id = self._metadata.thing_dataset_id_to_contiguous_id
        contiguous_ids = sorted(dataset_id_to_contiguous_id.values())
        if contiguous_ids != list(range(len(contiguous_ids))):
            raise ValueError(
                f"COCOEvaluator: thing contiguous ids of {self._metadata.name} are not 0..N-1 "
                f"(got {contiguous_ids[:5]}...); use InstanceSegEvaluator for such datasets"
            )
        self._remap(coco_results, {v: k for k, v in dataset_id_to_contiguous_id.items()})

    @staticmethod
    def _remap(coco_results: list[dict[str, Any]], reverse_id_mapping: dict[int, int]) -> None:
        for result in coco_results:
            category_id = result["category_id"]
            if category_id not in reverse_id_mapping:
                raise ValueError(
                    f"A prediction has class {category_id}, which is not a thing class of the dataset "
                    f"(thing contiguous ids: {sorted(reverse_id_mapping)})"
                )
            result["category_id"] = reverse_id_mapping[category_id]

    def _class_names(self) -> list[str]:
        """Names along COCOeval's category axis (sorted ground-truth category ids).

        Taken from the json rather than ``metadata.thing_classes``, which some registrations index by contiguous
        id over all classes (things and stuff) and so does not line up with the json's thing categories.
        """
        return [c["name"] for c in self._coco_api.loadCats(sorted(self._coco_api.getCatIds()))]

    # ---- per image: stream to the spool --------------------------------------------------------------------------
    def reset(self) -> None:
        if not hasattr(self, "_spool"):
            self._spool = PredictionSpool("coco_instances_", self._output_dir, self._distributed)
        self._spool.reset()
        self._predictions = []  # detectron2's list; stays empty

    def process(self, inputs, outputs) -> None:
        for input, output in zip(inputs, outputs):
            if "proposals" in output:
                raise ValueError("COCOEvaluator: proposal (box recall) evaluation is not supported by dinat_m2f")
            if "instances" in output:
                instances = output["instances"].to(self._cpu_device)
                image_id = input["image_id"]
                self._spool.write({"image_id": image_id, "instances": instances_to_coco_json(instances, image_id)})

    # ---- whole dataset -------------------------------------------------------------------------------------------
    def evaluate(self, img_ids=None):
        """detectron2's COCOEvaluator.evaluate on the spooled records (rank 0 returns the results, others {})."""
        spooled = self._spool.finish()
        if spooled is None:
            return {}
        try:
            if spooled.is_empty():
                self._logger.warning("[COCOEvaluator] Did not receive valid predictions.")
                return {}
            self._results = OrderedDict()
            self._eval_predictions(spooled, img_ids=img_ids)
        finally:
            self._spool.cleanup()
        return copy.deepcopy(self._results)

    def _coco_results(self, spooled: SpooledRecords, drop_bbox: bool = False) -> Iterator[dict[str, Any]]:
        """The COCO-format results of every image, with dataset category ids, read back one image at a time."""
        for record in spooled:
            results = record["instances"]
            self._unmap_category_ids(results)
            for result in results:
                if drop_bbox:
                    result.pop("bbox", None)
                yield result

    def _tasks_of(self, spooled: SpooledRecords) -> list[str]:
        if self._tasks:
            return list(self._tasks)
        return self._tasks_from_predictions(result for record in spooled for result in record["instances"])

    def _eval_predictions(self, spooled: SpooledRecords, img_ids=None) -> None:
        tasks = self._tasks_of(spooled)
        if "keypoints" in tasks:
            raise ValueError("keypoint evaluation is not supported by dinat_m2f's COCOEvaluator")

        if self._output_dir:
            file_path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info(f"Saving results to {file_path}")
            write_json_array(file_path, self._coco_results(spooled))

        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return

        self._logger.info(
            "Evaluating predictions with {} ...".format("faster-coco-eval" if self._use_fast_impl else "pycocotools")
        )
        for task in sorted(tasks):
            # Read afresh for each task: COCOeval annotates the dicts in place, and "segm" drops the boxes.
            coco_results = list(self._coco_results(spooled, drop_bbox=task == "segm"))
            coco_eval = (
                evaluate_predictions_on_coco(
                    self._coco_api,
                    coco_results,
                    task,
                    use_fast_impl=self._use_fast_impl,
                    img_ids=img_ids,
                    max_dets_per_image=self._max_dets_per_image,
                    copy_results=False,
                )
                if len(coco_results) > 0
                else None  # COCOeval does not handle empty results
            )
            del coco_results
            self._results[task] = self._derive_coco_results(coco_eval, task, class_names=self._class_names())


class InstanceSegEvaluator(COCOEvaluator):
    """Mask AP for datasets whose thing classes are a non-contiguous subset of the training ids.

    In ADE20K panoptic (and Mapillary Vistas) the model predicts over all 150 classes and the things sit at
    scattered ids among the stuff ids; detectron2's COCOEvaluator asserts the thing ids are exactly 0..N-1.
    This one un-maps any contiguous id that belongs to a thing class and rejects every other id.
    """

    def _unmap_category_ids(self, coco_results: list[dict[str, Any]]) -> None:
        if not hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            return
        reverse = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
        self._remap(coco_results, reverse)
