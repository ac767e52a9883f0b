"""The detectron2 internals (underscore names) this project relies on, gathered in one place.

detectron2 has no public way to do these; each is checked against detectron2 0.6 (the version this project pins).
When detectron2 changes one of them, this module is the only place to adapt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators

__all__ = [
    "builtin_metadata",
    "evaluator_parts",
    "last_eval_results",
    "periodic_writer_writers",
    "print_panoptic_results",
    "really_missing_keys",
]


def periodic_writer_writers(hook: hooks.PeriodicWriter) -> Sequence[Any]:
    """The event writers of a PeriodicWriter (to re-wrap them with another period without opening them again)."""
    return hook._writers


def evaluator_parts(evaluator: DatasetEvaluator) -> list[DatasetEvaluator]:
    """The evaluators inside a DatasetEvaluators, or ``[evaluator]`` for a single one."""
    if isinstance(evaluator, DatasetEvaluators):
        return list(evaluator._evaluators)
    return [evaluator]


def last_eval_results(trainer: DefaultTrainer) -> dict:
    """The results of the trainer's last evaluation (kept by the EvalHook that ``DefaultTrainer`` builds)."""
    if not hasattr(trainer, "_last_eval_results"):
        raise RuntimeError("the trainer has not evaluated yet (TEST.EVAL_PERIOD / DATASETS.TEST)")
    return trainer._last_eval_results


def builtin_metadata(dataset_name: str) -> dict:
    """detectron2's built-in metadata of ``"coco"``, ``"cityscapes"``, ... (class names, colours, id maps)."""
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

    return _get_builtin_metadata(dataset_name)


def really_missing_keys(model: Any, missing_keys: Sequence[str]) -> list[str]:
    """``missing_keys`` less the names of parameters shared with a loaded one (fvcore's own filter for its warning)."""
    from fvcore.common.checkpoint import _filter_reused_missing_keys

    return list(_filter_reused_missing_keys(model, list(missing_keys)))


def print_panoptic_results(pq_res: dict) -> None:
    """Log detectron2's PQ / SQ / RQ table (All, Things, Stuff) of a panopticapi ``pq_compute`` result."""
    from detectron2.evaluation.panoptic_evaluation import _print_panoptic_results

    _print_panoptic_results(pq_res)
