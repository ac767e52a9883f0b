"""Training switches of this project (train_net.py, the optimizer builder, hooks, the checkpointer, the mappers)."""

from __future__ import annotations

from detectron2.config import CfgNode as CN  # noqa: N817 (detectron2 convention)


def add_training_config(cfg: CN) -> None:
    """Add the keys read by ``dinat_m2f.engine`` and ``train_net.py`` (idempotent)."""
    # Weight decay of the neighborhood-attention relative positional bias (params named ``rpb``).
    # None: decay it like any weight (what the paper's Mask2Former code did, wd = SOLVER.WEIGHT_DECAY);
    # 0.0: no decay (what the DiNAT detection / UPerNet code does). Any float is used as its decay.
    cfg.SOLVER.RPB_WEIGHT_DECAY = None
    # Mask2Former's keys; defined here too so a config tree without add_maskformer2_config still loads.
    if not hasattr(cfg.SOLVER, "WEIGHT_DECAY_EMBED"):
        cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    if not hasattr(cfg.SOLVER, "OPTIMIZER"):
        cfg.SOLVER.OPTIMIZER = "ADAMW"
    if not hasattr(cfg.SOLVER, "BACKBONE_MULTIPLIER"):
        cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Stop the run as soon as a loss or the gradient is NaN or infinite (naming the iteration and the loss term or the
    # first parameter with a non-finite gradient), before the optimizer step.
    cfg.SOLVER.NAN_GUARD = True
    # AMP dtype: "auto" = float16 on CUDA; on the CPU bfloat16 where it has AVX512_BF16, else float32 (no autocast:
    # bfloat16 would be many times slower there); or "float16" / "bfloat16".
    cfg.SOLVER.AMP.DTYPE = "auto"
    # Print iteration, losses, LR and ETA every LOG_PERIOD iterations.
    cfg.SOLVER.LOG_PERIOD = 20

    # Mappers skip (with a warning) a sample whose image or annotation file is missing or corrupt, instead of
    # stopping the run. False = raise a clear error naming the file.
    cfg.DATALOADER.SKIP_CORRUPT = False

    # Weight files (MODEL.WEIGHTS, --resume, the demo) are read without running code from them: only tensors, numpy
    # arrays, containers, strings and numbers. True unpickles fully (can run code): only for a file you trust.
    cfg.MODEL.TRUST_WEIGHTS = False
    # fnmatch patterns of model tensors that may be missing from MODEL.WEIGHTS or mis-shaped in it (they keep their
    # init; logged), e.g. ["sem_seg_head.predictor.class_embed.*", "criterion.empty_weight"] for another class
    # count. Any other missing or mis-shaped tensor is an error (see dinat_m2f/engine/weights_fit.py).
    cfg.MODEL.WEIGHTS_REINIT = []

    # Checkpointing (detectron2's SOLVER.CHECKPOINT_PERIOD keeps its meaning).
    cfg.CHECKPOINT = CN()
    # How many periodic checkpoints to keep on disk (None = all).
    cfg.CHECKPOINT.MAX_TO_KEEP = None
    # Write checkpoints to a temporary file and rename it into place (a kill mid-save leaves no truncated file).
    cfg.CHECKPOINT.ATOMIC = True

    # Deterministic training: seed every worker from SEED and ask torch for deterministic algorithms.
    cfg.DETERMINISTIC = False
