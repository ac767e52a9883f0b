"""Reading a config file plus command-line overrides, and the checks that run before a long job starts."""

from __future__ import annotations

import os

import torch
from detectron2.config import CfgNode
from detectron2.utils import comm

from dinat_m2f.config import get_cfg


class ConfigError(ValueError):
    """A config file or an override names a key this project does not know, or has a bad value."""


def load_config(config_file: str, opts: list[str]) -> CfgNode:
    """get_cfg() + the YAML file (with its _BASE_ chain) + command-line overrides, frozen.

    Unknown keys are errors (naming the key and where it came from), never silently ignored.
    """
    cfg = get_cfg()
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file, allow_unsafe=False)
        except KeyError as e:
            raise ConfigError(f"{config_file}: unknown config key: {e.args[0]}") from None
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs, got an odd count: {opts}")
    for key in opts[0::2]:
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise ConfigError(f"command-line override: unknown config key: {key!r}")
            node = node[part]
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def check_config(cfg: CfgNode, resume: bool = False) -> None:
    """Checks that catch mistakes before a long run starts."""
    if cfg.SOLVER.IMS_PER_BATCH % comm.get_world_size():
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by the number of workers "
            f"({comm.get_world_size()})"
        )
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: add MODEL.DEVICE cpu")
    resuming = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    weights = cfg.MODEL.WEIGHTS
    if weights and not resuming and "://" not in weights and not os.path.isfile(weights):
        from dinat_m2f.engine import MissingWeightsError

        raise MissingWeightsError(
            f"MODEL.WEIGHTS file not found: {weights!r} (convert the official weights with "
            "tools/convert_dinat_checkpoint.py, give a URL, or set MODEL.WEIGHTS '' to train from scratch)"
        )
