"""Evaluation: evaluators per dataset (COCO / ADE20K / Cityscapes), picked by ``build_evaluator``, and semantic TTA."""

from dinat_m2f.evaluation.build import build_evaluator
from dinat_m2f.evaluation.cityscapes_evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator
from dinat_m2f.evaluation.coco_evaluation import COCOEvaluator, InstanceSegEvaluator, evaluate_predictions_on_coco
from dinat_m2f.evaluation.panoptic_evaluation import CityscapesPanopticEvaluator, COCOPanopticEvaluator
from dinat_m2f.evaluation.sem_seg_evaluation import SemSegEvaluator
from dinat_m2f.evaluation.test_time_augmentation import SemanticSegmentorWithTTA

__all__ = [
    "COCOEvaluator",
    "COCOPanopticEvaluator",
    "CityscapesInstanceEvaluator",
    "CityscapesPanopticEvaluator",
    "CityscapesSemSegEvaluator",
    "InstanceSegEvaluator",
    "SemSegEvaluator",
    "SemanticSegmentorWithTTA",
    "build_evaluator",
    "evaluate_predictions_on_coco",
]
