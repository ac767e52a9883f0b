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
from dinat_m2f.config import ConfigError, check_config, load_config  # noqa: F401  (ConfigError: re-exported)
from dinat_m2f.data.datasets.custom import register_from_config
from dinat_m2f.engine import AtomicCheckpointer, launch
from dinat_m2f.engine.trainer import Trainer, evaluate
from dinat_m2f.utils.cpu_memory import keep_freed_cpu_memory


def setup(args) -> CfgNode:
    opts = list(args.opts)
    if getattr(args, "device", "auto") == "cpu":
        opts += ["MODEL.DEVICE", "cpu"]
    if getattr(args, "trust_weights", False):
        opts += ["MODEL.TRUST_WEIGHTS", "True"]
    cfg = load_config(args.config_file, opts)
    register_from_config(cfg)  # DATASETS.REGISTER: the user's own datasets
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
    if cfg.MODEL.DEVICE == "cpu":
        keep_freed_cpu_memory()  # reuse the activations' memory between iterations (DINAT_M2F_KEEP_FREED_MEMORY=0: off)
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
