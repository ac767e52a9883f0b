"""Config: detectron2's defaults plus the DeepLab, Mask2Former, DiNAT and training keys of this project.

Each group of keys lives with its owner:
- ``add_dinat_config``: ``MODEL.DINAT.*`` (the backbone)
- ``add_maskformer2_config``: ``MODEL.MASK_FORMER.*``, ``INPUT.*`` extras, ... (as Mask2Former exports it)
- ``add_training_config``: switches of the engine (rpb decay, NaN guard, checkpoints, ...)
- ``add_custom_datasets_config``: ``DATASETS.REGISTER`` (the user's own datasets)

``load_config`` / ``check_config`` read and check the config of a run (train_net.py, the demos, the tools).
"""

from __future__ import annotations

from detectron2.config import CfgNode

from dinat_m2f.config.datasets import add_custom_datasets_config
from dinat_m2f.config.dinat import add_dinat_config
from dinat_m2f.config.loader import ConfigError, check_config, load_config
from dinat_m2f.config.maskformer2 import add_maskformer2_config
from dinat_m2f.config.training import add_training_config


def get_cfg() -> CfgNode:
    """A detectron2 config with every key this project knows, at its default."""
    from detectron2.config import get_cfg as d2_get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = d2_get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_dinat_config(cfg)
    add_training_config(cfg)
    add_custom_datasets_config(cfg)
    return cfg


__all__ = [
    "ConfigError",
    "add_custom_datasets_config",
    "add_dinat_config",
    "add_maskformer2_config",
    "add_training_config",
    "check_config",
    "get_cfg",
    "load_config",
]
