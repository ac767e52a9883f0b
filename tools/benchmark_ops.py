"""Benchmark the neighborhood-attention ops side by side, at DiNAT / Mask2Former shapes.

For every shape it times, in one run and on the same tokens:
- ``fused``: dinat_m2f.ops.na2d (online softmax, no attention weights materialised) on contiguous q, k, v,
- ``packed``: the same kernels as the DiNAT layers call them, dinat_m2f.ops.na2d_qkv on a packed qkv projection output
  [B, H, W, 3, heads, D] (q, k, v read in place, tokens 3 heads D values apart) with a heads-last output gradient,
- ``unfused``: na2d_qk -> softmax -> na2d_av,
- ``reference``: dinat_m2f.ops.reference.na2d (pure-PyTorch gather + einsum),
- ``dense``: dense attention per dilation group (dinat_m2f.ops.na._dense_attention), where every window is its
  whole dilation group (size == k * dilation), the alternative ops.na2d takes for whole maps in inference,
- ``sdpa``: dense torch.nn.functional.scaled_dot_product_attention over all H*W tokens,
forward (``fwd``) and forward+backward (``fwd+bwd``), and prints ratios reference/ours. Within a shape the calls of
our implementations in every dtype are interleaved, one of each per round (the reference and SDPA are timed apart),
so that their ratios compare calls made under the same load. GFLOP/s counts the useful
work of NA (2 * tokens * window * D multiply-adds per head forward, twice that backward); SDPA is credited with its
dense work. The machine's float32 matmul rate, the yardstick, is measured before and after the cases (the faster).

    python tools/benchmark_ops.py --quick          # < 1 minute
    python tools/benchmark_ops.py --json           # JSON records on stdout
    python tools/benchmark_ops.py --quick --isa avx2   # the AVX2 kernels on an AVX-512 machine
    python tools/benchmark_ops.py --impls fused,unfused --shapes 1x4x56x56x32   # a subset
    python tools/benchmark_ops.py --impls fused,unfused --dtype float32,bfloat16 --models dinat-t-224
                                                   # the fused/unfused cells of one model's stages

The full set is every attention shape of the real stages: DiNAT-T at 224 (56/28/14/7 maps, dilations 8/4/2/1 and the
NA layers' 1), DiNAT-L with k 11 at the 512 and 640 crops (the Mask2Former dilations; maps smaller than k * dilation
are padded to it, as the model does), each at batch 1 and 8. The header names the CPU kernels' instruction-set path
that ran (build_info()['cpu_isa']); ``unf/this`` is the unfused time over this implementation's (>= 1: not slower
than the unfused pair). With fused (or packed) and unfused timed, a summary lists the fused/unfused (packed/unfused)
speed ratio per cell and the minimum. ``packed`` against ``fused`` is what the model's layout costs or saves.
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
from dinat_m2f.ops import na, reference


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
    model: str = ""  # the model and input whose stage this is (--models)

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.heads}x{self.height}x{self.width}x{self.dim}"


# The reference's gathered keys ([tokens, window, D]) and dense attention's backward over all tokens are left out
# above these sizes (memory, minutes on 2 cores).
_REFERENCE_MAX_TOKENS = 4 * 56 * 56
_SDPA_BACKWARD_MAX_MAP = 64 * 64


def stage_cases(model: str, maps: list[int], heads: list[int], dilations: list[list[int]], kernel_size: int):
    """One case per (stage, distinct dilation, batch 1 and 8): head dim 32 (DiNAT's); a map smaller than
    kernel_size * dilation is padded to it (dinat_m2f.modeling.backbone.na_attention.padded_size)."""
    cases = []
    for batch in (1, 8):
        for size, n_heads, stage_dilations in zip(maps, heads, dilations):
            for dilation in sorted(set(stage_dilations)):
                side = max(size, kernel_size * dilation)
                tokens = batch * n_heads * side * side
                cases.append(
                    Case(
                        side,
                        side,
                        n_heads,
                        32,
                        kernel_size,
                        dilation,
                        batch=batch,
                        with_reference=tokens <= _REFERENCE_MAX_TOKENS,
                        with_sdpa_backward=side * side <= _SDPA_BACKWARD_MAX_MAP,
                        model=model,
                    )
                )
    return cases


# DiNAT-T at 224: maps 56/28/14/7, heads 2/4/8/16, k 7, NA layers (1) alternating with DiNA (floor(map / 7)); 7x7 is
# the whole-map (dense) case. DiNAT-L in Mask2Former: heads 6/12/24/48, k 11, the dilations of every M2F DiNAT-L
# config (spec dinat.md 3.2, chosen for the 640 crop: 160/80/40/20 maps), also at the 512 crop (128/64/32/16 maps).
_DINAT_L_HEADS = [6, 12, 24, 48]
_DINAT_L_M2F_DILATIONS = [[1, 14], [1, 4, 7], [1, 2, 3], [1]]
MODEL_CASES = {
    "dinat-t-224": stage_cases("dinat-t-224", [56, 28, 14, 7], [2, 4, 8, 16], [[1, 8], [1, 4], [1, 2], [1]], 7),
    "dinat-l-512": stage_cases("dinat-l-512", [128, 64, 32, 16], _DINAT_L_HEADS, _DINAT_L_M2F_DILATIONS, 11),
    "dinat-l-640": stage_cases("dinat-l-640", [160, 80, 40, 20], _DINAT_L_HEADS, _DINAT_L_M2F_DILATIONS, 11),
}
QUICK_CASES = [Case(56, 56, 4, 32, 7, 1), Case(56, 56, 4, 32, 7, 8)]
FULL_CASES = [case for cases in MODEL_CASES.values() for case in cases]


# --timer: wall time, or the CPU time of this process (all its threads): on a machine shared with other jobs the
# latter does not count the time the scheduler gives to them, so ratios stay steady under load; with several threads
# it sums their time (spin-waiting included), so compare it between implementations, not with wall times.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, min) time in ms on the --timer clock."""
    return time_interleaved({None: fn}, repeats, warmup)[None]


def time_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """{key: (median, min) time in ms on the --timer clock} of every fn, the calls interleaved (one call of each per
    round), so that load drifting on a shared machine slows every fn alike and their ratios hold."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = _clock()
            fn()
            times[key].append((_clock() - start) * 1e3)
    return {key: (statistics.median(t), min(t)) for key, t in times.items()}


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

    def packed(qkv, rpb):
        return ops.na2d_qkv(qkv, k, d, rpb)

    def unfused(q, key, v, rpb):
        return ops.na2d_av(ops.na2d_qk(q * scale, key, k, d, rpb).softmax(-1), v, k, d)

    def ref(q, key, v, rpb):
        return reference.na2d(q, key, v, k, d, rpb)

    def dense(q, key, v, rpb):  # per dilation group; what ops.na2d computes for whole maps in inference
        return na._dense_attention(q, key, v, k, d, 2, rpb, scale)

    def sdpa(q, key, v, rpb):
        out = torch.nn.functional.scaled_dot_product_attention(q.flatten(2, 3), key.flatten(2, 3), v.flatten(2, 3))
        return out.unflatten(2, q.shape[2:4])

    impls = [("fused", fused), ("packed", packed), ("unfused", unfused)]
    if case.with_reference:
        impls.append(("reference", ref))
    if case.height == case.width == k * d:  # every window is its whole dilation group
        impls.append(("dense", dense))
    impls.append(("sdpa", sdpa))
    return impls


# The implementations whose calls bench_case interleaves: ours together; the reference and SDPA each alone, since
# their passes over hundreds of MB between our calls would evict our inputs from the caches.
_INTERLEAVED_GROUPS = [("fused", "packed", "unfused", "dense"), ("reference",), ("sdpa",)]


def bench_case(case: Case, dtypes: list[torch.dtype], repeats: int, impls: set[str] | None = None) -> list[Record]:
    """Every implementation in every dtype of one case, forward then forward + backward, the calls of each pass
    interleaved (time_interleaved, by _INTERLEAVED_GROUPS): the fused/unfused and bf16/f32 ratios compare calls made
    in the same seconds.
    Timed one after another, a cell's bf16/f32 was 0.76x in one run and 1.10x in the next (AMD EPYC, 1x12x64x64x32
    k11 d1, forward)."""
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, case.height, case.width, case.dim)
    q32, key32, v32 = (torch.randn(shape, generator=g) for _ in range(3))
    rpb32 = torch.randn(case.heads, 2 * case.kernel_size - 1, 2 * case.kernel_size - 1, generator=g) * 0.02
    grad32 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    chosen = [(impl, fn) for impl, fn in implementations(case) if impls is None or impl in impls]
    forward, step = {}, {}
    for dtype in dtypes:
        q, key, v, rpb = (t.to(dtype) for t in (q32, key32, v32, rpb32))
        # The same q, k, v packed as the qkv projection writes them: [B, H, W, 3, heads, D].
        qkv = torch.stack([t.permute(0, 2, 3, 1, 4) for t in (q, key, v)], dim=3)
        for impl, fn in chosen:
            inputs = (qkv, rpb) if impl == "packed" else (q, key, v, rpb)

            def run_forward(fn=fn, inputs=inputs):
                with torch.no_grad():
                    return fn(*inputs)

            forward[impl, dtype] = run_forward
            if impl == "sdpa" and not case.with_sdpa_backward:
                continue
            leaves = [t.clone().requires_grad_() for t in inputs]
            grad = grad32.to(dtype)
            if impl == "packed":  # heads-last, as the output projection hands it back
                grad = grad.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)

            # torch.autograd.grad: the inputs' gradients handed back as a layer's backward hands them on, not added
            # into .grad (out.backward(grad) timed one more add of every input per repeat, for every implementation)
            def run_step(fn=fn, leaves=leaves, grad=grad):
                out = fn(*leaves)
                torch.autograd.grad(out, leaves, grad, allow_unused=True)  # sdpa takes no bias

            step[impl, dtype] = run_step
    timed = {"fwd": {}, "fwd+bwd": {}}
    for group in _INTERLEAVED_GROUPS:
        for pass_, fns in (("fwd", forward), ("fwd+bwd", step)):
            timed[pass_].update(time_interleaved({key: fn for key, fn in fns.items() if key[0] in group}, repeats))
    records = []
    for dtype in dtypes:
        for impl, _ in chosen:
            flops = sdpa_flops(case) if impl == "sdpa" else na_flops(case)
            tag = ("na2d", impl, case.shape, case.kernel_size, case.dilation, str(dtype)[6:])
            for pass_, work in (("fwd", flops), ("fwd+bwd", 3 * flops)):
                if (impl, dtype) in timed[pass_]:
                    ms, ms_min = timed[pass_][impl, dtype]
                    records.append(Record(*tag, pass_, ms, work / ms / 1e6, ms_min))
    return records


def print_table(records: list[Record], matmul: float, file=sys.stdout) -> None:
    info = dinat_m2f.build_info()
    print(f"CPU kernels' instruction set: {info['cpu_isa']}", file=file)
    print(f"bf16 kernels use AVX512_BF16 (vdpbf16ps): {info['cpu_bf16_dot']}", file=file)
    print(f"float32 matmul (1024^3, {torch.get_num_threads()} threads): {matmul:.1f} GFLOP/s", file=file)
    print(f"timer: {'wall time' if _clock is CLOCKS['wall'] else 'process CPU time'}", file=file)
    print("ms = median of the repeats, min = fastest; ref/this compares medians (and fastest repeats)", file=file)
    print(
        f"{'shape':>18} {'k':>3} {'d':>3} {'dtype':>8} {'pass':>8} {'impl':>10} {'ms':>9} {'min':>9} {'GFLOP/s':>8} {'% mm':>5} "
        f"{'ref/this':>8} {'(min)':>6} {'unf/this':>8}",
        file=file,
    )
    by_key = {(r.shape, r.kernel_size, r.dilation, r.dtype, r.pass_, r.impl): r for r in records}
    for r in records:
        ref = by_key.get((r.shape, r.kernel_size, r.dilation, r.dtype, r.pass_, "reference"))
        unf = by_key.get((r.shape, r.kernel_size, r.dilation, r.dtype, r.pass_, "unfused"))
        ratio = f"{ref.ms / r.ms:8.1f} {ref.ms_min / r.ms_min:6.1f}" if ref is not None else f"{'-':>8} {'-':>6}"
        ratio += f" {unf.ms / r.ms:8.2f}" if unf is not None else f" {'-':>8}"
        print(
            f"{r.shape:>18} {r.kernel_size:>3} {r.dilation:>3} {r.dtype:>8} {r.pass_:>8} {r.impl:>10} {r.ms:9.2f} {r.ms_min:9.2f} "
            f"{r.gflops:8.2f} {100 * r.gflops / matmul:5.1f} {ratio}",
            file=file,
        )


def print_fused_unfused_summary(records: list[Record], file=sys.stdout, impl: str = "fused") -> None:
    """Per cell (shape, k, d, dtype): unfused time over ``impl``'s (fused or packed; >= 1: the fused op is not slower),
    forward and forward + backward, on medians and on fastest repeats; then the minimum of each column."""
    by_key = {(r.shape, r.kernel_size, r.dilation, r.dtype, r.pass_, r.impl): r for r in records}
    cells = list(dict.fromkeys((r.shape, r.kernel_size, r.dilation, r.dtype) for r in records))
    passes = ("fwd", "fwd+bwd")
    columns = {(p, stat): [] for p in passes for stat in ("ms", "ms_min")}
    rows = []
    for cell in cells:
        ratios = []
        for p in passes:
            fused, unfused = by_key.get((*cell, p, impl)), by_key.get((*cell, p, "unfused"))
            for stat in ("ms", "ms_min"):
                if fused is None or unfused is None:
                    ratios.append(None)
                    continue
                ratio = getattr(unfused, stat) / getattr(fused, stat)
                columns[(p, stat)].append((ratio, cell))
                ratios.append(ratio)
        if any(r is not None for r in ratios):
            rows.append((cell, ratios))
    if not rows:
        return
    print(
        f"\n{impl}/unfused speed (unfused ms / {impl} ms; >= 1: {impl} not slower), median (fastest repeat)", file=file
    )
    print(f"{'shape':>20} {'k':>3} {'d':>3} {'dtype':>9} {'fwd':>13} {'fwd+bwd':>13}", file=file)

    def fmt(median, fastest):
        return f"{'-':>13}" if median is None else f"{median:6.2f} ({fastest:4.2f})"

    for (shape, k, d, dtype), r in rows:
        print(f"{shape:>20} {k:>3} {d:>3} {dtype:>9} {fmt(r[0], r[1])} {fmt(r[2], r[3])}", file=file)
    for p in passes:
        for stat, what in (("ms", "median"), ("ms_min", "fastest repeat")):
            values = columns[(p, stat)]
            if values:
                ratio, (shape, k, d, dtype) = min(values)
                below = sum(1 for v, _ in values if v < 1.0)
                print(
                    f"minimum {p} ({what}): {ratio:.2f} at {shape} k={k} d={d} {dtype}; "
                    f"{below} of {len(values)} cells below 1.00",
                    file=file,
                )


def print_dtype_summary(records: list[Record], file=sys.stdout) -> None:
    """With float32 and bfloat16 both timed: per cell and implementation, float32 time over bfloat16 time (> 1:
    bfloat16 faster), forward and forward + backward, medians (fastest repeats); then the minimum per implementation."""
    by_key = {(r.shape, r.kernel_size, r.dilation, r.dtype, r.pass_, r.impl): r for r in records}
    cells = list(dict.fromkeys((r.shape, r.kernel_size, r.dilation, r.impl) for r in records))
    passes = ("fwd", "fwd+bwd")
    rows, minima = [], {}
    for shape, k, d, impl in cells:
        ratios = []
        for p in passes:
            f32 = by_key.get((shape, k, d, "float32", p, impl))
            bf16 = by_key.get((shape, k, d, "bfloat16", p, impl))
            if f32 is None or bf16 is None:
                ratios.append(None)
                continue
            ratio = (f32.ms / bf16.ms, f32.ms_min / bf16.ms_min)
            ratios.append(ratio)
            minima.setdefault((impl, p), []).append((ratio[0], shape, k, d))
        if any(r is not None for r in ratios):
            rows.append(((shape, k, d, impl), ratios))
    if not rows:
        return
    print(
        "\nbfloat16/float32 speed (float32 ms / bfloat16 ms; > 1: bfloat16 faster), median (fastest repeat)", file=file
    )
    print(f"{'shape':>20} {'k':>3} {'d':>3} {'impl':>10} {'fwd':>13} {'fwd+bwd':>13}", file=file)

    def fmt(ratio):
        return f"{'-':>13}" if ratio is None else f"{ratio[0]:6.2f} ({ratio[1]:4.2f})"

    for (shape, k, d, impl), r in rows:
        print(f"{shape:>20} {k:>3} {d:>3} {impl:>10} {fmt(r[0])} {fmt(r[1])}", file=file)
    for (impl, p), values in minima.items():
        ratio, shape, k, d = min(values)
        below = sum(1 for v in values if v[0] < 1.0)
        print(
            f"minimum {impl} {p} (median): {ratio:.2f} at {shape} k={k} d={d}; {below} of {len(values)} cells below 1.00",
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
    parser.add_argument(
        "--dtype", default="float32", help="comma-separated dtypes: float32, float64, bfloat16 (default float32)"
    )
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated model stage sets of the full run ({', '.join(MODEL_CASES)}; default all)",
    )
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes to run (default 1,8)")
    parser.add_argument(
        "--timer",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall time, or this process's CPU time (steadier on a shared machine; see CLOCKS)",
    )
    parser.add_argument(
        "--isa",
        default=None,
        choices=["auto", "avx2", "avx512"],
        help="CPU kernels' instruction set (DINAT_M2F_CPU_ISA)",
    )
    parser.add_argument(
        "--bf16",
        default=None,
        choices=["auto", "on", "off"],
        help="whether the bf16 kernels use the AVX512_BF16 instructions (DINAT_M2F_CPU_BF16)",
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
    if args.bf16 is not None:
        os.environ["DINAT_M2F_CPU_BF16"] = args.bf16

    torch.set_num_threads(args.threads)
    global _clock
    _clock = CLOCKS[args.timer]
    repeats = args.repeats or (7 if args.quick else 10)
    dtypes = []
    for name in args.dtype.split(","):
        if name not in ("float32", "float64", "bfloat16"):
            parser.error(f"--dtype: {name!r} is not one of float32, float64, bfloat16")
        dtypes.append(getattr(torch, name))
    if args.models is not None:
        unknown = set(args.models.split(",")) - set(MODEL_CASES)
        if unknown:
            parser.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODEL_CASES)}")
    matmul = matmul_gflops(repeats)
    records = []
    impls = set(args.impls.split(",")) if args.impls else None
    shapes = set(args.shapes.split(",")) if args.shapes else None
    models = set(args.models.split(",")) if args.models else None
    batches = {int(b) for b in args.batches.split(",")} if args.batches else None
    cases = QUICK_CASES if args.quick else FULL_CASES
    cases = [
        c
        for c in cases
        if (shapes is None or c.shape in shapes)
        and (models is None or c.model in models)
        and (batches is None or c.batch in batches)
    ]
    # Every implementation and dtype of a case interleaved (bench_case), so that their ratios are not skewed by the
    # machine's load drifting.
    for case in cases:
        records.extend(bench_case(case, dtypes, repeats, impls))
    # The yardstick is what the machine can do: measured again after the cases, the faster of the two. A shared
    # machine slowed down for the first measurement once (211 GFLOP/s against its usual 305-322), which made the
    # "% mm" column half again as high as the same milliseconds against the machine's rate.
    matmul = max(matmul, matmul_gflops(repeats))
    if args.json:
        print(
            json.dumps(
                {
                    "cpu_isa": dinat_m2f.build_info()["cpu_isa"],
                    "cpu_bf16_dot": dinat_m2f.build_info()["cpu_bf16_dot"],
                    "matmul_float32_gflops": matmul,
                    "threads": args.threads,
                    "timer": args.timer,
                    "records": [r.to_json() for r in records],
                },
                indent=1,
            )
        )
    else:
        print_table(records, matmul)
        for impl in ("fused", "packed"):
            print_fused_unfused_summary(records, impl=impl)
        print_dtype_summary(records)


if __name__ == "__main__":
    main()
