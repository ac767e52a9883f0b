"""Shared by the end-to-end training tests: a tiny synthetic dataset and a tiny DiNAT-Mask2Former config.

Also a script entry point (``python tests/train_helpers.py [--resume] [--sleep-after-iter N] OUT_DIR [opts]``) that
trains with train_net.py's Trainer and, with ``--sleep-after-iter``, blocks after that iteration (so a test can
SIGKILL it mid-training at a known point).
"""

from __future__ import annotations

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEMO_CONFIG = os.path.join(REPO, "configs", "demo", "maskformer2_dinat_demo.yaml")

# A ~0.1M-parameter model at 64 px: every part of the real architecture, minimal sizes.
TINY_OPTS = [
    "MODEL.DINAT.EMBED_DIM", "16",
    "MODEL.DINAT.DEPTHS", "[1, 1, 1, 1]",
    "MODEL.DINAT.NUM_HEADS", "[1, 1, 2, 2]",
    "MODEL.DINAT.KERNEL_SIZE", "3",
    "MODEL.DINAT.DILATIONS", "[[2], [1], [1], [1]]",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
    "MODEL.MASK_FORMER.NHEADS", "2",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "6",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.001",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.LOG_PERIOD", "1",
    "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TEST", "()",
    "DETERMINISTIC", "True",
    "SEED", "7",
]  # fmt: skip


def make_tiny_dataset(datasets_root: str) -> None:
    """Generate a 8+4 image, 64 px synthetic dataset under ``datasets_root`` and register the names there."""
    from dinat_m2f.data.synthetic import SyntheticSpec, ensure_synthetic_dataset, register_all_synthetic

    ensure_synthetic_dataset(os.path.join(datasets_root, "synthetic"), SyntheticSpec(num_train=8, num_val=4, size=64))
    register_all_synthetic(datasets_root)


def run_loop(loop, iters: int) -> None:
    """Run ``iters`` steps of a training loop (SimpleTrainer-like) under an EventStorage, as TrainerBase.train does."""
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        for i in range(iters):
            storage.iter = i
            loop.iter = i
            loop.run_step()
            storage.step()


def launch_worker(out_dir: str, datasets_root: str, opts: list[str]) -> None:
    """One worker of a multi-process run (started by dinat_m2f.engine.launch): trains, then saves its first batch,
    its first losses and its final weights to ``out_dir/rank<r>.pt`` (rank 0 also saves the initial weights)."""
    import torch
    from detectron2.utils import comm

    import train_net

    make_tiny_dataset(datasets_root)
    argv = ["--config-file", DEMO_CONFIG, *TINY_OPTS, "OUTPUT_DIR", out_dir, *opts]
    cfg = train_net.setup(train_net.argument_parser().parse_args(argv))
    trainer = train_net.Trainer(cfg)
    model = trainer._trainer.model
    inner = model.module if hasattr(model, "module") else model
    first: dict = {}

    def capture(module, inputs, output):
        if not first:
            first["batch"] = inputs[0]
            first["losses"] = {k: v.detach().clone() for k, v in output.items()}

    inner.register_forward_hook(capture)
    if comm.get_rank() == 0:
        torch.save(inner.state_dict(), os.path.join(out_dir, "init.pt"))
    trainer.resume_or_load(resume=False)
    trainer.train()
    first["final"] = inner.state_dict()
    first["world_size"] = comm.get_world_size()
    torch.save(first, os.path.join(out_dir, f"rank{comm.get_rank()}.pt"))


def _script() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep-after-iter", type=int, default=-1)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    from detectron2.engine import HookBase

    import train_net

    make_tiny_dataset(os.environ["DETECTRON2_DATASETS"])

    class BlockAfter(HookBase):
        def after_step(self):
            if self.trainer.iter == args.sleep_after_iter:
                open(os.path.join(args.out_dir, "blocked"), "w").close()  # noqa: SIM115
                time.sleep(600)

    class BlockingTrainer(train_net.Trainer):
        def build_hooks(self):
            return super().build_hooks() + [BlockAfter()]

    train_net.Trainer = BlockingTrainer
    argv = ["--config-file", DEMO_CONFIG] + (["--resume"] if args.resume else [])
    train_net.cli(argv + TINY_OPTS + ["OUTPUT_DIR", args.out_dir] + args.opts)


if __name__ == "__main__":
    _script()
