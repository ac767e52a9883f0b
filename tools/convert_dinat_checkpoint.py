#!/usr/bin/env python
"""Convert an official NAT/DiNAT ImageNet checkpoint (.pth) to detectron2 backbone weights (.pth).

    python tools/convert_dinat_checkpoint.py dinat_large_in22k_224.pth dinat_large_in22k_224_11x11interp_d2.pth \
        --config-file configs/ade20k/semantic-segmentation/dinat/maskformer2_dinat_large_IN21k_bs16_160k.yaml

With ``--config-file`` the target kernel size comes from ``MODEL.DINAT.KERNEL_SIZE`` and every tensor is checked
against the D2DiNAT / D2DiNATs backbone the config builds (built on the meta device: no memory, no time);
any unexpected, missing or mis-shaped tensor is an error that names it (nothing is written then). Without it,
``--kernel-size`` alone resizes the biases. The classification head is dropped; each resized bias is logged.

Biases are resized Swin-style by default (``F.interpolate(mode="bicubic")``, as the official
``dinat_large_in22k_224_11x11interp.pth`` was made); ``--rpb-resize keys`` uses Keys cubic convolution instead
(exact on linear biases). The input is read without running code from it (``--trust-weights`` to unpickle fully a
file you trust). The output is a torch file ``{"model": {name: tensor}, "__author__": ..., "matching_heuristics":
True}`` (it loads with ``weights_only=True``); detectron2's checkpointer then matches ``backbone.X`` to ``X``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from dinat_m2f.modeling.backbone.convert import (
    CheckpointMismatchError,
    check_against_target,
    convert_state_dict,
    unwrap_state_dict,
)
from dinat_m2f.utils.safe_load import WeightsFileError, load_weights_file

logger = logging.getLogger("convert_dinat_checkpoint")


def target_shapes_from_config(config_file: str, opts: list[str]) -> tuple[dict[str, tuple[int, ...]], int]:
    """(name -> shape of the backbone the config builds, its kernel size), built on the meta device."""
    from detectron2.modeling import BACKBONE_REGISTRY, ShapeSpec

    import dinat_m2f.modeling.backbone  # noqa: F401 (registers D2DiNAT / D2DiNATs)
    from dinat_m2f.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    name = cfg.MODEL.BACKBONE.NAME
    if name not in ("D2DiNAT", "D2DiNATs"):
        raise ValueError(f"{config_file}: MODEL.BACKBONE.NAME is {name!r}, not D2DiNAT or D2DiNATs")
    with torch.device("meta"):
        backbone = BACKBONE_REGISTRY.get(name)(cfg, ShapeSpec(channels=3))
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    return shapes, cfg.MODEL.DINAT.KERNEL_SIZE


def load_checkpoint(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = load_weights_file(str(path), trust=trust)
    except WeightsFileError as exc:
        raise ValueError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    return unwrap_state_dict(checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="official .pth (a state dict, or one under 'model')")
    parser.add_argument("output", type=Path, help="detectron2 weights to write (.pth)")
    parser.add_argument("--config-file", help="detectron2 config of the target model (D2DiNAT / D2DiNATs)")
    parser.add_argument("--kernel-size", type=int, help="target kernel size (default: the config's, else keep)")
    parser.add_argument(
        "--rpb-resize",
        choices=("torch", "keys"),
        default="torch",
        help="torch: F.interpolate bicubic, Swin-style, as the official 11x11interp file (default); keys: Keys cubic "
        "convolution, exact on linear biases",
    )
    parser.add_argument(
        "--trust-weights",
        action="store_true",
        help="unpickle the input fully (can run code from it): only for a file you trust",
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs (last argument)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.output.suffix != ".pth":
            raise ValueError(f"the output {args.output} must end in .pth (a torch file; .pkl is read as a pickle)")
        state_dict = load_checkpoint(args.input, trust=args.trust_weights)
        target_shapes, kernel_size = None, args.kernel_size
        if args.config_file:
            target_shapes, cfg_kernel = target_shapes_from_config(args.config_file, args.opts)
            if kernel_size is not None and kernel_size != cfg_kernel:
                raise ValueError(f"--kernel-size {kernel_size} contradicts MODEL.DINAT.KERNEL_SIZE {cfg_kernel}")
            kernel_size = cfg_kernel
        weights, log = convert_state_dict(state_dict, kernel_size, args.rpb_resize)
        for line in log:
            logger.info(line)
        if target_shapes is not None:
            fresh = check_against_target(weights, target_shapes, new_ok=("norm0.", "norm1.", "norm2.", "norm3."))
            logger.info(f"every converted tensor fits the target; not in the checkpoint (fresh init): {fresh}")
    except (CheckpointMismatchError, ValueError, FileNotFoundError) as exc:
        logger.error(f"error: {exc}")
        return 2

    payload = {
        "model": {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        "__author__": f"dinat_m2f tools/convert_dinat_checkpoint.py from {args.input.name}",
        "matching_heuristics": True,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, args.output)
    logger.info(f"wrote {len(weights)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
