"""``MODEL.DINAT.*``: the DiNAT / DiNAT_s backbone keys (defaults of the official Mask2Former DiNAT-L wrapper)."""

from __future__ import annotations

from detectron2.config import CfgNode


def add_dinat_config(cfg: CfgNode) -> None:
    """Add ``MODEL.DINAT`` to ``cfg`` (in place). Used by both ``D2DiNAT`` and ``D2DiNATs``."""
    cfg.MODEL.DINAT = CfgNode()
    cfg.MODEL.DINAT.EMBED_DIM = 192
    cfg.MODEL.DINAT.DEPTHS = [3, 4, 18, 5]
    cfg.MODEL.DINAT.NUM_HEADS = [6, 12, 24, 48]
    cfg.MODEL.DINAT.KERNEL_SIZE = 7
    # Per stage, per layer: dilations[stage][layer]. None means plain NA (every dilation 1, i.e. NAT).
    cfg.MODEL.DINAT.DILATIONS = None
    cfg.MODEL.DINAT.MLP_RATIO = 2.0
    cfg.MODEL.DINAT.QKV_BIAS = True
    cfg.MODEL.DINAT.QK_SCALE = None
    cfg.MODEL.DINAT.DROP_RATE = 0.0
    cfg.MODEL.DINAT.ATTN_DROP_RATE = 0.0
    cfg.MODEL.DINAT.DROP_PATH_RATE = 0.3
    # None: no layer scale (the official M2F wrapper never plumbs it); a float gives gamma1/gamma2 (DiNAT-Base).
    cfg.MODEL.DINAT.LAYER_SCALE = None
    cfg.MODEL.DINAT.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # -1: nothing frozen; 0: the patch embedding; i >= 1: the embedding and stages 1..i (with their norms).
    cfg.MODEL.DINAT.FROZEN_STAGES = -1
    # Activation checkpointing (torch.utils.checkpoint) of every transformer layer while training.
    cfg.MODEL.DINAT.USE_CHECKPOINT = False
    # Apply the classification model's init (trunc-normal Linear weights, zero biases). False, as the official
    # detectron2 backbone (it defines this init but never applies it): layers keep PyTorch's default init.
    cfg.MODEL.DINAT.TRUNC_NORMAL_INIT = False
    # Neighborhood-attention backend: "" = automatic (DINAT_M2F_NA_BACKEND, else the default for the device and
    # dtype), or "native", "triton" (fused attention only), "reference" (slow pure PyTorch); see dinat_m2f.ops.backends.
    cfg.MODEL.DINAT.NA_BACKEND = ""
