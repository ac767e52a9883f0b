#!/usr/bin/env python
"""CPU inference latency of a Mask2Former model with the native deformable-attention op and with grid_sample.

    python tools/benchmark_mask2former.py [--config-file CFG] [--size 512] [--rounds 5] [--threads N] [--json]

Defaults to DiNAT-Tiny-Mask2Former (ADE20K semantic, 512x512) with random weights, fp32, eval mode under
``torch.inference_mode``, batch 1, one 512x512 image. The two variants differ only in ``MSDeformAttn.impl``
("native": torch.ops.dinat_m2f.ms_deform_attn_forward; "pytorch": the grid_sample formulation). After one warm-up
pass of each, rounds are interleaved (one forward of each per round) so that load changes on the machine hit both
alike; the median over rounds is reported, with the median time spent inside the deformable attention itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs/ade20k/semantic-segmentation/dinat/maskformer2_dinat_tiny_bs16_160k.yaml"


def build(config_file: Path, opts: list[str]) -> torch.nn.Module:
    from detectron2.modeling import build_model

    import dinat_m2f.modeling  # noqa: F401  (registers the model)
    from dinat_m2f.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    cfg.freeze()
    return build_model(cfg).eval()


def set_impl(model: torch.nn.Module, impl: str) -> list:
    from dinat_m2f.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn

    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    if not modules:
        raise RuntimeError("the model has no MSDeformAttn module: is its pixel decoder MSDeformAttnPixelDecoder?")
    for m in modules:
        m.impl = impl
    return modules


class AttnTimer:
    """Wall time spent inside the MSDeformAttn modules (forward hooks)."""

    def __init__(self, modules):
        self.total = 0.0
        self._start = 0.0
        for m in modules:
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--size", type=int, default=512, help="square input size (pixels)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if not args.config_file.is_file():
        parser.error(f"config file not found: {args.config_file}")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build(args.config_file, args.opts)
    modules = set_impl(model, "native")
    timer = AttnTimer(modules)
    image = torch.rand(3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": image, "height": args.size, "width": args.size}]

    impls = ("native", "pytorch")
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    attn_times: dict[str, list[float]] = {impl: [] for impl in impls}
    outputs = {}
    with torch.inference_mode():
        for impl in impls:  # warm-up
            set_impl(model, impl)
            outputs[impl] = model(inputs)[0]["sem_seg"]
        for _ in range(args.rounds):
            for impl in impls:
                set_impl(model, impl)
                timer.total = 0.0
                start = time.perf_counter()
                model(inputs)
                times[impl].append(time.perf_counter() - start)
                attn_times[impl].append(timer.total)
    max_diff = (outputs["native"] - outputs["pytorch"]).abs().max().item()
    import dinat_m2f  # loaded by build(); the instruction-set path of its CPU kernels goes in the report

    result = {
        "config": str(
            args.config_file.relative_to(ROOT) if args.config_file.is_relative_to(ROOT) else args.config_file
        ),
        "input": f"1x3x{args.size}x{args.size}",
        "threads": torch.get_num_threads(),
        "cpu_isa": dinat_m2f.build_info()["cpu_isa"],
        "rounds": args.rounds,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "max_abs_diff_sem_seg": max_diff,
    }
    for impl in impls:
        result[f"{impl}_latency_s_median"] = round(statistics.median(times[impl]), 4)
        result[f"{impl}_latency_s_all"] = [round(t, 4) for t in times[impl]]
        result[f"{impl}_msdeformattn_s_median"] = round(statistics.median(attn_times[impl]), 4)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['config']}  input {result['input']}  {result['params_m']}M params  "
            f"{result['threads']} threads  {args.rounds} rounds  NA kernels: {result['cpu_isa']}"
        )
        for impl in impls:
            print(
                f"  {impl:8s} median {result[f'{impl}_latency_s_median']:.3f} s/image "
                f"(deformable attention {result[f'{impl}_msdeformattn_s_median']:.3f} s)  "
                f"all {result[f'{impl}_latency_s_all']}"
            )
        print(f"  max |sem_seg native - pytorch| = {max_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
