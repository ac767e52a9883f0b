"""Pick the evaluators of a dataset from its ``evaluator_type``, as Mask2Former's ``train_net.py`` does."""

from __future__ import annotations

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, LVISEvaluator

from dinat_m2f.evaluation.cityscapes_evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator
from dinat_m2f.evaluation.coco_evaluation import COCOEvaluator, InstanceSegEvaluator
from dinat_m2f.evaluation.panoptic_evaluation import CityscapesPanopticEvaluator, COCOPanopticEvaluator
from dinat_m2f.evaluation.sem_seg_evaluation import SemSegEvaluator

__all__ = ["build_evaluator"]

_PANOPTIC_TYPES = {
    "coco_panoptic_seg",
    "ade20k_panoptic_seg",
    "cityscapes_panoptic_seg",
    "mapillary_vistas_panoptic_seg",
}


def _thing_ids_contiguous(metadata) -> bool:
    ids = sorted(metadata.get("thing_dataset_id_to_contiguous_id", {}).values())
    return ids == list(range(len(ids)))


def _instance_evaluator(dataset_name: str, metadata, output_folder: str) -> COCOEvaluator:
    """Mask AP; InstanceSegEvaluator for ADE20K and wherever the thing ids are not 0..N-1."""
    if dataset_name.startswith("ade20k") or not _thing_ids_contiguous(metadata):
        return InstanceSegEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder)
    return COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder)


def build_evaluator(cfg, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
    """The evaluator(s) of ``dataset_name``, chosen by ``MetadataCatalog.get(dataset_name).evaluator_type``.

    Panoptic datasets add PQ / mask AP / mIoU according to ``MODEL.MASK_FORMER.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON``.
    Several evaluators come back wrapped in ``DatasetEvaluators``. Instance results are scored as mask AP ("segm") only,
    the metric of the paper: the ``pred_boxes`` MaskFormer gives are the tight boxes of its masks, so a box AP would
    only restate the masks.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type")
    if evaluator_type is None:
        raise ValueError(f"dataset {dataset_name!r} has no evaluator_type in its metadata; is it registered?")
    test = cfg.MODEL.MASK_FORMER.TEST

    # Cityscapes semantic / instance datasets have exactly one evaluator.
    if evaluator_type == "cityscapes_sem_seg":
        return CityscapesSemSegEvaluator(dataset_name)
    if evaluator_type == "cityscapes_instance":
        return CityscapesInstanceEvaluator(dataset_name)
    if evaluator_type == "lvis":
        return LVISEvaluator(dataset_name, output_dir=output_folder)

    evaluators: list[DatasetEvaluator] = []
    if evaluator_type in ("sem_seg", "ade20k_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if evaluator_type == "coco":
        evaluators.append(_instance_evaluator(dataset_name, metadata, output_folder))
    if evaluator_type in _PANOPTIC_TYPES and test.PANOPTIC_ON:
        panoptic_cls = (
            CityscapesPanopticEvaluator if evaluator_type == "cityscapes_panoptic_seg" else COCOPanopticEvaluator
        )
        evaluators.append(panoptic_cls(dataset_name, output_folder))
    if evaluator_type == "coco_panoptic_seg":
        if test.INSTANCE_ON:
            evaluators.append(COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder))
        if test.SEMANTIC_ON:
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if evaluator_type in ("ade20k_panoptic_seg", "mapillary_vistas_panoptic_seg") and test.INSTANCE_ON:
        evaluators.append(InstanceSegEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder))
    if evaluator_type == "mapillary_vistas_panoptic_seg" and test.SEMANTIC_ON:
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if evaluator_type == "cityscapes_panoptic_seg":
        if test.SEMANTIC_ON:
            evaluators.append(CityscapesSemSegEvaluator(dataset_name))
        if test.INSTANCE_ON:
            evaluators.append(CityscapesInstanceEvaluator(dataset_name))

    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} of evaluator_type {evaluator_type!r} "
            f"(PANOPTIC_ON={test.PANOPTIC_ON}, INSTANCE_ON={test.INSTANCE_ON}, SEMANTIC_ON={test.SEMANTIC_ON})"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
