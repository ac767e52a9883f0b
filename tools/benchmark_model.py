#!/usr/bin/env python
"""CPU inference throughput (images/s) of DiNAT-Tiny beside timm's Swin-T and ConvNeXt-T, in one run.

    python tools/benchmark_model.py [--batch-size 8] [--rounds 5] [--threads N] [--keep-freed-memory] [--json]

All models are built with random weights (timm ``pretrained=False``), in eval mode under ``torch.inference_mode``,
fp32, 224x224 inputs. After warm-up, rounds are interleaved (one batch of each model per round) so that load
changes on the machine hit every model alike; the median batch time of each model gives its images/s.

By default every model runs under glibc's default malloc settings, which return large freed blocks to the kernel, so
activations are page-faulted in again on later forwards (timm Swin-T takes about twice DiNAT-T's page faults per
batch). ``--keep-freed-memory`` applies dinat_m2f.utils.cpu_memory.keep_freed_cpu_memory first (as train_net.py and
the demo do), process-wide and so for every model alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch


def build_models(names: list[str]) -> dict[str, torch.nn.Module]:
    import timm

    from dinat_m2f.modeling.backbone import VARIANTS, build_variant

    models = {}
    for name in names:
        if name in VARIANTS:
            models[name] = build_variant(name)
        else:
            models[name] = timm.create_model(name, pretrained=False)
    return {name: model.eval() for name, model in models.items()}


def time_batch(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    start = time.perf_counter()
    model(images)
    return time.perf_counter() - start


def benchmark(names: list[str], batch_size: int, rounds: int, warmup: int, size: int) -> dict[str, dict]:
    models = build_models(names)
    images = torch.randn(batch_size, 3, size, size)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(images)
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(time_batch(model, images))
    return {
        name: {
            "images_per_s": batch_size / statistics.median(t),
            "median_batch_s": statistics.median(t),
            "params_m": sum(p.numel() for p in models[name].parameters()) / 1e6,
        }
        for name, t in times.items()
    }


def cpu_isa() -> str:
    """The instruction-set path of dinat_m2f's CPU kernels (DINAT_M2F_CPU_ISA may force the baseline)."""
    import dinat_m2f

    return dinat_m2f.build_info()["cpu_isa"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["dinat_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="keep freed CPU memory for reuse (glibc mallopt, every model alike; see dinat_m2f.utils.cpu_memory)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = False
    if args.keep_freed_memory:
        from dinat_m2f.utils.cpu_memory import keep_freed_cpu_memory

        kept = keep_freed_cpu_memory()
    results = benchmark(args.models, args.batch_size, args.rounds, args.warmup, args.size)
    meta = {
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "size": args.size,
        "torch": torch.__version__,
        "cpu_isa": cpu_isa(),
        "keeps_freed_memory": kept,
    }
    if args.json:
        print(json.dumps({"setup": meta, "results": results}))
    else:
        print(
            f"CPU inference at {args.size}x{args.size}, batch {args.batch_size}, {meta['threads']} threads, "
            f"NA kernels' instruction set {meta['cpu_isa']}, freed memory kept: {kept}:"
        )
        for name, r in results.items():
            print(f"  {name:32s} {r['images_per_s']:8.2f} images/s  ({r['params_m']:.1f}M params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
