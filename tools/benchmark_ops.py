"""Benchmark the neighborhood-attention ops side by side, at DiNAT / Mask2Former shapes.

For every shape it times, in one run and on the same tokens:
- ``fused``: dinat_m2f.ops.na2d (online softmax, no attention weights materialised),
- ``unfused``: na2d_qk -> softmax -> na2d_av,
- ``reference``: dinat_m2f.ops.reference.na2d (pure-PyTorch gather + einsum),
- ``sdpa``: dense torch.nn.functional.scaled_dot_product_attention over all H*W tokens,
forward (``fwd``) and forward+backward (``fwd+bwd``), and prints ratios reference/ours. GFLOP/s counts the useful
work of NA (2 * tokens * window * D multiply-adds per head forward, twice that backward); SDPA is credited with its
dense work. The machine's float32 matmul rate is measured first, as the yardstick.

    python tools/benchmark_ops.py --quick          # < 1 minute
    python tools/benchmark_ops.py --json           # JSON records on stdout
    python tools/benchmark_ops.py --quick --isa avx2   # the AVX2 kernels on an AVX-512 machine
    python tools/benchmark_ops.py --impls fused,unfused --shapes 1x4x56x56x32   # a subset

The header names the CPU kernels' instruction-set path that ran (build_info()['cpu_isa']); ``unf/this`` is the
unfused time over this implementation's (>= 1: not slower than the unfused pair).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import dinat_m2f
from dinat_m2f import ops
from dinat_m2f.ops import reference


@dataclass
class Record:
    op: str
    impl: str
    shape: str
    kernel_size: int
    dilation: int
    dtype: str
    pass_: str
    ms: float  # median over the repeats
    gflops: float
    ms_min: float  # fastest repeat: the least disturbed by other processes on a shared machine

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


@dataclass(frozen=True)
class Case:
    height: int
    width: int
    heads: int
    dim: int
    kernel_size: int
    dilation: int
    batch: int = 1
    with_reference: bool = True
    with_sdpa_backward: bool = True

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.heads}x{self.height}x{self.width}x{self.dim}"


QUICK_CASES = [Case(56, 56, 4, 32, 7, 1), Case(56, 56, 4, 32, 7, 8)]
FULL_CASES = QUICK_CASES + [
    # DiNAT-T at 224 (heads 2/4/8/16, head dim 32, k 7) with its dilations; 7x7 is the whole-map (dense) case.
    Case(56, 56, 2, 32, 7, 8, batch=8, with_reference=False),
    Case(28, 28, 4, 32, 7, 1),
    Case(28, 28, 4, 32, 7, 4),
    Case(28, 28, 4, 32, 7, 4, batch=8, with_reference=False),
    Case(14, 14, 8, 32, 7, 1),
    Case(14, 14, 8, 32, 7, 2),
    Case(14, 14, 8, 32, 7, 2, batch=8),
    Case(7, 7, 16, 32, 7, 1),
    Case(7, 7, 16, 32, 7, 1, batch=8),
    # DiNAT-L at the 512 crop (heads 6/12/24/48, head dim 32, k 11): stride-16 and stride-32 maps.
    Case(32, 32, 24, 32, 11, 2),
    Case(16, 16, 48, 32, 11, 1),
    # Mask2Former at 640x640, DiNAT stride-4 features; the reference's gathered keys would need ~2.5 GB here and
    # dense attention's backward over 25 600 tokens takes minutes on 2 cores, so both are left out.
    Case(160, 160, 4, 32, 11, 14, with_reference=False, with_sdpa_backward=False),
]


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, min) wall time in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def matmul_gflops(repeats: int) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    _, ms = time_ms(lambda: torch.mm(a, b), repeats, warmup=2)
    return 2 * 1024**3 / (ms * 1e6)


def na_flops(case: Case) -> float:
    """Useful forward work: q.k and attn.v over each window (2 flops per multiply-add)."""
    tokens = case.batch * case.heads * case.height * case.width
    return 2 * 2 * tokens * case.kernel_size**2 * case.dim


def sdpa_flops(case: Case) -> float:
    n = case.height * case.width
    return 2 * 2 * case.batch * case.heads * n * n * case.dim


def implementations(case: Case):
    scale = case.dim**-0.5
    k, d = case.kernel_size, case.dilation

    def fused(q, key, v, rpb):
        return ops.na2d(q, key, v, k, d, rpb)

    def unfused(q, key, v, rpb):
        return ops.na2d_av(ops.na2d_qk(q * scale, key, k, d, rpb).softmax(-1), v, k, d)

    def ref(q, key, v, rpb):
        return reference.na2d(q, key, v, k, d, rpb)

    def sdpa(q, key, v, rpb):
        out = torch.nn.functional.scaled_dot_product_attention(q.flatten(2, 3), key.flatten(2, 3), v.flatten(2, 3))
        return out.unflatten(2, q.shape[2:4])

    impls = [("fused", fused), ("unfused", unfused)]
    if case.with_reference:
        impls.append(("reference", ref))
    impls.append(("sdpa", sdpa))
    return impls


def bench_case(case: Case, dtype: torch.dtype, repeats: int, impls: set[str] | None = None) -> list[Record]:
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, case.height, case.width, case.dim)
    q, key, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    rpb = (torch.randn(case.heads, 2 * case.kernel_size - 1, 2 * case.kernel_size - 1, generator=g) * 0.02).to(dtype)
    records = []
    for impl, fn in implementations(case):
        if impls is not None and impl not in impls:
            continue
        flops = sdpa_flops(case) if impl == "sdpa" else na_flops(case)
        tag = ("na2d", impl, case.shape, case.kernel_size, case.dilation, str(dtype)[6:])
        with torch.no_grad():
            ms, ms_min = time_ms(lambda fn=fn: fn(q, key, v, rpb), repeats)
        records.append(Record(*tag, "fwd", ms, flops / ms / 1e6, ms_min))
        if impl == "sdpa" and not case.with_sdpa_backward:
            continue
        leaves = [t.clone().requires_grad_() for t in (q, key, v, rpb)]
        grad = torch.randn(shape, generator=g).to(dtype)

        def step(fn=fn, leaves=leaves, grad=grad):
            out = fn(*leaves)
            out.backward(grad)

        ms, ms_min = time_ms(step, repeats)
        records.append(Record(*tag, "fwd+bwd", ms, 3 * flops / ms / 1e6, ms_min))
    return records


def print_table(records: list[Record], matmul: float, file=sys.stdout) -> None:
    print(f"CPU kernels' instruction set: {dinat_m2f.build_info()['cpu_isa']}", file=file)
    print(f"float32 matmul (1024^3, {torch.get_num_threads()} threads): {matmul:.1f} GFLOP/s", file=file)
    print("ms = median of the repeats, min = fastest; ref/this compares medians (and fastest repeats)", file=file)
    print(
        f"{'shape':>18} {'k':>3} {'d':>3} {'pass':>8} {'impl':>10} {'ms':>9} {'min':>9} {'GFLOP/s':>8} {'% mm':>5} "
        f"{'ref/this':>8} {'(min)':>6} {'unf/this':>8}",
        file=file,
    )
    by_key = {(r.shape, r.kernel_size, r.dilation, r.pass_, r.impl): r for r in records}
    for r in records:
        ref = by_key.get((r.shape, r.kernel_size, r.dilation, r.pass_, "reference"))
        unf = by_key.get((r.shape, r.kernel_size, r.dilation, r.pass_, "unfused"))
        ratio = f"{ref.ms / r.ms:8.1f} {ref.ms_min / r.ms_min:6.1f}" if ref is not None else f"{'-':>8} {'-':>6}"
        ratio += f" {unf.ms / r.ms:8.2f}" if unf is not None else f" {'-':>8}"
        print(
            f"{r.shape:>18} {r.kernel_size:>3} {r.dilation:>3} {r.pass_:>8} {r.impl:>10} {r.ms:9.2f} {r.ms_min:9.2f} "
            f"{r.gflops:8.2f} {100 * r.gflops / matmul:5.1f} {ratio}",
            file=file,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="56x56 shapes only, few repeats (< 1 minute)")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per measurement (median and min reported)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument(
        "--isa",
        default=None,
        choices=["auto", "avx2", "avx512"],
        help="CPU kernels' instruction set (DINAT_M2F_CPU_ISA)",
    )
    parser.add_argument(
        "--impls",
        default=None,
        help="comma-separated implementations to time (fused,unfused,reference,sdpa; default all)",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated BxHEADSxHxWxD shapes to run (default all of the chosen set)",
    )
    args = parser.parse_args(argv)
    if args.isa is not None:
        os.environ["DINAT_M2F_CPU_ISA"] = args.isa

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (7 if args.quick else 10)
    dtype = getattr(torch, args.dtype)
    matmul = matmul_gflops(repeats)
    records = []
    impls = set(args.impls.split(",")) if args.impls else None
    shapes = set(args.shapes.split(",")) if args.shapes else None
    for case in QUICK_CASES if args.quick else FULL_CASES:
        if shapes is None or case.shape in shapes:
            records.extend(bench_case(case, dtype, repeats, impls))
    if args.json:
        print(
            json.dumps(
                {
                    "cpu_isa": dinat_m2f.build_info()["cpu_isa"],
                    "matmul_float32_gflops": matmul,
                    "threads": args.threads,
                    "records": [r.to_json() for r in records],
                },
                indent=1,
            )
        )
    else:
        print_table(records, matmul)


if __name__ == "__main__":
    main()
