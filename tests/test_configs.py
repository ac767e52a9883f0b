"""Every config in configs/ loads with known keys only, and every leaf config builds its model (on the meta device)."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from paper_settings import PAPER_SETTINGS

from dinat_m2f.config import ConfigError, check_config, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALL_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
LEAF_CONFIGS = [c for c in ALL_CONFIGS if not os.path.basename(c).startswith("Base-")]
PAPER_L = [c for c in LEAF_CONFIGS if "dinat_large" in c]

# Backbone parameters (DiNAT with its 4 output norms, no classifier) from the spec's analytic count.
BACKBONE_MILLIONS = {"mini": 19.47, "tiny": 27.39, "small": 49.95, "base": 88.75, "large": 199.61}


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def test_the_paper_settings_are_all_there():
    names = {_rel(c) for c in PAPER_L}
    for dataset, task in sorted(PAPER_SETTINGS):
        assert any(n.startswith(f"configs/{dataset}/{task}-segmentation/dinat/") for n in names), (dataset, task)
    for variant in ("mini", "tiny", "small", "base"):
        assert any(f"dinat_{variant}" in c and "ade20k/semantic" in c for c in LEAF_CONFIGS), variant
        assert any(f"dinat_{variant}" in c and "coco/panoptic" in c for c in LEAF_CONFIGS), variant
    assert any("configs/demo/" in _rel(c) for c in LEAF_CONFIGS)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_rel)
def test_config_loads(path):
    cfg = load_config(path, [])
    assert cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
    # no python-eval YAML tags anywhere
    with open(path) as f:
        assert "!!python" not in f.read()


@pytest.mark.parametrize("path", PAPER_L, ids=_rel)
def test_paper_settings_match_the_paper(path):
    cfg = load_config(path, [])
    d = cfg.MODEL.DINAT
    assert (d.EMBED_DIM, list(d.DEPTHS), list(d.NUM_HEADS), d.KERNEL_SIZE) == (192, [3, 4, 18, 5], [6, 12, 24, 48], 11)
    assert d.DILATIONS == [[1, 14, 1], [1, 4, 1, 7], [1, 2, 1, 3] * 4 + [1, 3], [1, 1, 1, 1, 1]]
    assert cfg.SOLVER.AMP.ENABLED is False and cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 1e-4
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model" and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.01
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10 and cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS == 6
    semantic_only = "semantic-segmentation" in path
    expected_queries = 100 if semantic_only else 200
    assert expected_queries == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    if "ade20k" in path:
        assert tuple(cfg.INPUT.CROP.SIZE) == (640, 640) and cfg.SOLVER.MAX_ITER == 160000
    if "cityscapes" in path:
        assert tuple(cfg.INPUT.CROP.SIZE) == (512, 1024) and cfg.SOLVER.MAX_ITER == 90000
    if "coco" in path:
        assert cfg.SOLVER.MAX_ITER == 737500 and cfg.INPUT.IMAGE_SIZE == 1024


@pytest.mark.parametrize("path", LEAF_CONFIGS, ids=_rel)
def test_config_builds_its_model(path):
    """Build on the meta device (no memory, no init time); check the backbone size against the analytic count."""
    cfg = load_config(path, ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        model = build_model(cfg)
    backbone = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    variant = next((v for v in BACKBONE_MILLIONS if f"dinat_{v}" in path), None)
    if variant is not None:
        assert backbone == pytest.approx(BACKBONE_MILLIONS[variant], abs=0.01)
    head = model.sem_seg_head
    assert head.num_classes == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert model.num_queries == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES


def test_unknown_config_key_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{LEAF_CONFIGS[0]}"\nMODEL:\n  DINAT:\n    KERNEL_SIZ: 7\n')
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key: .*MODEL.DINAT.KERNEL_SIZ"):
        load_config(str(bad), [])
    with pytest.raises(ConfigError, match=r"override: unknown config key: .*SOLVER.BASE_LRR"):
        load_config(LEAF_CONFIGS[0], ["SOLVER.BASE_LRR", "0.1"])


def test_missing_config_and_weights_files_are_clear_errors(tmp_path):
    from dinat_m2f.engine import MissingWeightsError

    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"), [])
    cfg = load_config(PAPER_L[0], ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(tmp_path / "missing.pkl")])
    with pytest.raises(MissingWeightsError, match="MODEL.WEIGHTS file not found.*missing.pkl"):
        check_config(cfg)


def test_default_config_names_only_buildable_parts():
    """get_cfg()'s defaults build a DiNAT-Mask2Former once the model is chosen (detectron2's own defaults name
    GeneralizedRCNN with a ResNet-FPN: the parts and the backbone features are the four keys set here)."""
    from dinat_m2f.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.BACKBONE.NAME = "D2DiNAT"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "MaskFormerHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    assert type(model.sem_seg_head.pixel_decoder).__name__ == cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    assert model.sem_seg_head.transformer_in_feature == cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE


def test_config_functions_are_exported_as_mask2former_users_expect():
    """``add_maskformer2_config`` / ``add_dinat_config`` on detectron2's own get_cfg(), as Mask2Former's scripts do."""
    from detectron2.config import get_cfg as d2_get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    from dinat_m2f import add_dinat_config, add_maskformer2_config

    cfg = d2_get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_dinat_config(cfg)
    assert cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE == "multi_scale_pixel_decoder"
    assert cfg.MODEL.DINAT.EMBED_DIM == 192
