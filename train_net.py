#!/usr/bin/env python
"""Train or evaluate DiNAT + Mask2Former (the counterpart of Mask2Former's train_net.py).

Examples::

    # 8 GPUs on one machine
    python train_net.py --num-gpus 8 --config-file configs/coco/panoptic-segmentation/dinat/\
maskformer2_dinat_large_IN21k_bs16_100ep.yaml
    # 2 machines x 8 GPUs (run on each machine with its --machine-rank)
    python train_net.py --num-gpus 8 --num-machines 2 --machine-rank 0 --dist-url tcp://<host0>:29500 \
        --config-file ...
    # resume after an interruption (from OUTPUT_DIR/last_checkpoint)
    python train_net.py --num-gpus 8 --config-file ... --resume
    # evaluate a checkpoint (add TEST.AUG.ENABLED True for semantic multi-scale + flip)
    python train_net.py --num-gpus 8 --config-file ... --eval-only MODEL.WEIGHTS /path/to/model.pth
    # CPU (worker processes joined with gloo)
    python train_net.py --num-gpus 2 --config-file configs/demo/maskformer2_dinat_demo.yaml MODEL.DEVICE cpu
"""

from __future__ import annotations

import logging
import os

import torch
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

# Registers the datasets (the synthetic demo set included) and the model parts (meta-architecture, backbone, heads).
import dinat_m2f.data  # noqa: F401
import dinat_m2f.modeling  # noqa: F401
from dinat_m2f.config import get_cfg
from dinat_m2f.engine import AtomicCheckpointer, launch
from dinat_m2f.engine.trainer import Trainer, evaluate


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


def setup(args) -> CfgNode:
    opts = list(args.opts)
    if getattr(args, "device", "auto") == "cpu":
        opts += ["MODEL.DEVICE", "cpu"]
    if getattr(args, "trust_weights", False):
        opts += ["MODEL.TRUST_WEIGHTS", "True"]
    cfg = load_config(args.config_file, opts)
    check_config(cfg, resume=args.resume)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dinat_m2f")
    if cfg.DETERMINISTIC:
        # Deterministic kernels where torch has them; ops without one warn instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer.from_config(cfg, model, cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return evaluate(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu"],
        help="where the --num-gpus worker processes run: 'auto' = CUDA with NCCL if available, else CPU with gloo",
    )
    parser.add_argument(
        "--trust-weights",
        action="store_true",
        help="unpickle weight files fully (MODEL.TRUST_WEIGHTS True): this can run code from the file, use it only "
        "for files you trust; by default only tensors, arrays, containers, strings and numbers are read",
    )
    return parser


def cli(argv: list[str] | None = None):
    args = argument_parser().parse_args(argv)
    logging.getLogger(__name__).info(f"Command line arguments: {args}")
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=args.device,
    )


if __name__ == "__main__":
    cli()
