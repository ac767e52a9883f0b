"""Config: detectron2's defaults plus the DeepLab, Mask2Former, DiNAT and training keys of this project.

Each group of keys lives with its owner:
- ``dinat_m2f.config.dinat.add_dinat_config``: ``MODEL.DINAT.*`` (the backbone)
- ``dinat_m2f.config.maskformer2.add_maskformer2_config``: ``MODEL.MASK_FORMER.*``, ``INPUT.*`` extras, ...
- ``dinat_m2f.config.training.add_training_config``: switches of train_net.py (rpb decay, NaN guard, ...)
"""

from __future__ import annotations

from detectron2.config import CfgNode


def get_cfg() -> CfgNode:
    """A detectron2 config with every key this project knows, at its default."""
    from detectron2.config import get_cfg as d2_get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    from dinat_m2f.config.datasets import add_custom_datasets_config
    from dinat_m2f.config.dinat import add_dinat_config
    from dinat_m2f.config.maskformer2 import add_maskformer2_config
    from dinat_m2f.config.training import add_training_config

    cfg = d2_get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_dinat_config(cfg)
    add_training_config(cfg)
    add_custom_datasets_config(cfg)
    return cfg


# After get_cfg: loading.py imports it.
from dinat_m2f.config.loading import ConfigError, check_config, load_config  # noqa: E402

__all__ = ["ConfigError", "check_config", "get_cfg", "load_config"]
