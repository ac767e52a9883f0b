#!/usr/bin/env python
"""Parameters and FLOPs (fvcore, neighborhood attention counted as the papers do) of a model.

    python tools/analyze_model.py --variant dinat_tiny --json            # classifier at its own resolution
    python tools/analyze_model.py --variant dinat_large_384 --input-size 384 384
    python tools/analyze_model.py --config-file configs/X.yaml --json [--input-size 1024 1024] [KEY VALUE ...]

Prints ``{"params": N, "gflops": G, "input": [3, H, W]}`` (``--json``) or a readable summary. FLOPs are fvcore's
(one multiply-add = one FLOP), for one image. A classification variant is built without random init and
traced on CPU filled with zeros (FLOPs depend on shapes only); a detectron2 model (``dinat_m2f.config.get_cfg()`` + ``build_model``) is traced on CPU in
eval mode (inference path, post-processing included).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import torch

from dinat_m2f.utils.flops import dinat_flop_count_analysis, variant_flops


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def analyze_variant(name: str, input_size: tuple[int, int] | None) -> dict:
    params, total, (height, width) = variant_flops(name, input_size)
    return {"params": params, "gflops": total / 1e9, "input": [3, height, width]}


# Cheap ops fvcore leaves uncounted on purpose (as detectron2 / Mask2Former's analyze_model do).
_ELEMENTWISE = frozenset(
    [
        "add",
        "add_",
        "sub",
        "rsub",
        "mul",
        "mul_",
        "div",
        "neg",
        "pow",
        "sqrt",
        "rsqrt",
        "exp",
        "log",
        "sin",
        "cos",
        "sigmoid",
        "softmax",
        "log_softmax",
        "gelu",
        "relu",
        "relu_",
        "tanh",
        "cumsum",
        "sum",
        "mean",
        "max",
        "min",
        "prod",
        "lt",
        "gt",
        "le",
        "ge",
        "eq",
        "ne",
        "where",
        "masked_fill",
        "masked_fill_",
        "clamp",
        "clamp_",
        "topk",
        "sort",
        "argmax",
        "repeat",
        "linspace",
        "arange",
        "meshgrid",
        "pad",
        "constant_pad_nd",
        "zeros",
        "zeros_like",
        "ones",
        "ones_like",
        "full",
        "fill_",
        "floor",
        "floor_divide",
        "remainder",
        "abs",
        "ceil",
        "round",
    ]
)


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a detectron2 output (dicts, lists, Instances, Boxes, ...), for the JIT tracer."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "get_fields"):  # Instances
        return _tensors(value.get_fields())
    if isinstance(getattr(value, "tensor", None), torch.Tensor):  # Boxes, BitMasks, ...
        return [value.tensor]
    return []


class _ImageToTensors(torch.nn.Module):
    """Traceable view of a detectron2 model: one CHW image tensor in, a flat tuple of output tensors out.

    (detectron2.utils.analysis does the same through detectron2.export, which needs caffe2 on this torch.)
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        height, width = image.shape[-2:]
        return tuple(_tensors(self.model([{"image": image, "height": height, "width": width}])))


def analyze_config(config_file: str, opts: list[str], input_size: tuple[int, int] | None) -> dict:
    from detectron2.modeling import build_model

    import dinat_m2f.modeling  # noqa: F401 (registers every meta-arch / head of the project)
    import dinat_m2f.modeling.backbone  # noqa: F401 (registers D2DiNAT / D2DiNATs)
    from dinat_m2f.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    height, width = input_size or (cfg.INPUT.MIN_SIZE_TEST,) * 2
    model = build_model(cfg).eval()
    with torch.no_grad():
        flops = dinat_flop_count_analysis(_ImageToTensors(model), (torch.zeros(3, height, width),))
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = flops.total()
    skipped = {op: n for op, n in flops.unsupported_ops().items() if op.split("::")[-1] not in _ELEMENTWISE}
    if skipped:
        logging.getLogger(__name__).warning(f"FLOPs not counted for these ops (no fvcore handle): {skipped}")
    return {"params": count_params(model), "gflops": total / 1e9, "input": [3, height, width]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--variant", help="a classification variant (dinat_tiny, dinat_s_large_384, ...)")
    source.add_argument("--config-file", help="a detectron2 config of this project")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="image size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    size = tuple(args.input_size) if args.input_size else None
    if args.variant:
        if args.opts:
            parser.error(f"config overrides {args.opts} need --config-file")
        result = analyze_variant(args.variant, size)
    else:
        result = analyze_config(args.config_file, args.opts, size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"params: {result['params'] / 1e6:.2f}M  FLOPs: {result['gflops']:.2f}G  input: {result['input']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
