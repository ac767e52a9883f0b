"""Cityscapes semantic / instance evaluation through cityscapesscripts, on numpy 2.

detectron2's ``CityscapesSemSegEvaluator`` and ``CityscapesInstanceEvaluator`` write predictions to a scratch
directory (so nothing accumulates in RAM) and call cityscapesscripts' official scripts. cityscapesscripts 2.3.0
calls ``np.in1d``, which numpy 2.4 removed; these subclasses give the two script modules a numpy whose ``in1d``
is ``isin(...).ravel()`` (its documented equivalent) and check the ground-truth folder before evaluating.
Panoptic evaluation is :class:`dinat_m2f.evaluation.CityscapesPanopticEvaluator`.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import json
import logging
import os
import types
from collections import OrderedDict

import numpy as np
from detectron2.evaluation import CityscapesInstanceEvaluator as D2CityscapesInstanceEvaluator
from detectron2.evaluation import CityscapesSemSegEvaluator as D2CityscapesSemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = ["CityscapesInstanceEvaluator", "CityscapesSemSegEvaluator", "cityscapesscripts_on_numpy2"]


class _NumpyWithIn1d(types.ModuleType):
    """numpy, plus the ``in1d`` that numpy 2.4 removed (as ``isin`` on the flattened input)."""

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def in1d(ar1, ar2, assume_unique: bool = False, invert: bool = False) -> np.ndarray:
        return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique, invert=invert)


def _write_dict_to_json(data, path: str, *, base_dir: str) -> None:
    """cityscapesscripts' ``writeDict2JSON`` that also writes numpy scalars and keeps relative paths in base_dir.

    The original serialises objects through ``o.__dict__`` (numpy 2 scalars have none) and writes its debug
    ``matches.json`` into the current working directory.
    """

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return o.__dict__

    if not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    with open(path, "w") as f:
        json.dump(data, f, default=default, sort_keys=True, indent=4)


@contextlib.contextmanager
def cityscapesscripts_on_numpy2(work_dir: str):
    """Run cityscapesscripts' evaluation scripts on numpy 2, writing their side files into ``work_dir``.

    Only the two script modules are touched (their ``np`` and ``writeDict2JSON`` globals), and only while the
    context is open.
    """
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling, evalPixelLevelSemanticLabeling

    modules = (evalInstanceLevelSemanticLabeling, evalPixelLevelSemanticLabeling)
    saved = [(m.np, m.writeDict2JSON) for m in modules]
    try:
        for m in modules:
            if not hasattr(np, "in1d"):
                m.np = _NumpyWithIn1d("numpy")
            m.writeDict2JSON = functools.partial(_write_dict_to_json, base_dir=work_dir)
        yield
    finally:
        for m, (m_np, m_write) in zip(modules, saved):
            m.np, m.writeDict2JSON = m_np, m_write


def _check_gt_dir(gt_dir: str, pattern: str) -> None:
    if not os.path.isdir(gt_dir):
        raise FileNotFoundError(f"Cityscapes ground-truth folder {gt_dir} does not exist")
    if not glob.glob(os.path.join(gt_dir, "*", pattern)):
        raise FileNotFoundError(f"no Cityscapes ground truth {os.path.join(gt_dir, '*', pattern)} found")


class _QuietEvaluateMixin:
    """Check inputs, run the scripts on numpy 2, return plain floats, and send the scripts' console tables to the debug log."""

    _gt_pattern: str

    def evaluate(self):
        if comm.is_main_process():
            _check_gt_dir(PathManager.get_local_path(self._metadata.gt_dir), self._gt_pattern)
        work_dir = self._temp_dir  # the parent's evaluate() removes it
        with cityscapesscripts_on_numpy2(work_dir), contextlib.redirect_stdout(io.StringIO()) as out:
            results = super().evaluate()
        logger.debug(out.getvalue())
        if results is None:  # not the main process
            return None
        return OrderedDict((task, {k: float(v) for k, v in metrics.items()}) for task, metrics in results.items())


class CityscapesSemSegEvaluator(_QuietEvaluateMixin, D2CityscapesSemSegEvaluator):
    """Cityscapes IoU / iIoU (classes and categories) from ``*_gtFine_labelIds.png`` in ``metadata.gt_dir``."""

    _gt_pattern = "*_gtFine_labelIds.png"


class CityscapesInstanceEvaluator(_QuietEvaluateMixin, D2CityscapesInstanceEvaluator):
    """Cityscapes mask AP / AP50 from ``*_gtFine_instanceIds.png`` in ``metadata.gt_dir``."""

    _gt_pattern = "*_gtFine_instanceIds.png"
