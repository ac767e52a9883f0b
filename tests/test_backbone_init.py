"""MODEL.DINAT.TRUNC_NORMAL_INIT (issue 15.9): by default the detectron2 backbones keep PyTorch's default init, as the
official D2DiNAT (it defines a trunc-normal init but never applies it); True applies the classifier's init."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.modeling import ShapeSpec, build_backbone
from torch import nn

from dinat_m2f.config import get_cfg


def _cfg(name: str, **dinat):
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = name
    c = cfg.MODEL.DINAT
    c.EMBED_DIM, c.DEPTHS, c.NUM_HEADS, c.KERNEL_SIZE = 32, [1, 1, 1, 1], [1, 2, 2, 4], 3
    c.DILATIONS = [[1], [1], [1], [1]]
    for key, value in dinat.items():
        setattr(c, key, value)
    return cfg


def _linears(backbone: nn.Module) -> list[nn.Linear]:
    return [m for m in backbone.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("name", ["D2DiNAT", "D2DiNATs"])
def test_default_init_is_pytorchs_like_the_official_backbone(name):
    assert get_cfg().MODEL.DINAT.TRUNC_NORMAL_INIT is False
    torch.manual_seed(0)
    backbone = build_backbone(_cfg(name), ShapeSpec(channels=3))
    for lin in _linears(backbone):
        bound = 1 / math.sqrt(lin.in_features)  # kaiming-uniform(a=sqrt(5)) weights, uniform biases in +-bound
        assert lin.weight.abs().max() <= bound
        assert lin.weight.std() > 0.5 * bound / math.sqrt(3)  # far wider than std 0.02 for these fan-ins
        assert lin.bias is None or lin.bias.abs().max() > 0


@pytest.mark.parametrize("name", ["D2DiNAT", "D2DiNATs"])
def test_trunc_normal_init_flag_applies_the_classifier_init(name):
    torch.manual_seed(0)
    backbone = build_backbone(_cfg(name, TRUNC_NORMAL_INIT=True), ShapeSpec(channels=3))
    weights = torch.cat([lin.weight.flatten() for lin in _linears(backbone)])
    assert weights.abs().max() <= 2.0  # trunc_normal_'s bounds a=-2, b=2
    assert abs(weights.std().item() - 0.02) < 0.002
    for lin in _linears(backbone):
        assert lin.bias is None or not lin.bias.any()
