#!/usr/bin/env python
"""Export a DiNAT-Mask2Former for deployment, run the export and compare it with PyTorch.

    # ONNX (NA and deformable attention lowered to standard ops), checked with onnxruntime at two sizes
    python tools/export_model.py --config-file dinat_l_coco_panoptic --format onnx --output export/ \
        --sizes 1024x1024 768x1024
    # torch.export (.pt2, our native ops) and an AOTInductor package for the CPU
    python tools/export_model.py --config-file my.yaml --weights model_final.pth --format pt2 aoti --output export/

The graph runs from the image (float32 [B, 3, H, W], the model's INPUT.FORMAT, resized so that H and W are
multiples of the size divisibility, not normalised) to ``pred_logits [B, Q, K+1]`` and ``pred_masks
[B, Q, H/4, W/4]``, the inputs of ``dinat_m2f.export.postprocess``. H and W are dynamic between ``--min-size``
(default: the smallest size at which NA does not pad) and ``--max-size``. Each export is run at every ``--sizes``
entry on random images and compared with the PyTorch model; a difference above ``--atol`` is an error (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

FORMATS = ("onnx", "pt2", "aoti")
logger = logging.getLogger("dinat_m2f.export")


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HxW, e.g. 512x768; got {text!r}") from None
    return h, w


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a config file or a model-zoo name")
    parser.add_argument("--weights", default=None, help="checkpoint (default: the zoo's file or MODEL.WEIGHTS)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=["onnx"], help="what to write")
    parser.add_argument("--output", required=True, help="folder for model.onnx / model.pt2 / model_aoti.pt2")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None, help="HxW checked (first = example)")
    parser.add_argument("--min-size", type=int, default=None, help="smallest H/W of the dynamic range")
    parser.add_argument("--max-size", type=int, default=None, help="largest H/W of the dynamic range")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |export - PyTorch| (float32)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return parser


def _compare(name: str, got, expected, atol: float) -> float:
    error = max(float((torch.as_tensor(g) - e).abs().max()) for g, e in zip(got, expected))
    logger.info(f"{name}: max |export - PyTorch| = {error:.2e} (atol {atol:g})")
    if not error <= atol:
        raise SystemExit(f"{name}: the export differs from PyTorch by {error:.2e} > --atol {atol:g}")
    return error


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Write the requested exports; returns {format: {"HxW": max abs error}}."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dinat_m2f import Predictor
    from dinat_m2f.export import MaskFormerCore, min_unpadded_size

    predictor = Predictor(args.config_file, weights=args.weights, device="cpu", opts=args.opts)
    model = predictor.model
    divisibility = max(int(model.size_divisibility), 1)
    min_size = args.min_size or min_unpadded_size(model)
    max_size = args.max_size or max(min_size, 2048 // divisibility * divisibility)
    sizes = args.sizes or [(min_size, min_size), (min_size, min_size + divisibility)]
    for h, w in sizes:
        if not (min_size <= h <= max_size and min_size <= w <= max_size) or h % divisibility or w % divisibility:
            raise SystemExit(
                f"--sizes {h}x{w}: H and W must be multiples of {divisibility} in [{min_size}, {max_size}]"
            )
    os.makedirs(args.output, exist_ok=True)
    core = MaskFormerCore(model).eval()
    generator = torch.Generator().manual_seed(0)
    images = {f"{h}x{w}": torch.rand(1, 3, h, w, generator=generator) * 255 for h, w in sizes}
    with torch.no_grad():
        expected = {key: core(image) for key, image in images.items()}
    example = next(iter(images.values()))
    logger.info(f"dynamic H, W in [{min_size}, {max_size}] (multiples of {divisibility}); checked at {list(images)}")

    report: dict[str, dict[str, float]] = {}
    if "onnx" in args.format:
        from dinat_m2f.export.onnx import export_onnx, run_onnx

        path = export_onnx(model, os.path.join(args.output, "model.onnx"), example, min_size, max_size)
        report["onnx"] = {
            k: _compare(f"onnx {k}", run_onnx(path, x), expected[k], args.atol) for k, x in images.items()
        }
    if "pt2" in args.format or "aoti" in args.format:
        from dinat_m2f.export.pt2 import compile_aoti, export_program, load_aoti, load_pt2, save_pt2

        program = export_program(model, example, min_size, max_size)
        if "pt2" in args.format:
            loaded = load_pt2(save_pt2(program, os.path.join(args.output, "model.pt2")))
            with torch.no_grad():
                report["pt2"] = {k: _compare(f"pt2 {k}", loaded(x), expected[k], args.atol) for k, x in images.items()}
        if "aoti" in args.format:
            runner = load_aoti(compile_aoti(program, os.path.join(args.output, "model_aoti.pt2")))
            with torch.no_grad():
                report["aoti"] = {
                    k: _compare(f"aoti {k}", runner(x), expected[k], args.atol) for k, x in images.items()
                }
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
