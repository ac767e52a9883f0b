"""LR schedules: detectron2's (WarmupMultiStepLR, WarmupCosineLR) plus DeepLab's WarmupPolyLR."""

from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.projects.deeplab import build_lr_scheduler as deeplab_build_lr_scheduler

KNOWN_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR", "WarmupPolyLR")


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer):
    """The scheduler named by SOLVER.LR_SCHEDULER_NAME (poly: SOLVER.POLY_LR_POWER / POLY_LR_CONSTANT_ENDING)."""
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    if name not in KNOWN_SCHEDULERS:
        raise ValueError(f"SOLVER.LR_SCHEDULER_NAME: unknown scheduler {name!r} (expected one of {KNOWN_SCHEDULERS})")
    return deeplab_build_lr_scheduler(cfg, optimizer)
