#!/usr/bin/env python
"""One command for a bare GPU machine: build, GPU tests, compute-sanitizer, benchmarks, model step, report.

    python3 tools/gpu_check.py --out DIR [--budget-s 450] [--skip build,tests,sanitizer,bench,model]
    python3 tools/gpu_check.py --out DIR --dry-run    # CPU-only, tiny shapes: what CI runs so this cannot rot

Steps (each is recorded as ok / failed / skipped with the reason; one failing does not stop the others):
1. build: ``setup.py build_ext --inplace`` of ``dinat_m2f._C`` for the GPU present (TORCH_CUDA_ARCH_LIST from its
   compute capability, MAX_JOBS = the machine's cores) against the torch installed there.
2. tests: the CUDA subsets of tests/test_na_ops.py and tests/test_ms_deform_attn.py (``-m cuda``), and
   tests/test_na_triton.py natively (no interpreter).
3. sanitizer: ``compute-sanitizer --tool memcheck`` on a tiny forward + backward of every native CUDA op
   (na1d/na2d qk, av, fused; multi-scale deformable attention).
4. bench: neighborhood attention at the DiNAT-L shapes of the COCO 1024 crop (stages 1-4, kernel 11, the config's
   dilations, batch 2) and DiNAT-T at 224 (kernel 7, batch 32), float32 and bfloat16, forward and forward+backward:
   native fused and unfused CUDA, Triton, dense ``scaled_dot_product_attention`` on the same tokens (no bias) and
   ``flex_attention`` with a neighborhood block mask (no bias; bfloat16, dilation 1 only: each case compiles);
   multi-scale deformable attention native vs grid_sample. Reports ms, useful TFLOP/s (NA: 4 B heads N k^2 D per
   forward, x3.5 with backward; dense: N^2 instead of N k^2) and the speed-up over native fused.
5. model: a DiNAT-L Mask2Former COCO-panoptic training step (batch 2, 1024x1024, bfloat16 autocast and float32):
   images/s and peak GPU memory; inference images/s at 800x1333. Needs detectron2 ("skipped: detectron2
   unavailable" where it does not import).

Writes ``report.json`` and ``report.md`` into --out. Exit status 1 when a step failed. A global time budget
(--budget-s) skips the remaining measurements rather than overrunning.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEPS = ("build", "tests", "sanitizer", "bench", "model")
DILATIONS_L = [[1, 14, 1], [1, 4, 1, 7], [1, 2, 1, 3] * 4 + [1, 3], [1, 1, 1, 1, 1]]  # COCO panoptic DiNAT-L config
DILATIONS_T = [[1, 8], [1, 4], [1, 2] * 3, [1, 1]]  # DiNAT-T, ImageNet 224
MODEL_CONFIG = "configs/coco/panoptic-segmentation/dinat/maskformer2_dinat_large_IN21k_bs16_100ep.yaml"
DRY_MODEL_CONFIG = "configs/demo/maskformer2_dinat_demo.yaml"


# ----------------------------------------------------------------------------------------------- bookkeeping


class Deadline:
    """The script's time budget: measurements check it and are skipped once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


@dataclass
class Report:
    args: dict
    environment: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)  # name -> {"status": ..., ...}
    na: list = field(default_factory=list)
    msda: list = field(default_factory=list)
    model: list = field(default_factory=list)

    def failed(self) -> list[str]:
        return [name for name, step in self.steps.items() if step["status"] == "failed"]


def run_step(report: Report, name: str, skip: set[str], fn: Callable[[], dict]) -> None:
    if name in skip:
        report.steps[name] = {"status": "skipped: --skip"}
        return
    start = time.monotonic()
    try:
        result = fn()
    except Exception as exc:  # one failing step must not lose the report of the others
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    result.setdefault("status", "ok")
    result["seconds"] = round(time.monotonic() - start, 1)
    report.steps[name] = result
    print(f"[gpu-check] {name}: {result['status']} ({result['seconds']} s)", flush=True)


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as exc:
        env["triton"] = f"unavailable ({exc})"
    return env


def run_command(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"command": " ".join(cmd), "returncode": proc.returncode, "tail": tail}


# ----------------------------------------------------------------------------------------------- build, tests


def build_env() -> dict:
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    return {"TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", "MAX_JOBS": str(os.cpu_count() or 1), "FORCE_CUDA": "1"}


def step_build(dry_run: bool, deadline: Deadline) -> dict:
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    if dry_run:
        return {"status": "skipped: dry run", "command": " ".join(cmd), "env": build_env()}
    result = run_command(cmd, env=build_env(), timeout=max(deadline.left(), 1))
    if result["returncode"] != 0:
        return {"status": "failed", **result}
    info = run_command([sys.executable, "-c", "import dinat_m2f; print(dinat_m2f.build_info())"])
    return {"status": "ok" if info["returncode"] == 0 else "failed", "build": result, "build_info": info["tail"]}


def test_commands() -> list[tuple[list[str], dict]]:
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return [
        ([*pytest, "-m", "cuda", "tests/test_na_ops.py", "tests/test_ms_deform_attn.py"], {}),
        ([*pytest, "tests/test_na_triton.py"], {"TRITON_INTERPRET": "0"}),
    ]


def step_tests(dry_run: bool, deadline: Deadline) -> dict:
    commands = test_commands()
    if dry_run:
        return {"status": "skipped: dry run", "commands": [" ".join(c) for c, _ in commands]}
    runs = [run_command(cmd, env=env, timeout=max(deadline.left(), 1)) for cmd, env in commands]
    return {"status": "ok" if all(r["returncode"] == 0 for r in runs) else "failed", "runs": runs}


SANITIZER_SCRIPT = """
import sys, torch
from dinat_m2f import ops
from dinat_m2f.ops.ms_deform_attn import ms_deform_attn
dev = sys.argv[1]
g = torch.Generator().manual_seed(0)
def t(*shape):
    return torch.randn(*shape, generator=g).to(dev).requires_grad_()
for dims, shape in ((2, (7, 9)), (1, (11,))):
    q, k, v = t(1, 2, *shape, 8), t(1, 2, *shape, 8), t(1, 2, *shape, 8)
    rpb = t(2, *(5,) * dims)
    qk, av, fused = (ops.na2d_qk, ops.na2d_av, ops.na2d) if dims == 2 else (ops.na1d_qk, ops.na1d_av, ops.na1d)
    attn = qk(q, k, 3, 2, rpb, backend="native").softmax(-1)
    out = av(attn, v, 3, 2, backend="native") + fused(q, k, v, 3, 2, rpb, backend="native")
    out.sum().backward()
shapes = torch.tensor([[6, 8], [3, 4]], device=dev)
start = torch.tensor([0, 48], device=dev)
value = t(1, 60, 2, 8)
loc = torch.rand(1, 5, 2, 2, 3, 2, generator=g).to(dev).requires_grad_()
w = torch.rand(1, 5, 2, 2, 3, generator=g).to(dev).requires_grad_()
ms_deform_attn(value, shapes, start, loc, w).sum().backward()
if dev == "cuda":
    torch.cuda.synchronize()
print("sanitizer script: every op ran forward and backward on", dev)
"""


def step_sanitizer(dry_run: bool, deadline: Deadline) -> dict:
    if dry_run:  # the same script on the CPU kernels, so that it cannot rot
        result = run_command([sys.executable, "-c", SANITIZER_SCRIPT, "cpu"], timeout=300)
        return {"status": "ok" if result["returncode"] == 0 else "failed", **result}
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(tool).exists():
        return {"status": "failed", "error": "compute-sanitizer not found on PATH nor in /usr/local/cuda/bin"}
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c", SANITIZER_SCRIPT, "cuda"]
    result = run_command(cmd, timeout=max(min(deadline.left(), 240), 1))
    return {"status": "ok" if result["returncode"] == 0 else "failed", **result}


# ----------------------------------------------------------------------------------------------- benchmarks


@dataclass(frozen=True)
class NACase:
    model: str
    stage: int
    batch: int
    heads: int
    size: int  # square map side
    head_dim: int
    kernel_size: int
    dilation: int

    @property
    def tokens(self) -> int:
        return self.size * self.size

    def na_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.tokens * self.kernel_size**2 * self.head_dim

    def dense_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.tokens**2 * self.head_dim


def na_cases(dry_run: bool) -> list[NACase]:
    if dry_run:
        return [NACase("tiny", 1, 1, 2, 9, 16, 3, 1), NACase("tiny", 1, 1, 2, 9, 16, 3, 2)]
    cases = []
    for model, batch, heads, size, kernel, dilations in (
        ("DiNAT-L@1024", 2, [6, 12, 24, 48], 256, 11, DILATIONS_L),
        ("DiNAT-T@224", 32, [2, 4, 8, 16], 56, 7, DILATIONS_T),
    ):
        for stage, stage_dilations in enumerate(dilations):
            for d in sorted(set(stage_dilations)):
                cases.append(NACase(model, stage + 1, batch, heads[stage], size >> stage, 32, kernel, d))
    return cases


def time_ms(fn: Callable[[], object], deadline: Deadline, min_time_s: float = 0.1, max_reps: int = 50) -> float:
    """Median ms of fn() after one warm-up (CUDA events on GPU); as few repetitions as the budget allows."""
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < 3 or spent < min_time_s) and deadline.left() > 0:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
    times.sort()
    return times[len(times) // 2]


def na_flex_mask(case: NACase):
    """mask_mod of dilated neighborhood attention on the flattened map (windows shifted inward at the borders)."""
    side, k, d = case.size, case.kernel_size, case.dilation

    def axis_ok(qi, ki):
        group = qi % d
        group_len = (side - group + d - 1) // d
        start = torch.clamp(qi // d - k // 2, min=0)
        start = torch.minimum(start, group_len - k)
        return (ki % d == group) & (ki // d >= start) & (ki // d < start + k)

    def mask_mod(b, h, q_idx, kv_idx):
        return axis_ok(q_idx // side, kv_idx // side) & axis_ok(q_idx % side, kv_idx % side)

    return mask_mod


def na_methods(case: NACase, device: str, dtype: torch.dtype, dry_run: bool) -> dict[str, Callable]:
    """name -> fn(q, k, v, rpb) over [B, heads, H, W, D] tensors."""
    from dinat_m2f import ops

    ks, dil = case.kernel_size, case.dilation
    scale = case.head_dim**-0.5
    methods: dict[str, Callable] = {
        "native fused": lambda q, k, v, rpb: ops.na2d(q, k, v, ks, dil, rpb, backend="native"),
        "native unfused": lambda q, k, v, rpb: ops.na2d_av(
            ops.na2d_qk(q * scale, k, ks, dil, rpb, backend="native").softmax(-1), v, ks, dil, backend="native"
        ),
    }
    if "triton" in ops.available_backends(device):
        methods["triton"] = lambda q, k, v, rpb: ops.na2d(q, k, v, ks, dil, rpb, backend="triton")
    flat = lambda t: t.flatten(2, 3)  # noqa: E731
    methods["sdpa dense (no bias)"] = lambda q, k, v, rpb: torch.nn.functional.scaled_dot_product_attention(
        flat(q), flat(k), flat(v)
    )
    # flex_attention compiles once per shape: only where the goals are set (DiNAT-L stages 1-2, bfloat16, d = 1).
    if dry_run or (dtype == torch.bfloat16 and dil == 1 and case.model.startswith("DiNAT-L") and case.stage <= 2):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = case.tokens
        block_mask = create_block_mask(na_flex_mask(case), None, None, n, n, device=device)
        flex = flex_attention if dry_run else torch.compile(flex_attention)
        methods["flex_attention (no bias)"] = lambda q, k, v, rpb: flex(
            flat(q), flat(k), flat(v), block_mask=block_mask
        )
    return methods


def bench_na(case: NACase, dtype: torch.dtype, device: str, deadline: Deadline, dry_run: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, case.size, case.size, case.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    rpb = (torch.randn(case.heads, 2 * case.kernel_size - 1, 2 * case.kernel_size - 1, generator=g) * 0.02).to(
        device, dtype
    )
    inputs = {"forward": (q, k, v, rpb), "forward+backward": tuple(t.clone().requires_grad_() for t in (q, k, v, rpb))}
    rows, outputs = [], {}
    for name, fn in na_methods(case, device, dtype, dry_run).items():
        for mode in ("forward", "forward+backward"):
            row = {**asdict(case), "dtype": str(dtype).removeprefix("torch."), "mode": mode, "method": name}
            if deadline.left() <= 0:
                rows.append({**row, "status": "skipped: time budget"})
                continue
            if dry_run and name.startswith("flex") and mode != "forward":
                rows.append({**row, "status": "skipped: flex_attention has no CPU backward"})
                continue
            try:
                args = inputs[mode]
                if mode == "forward":
                    with torch.no_grad():
                        outputs[name] = fn(*args).float()
                        ms = time_ms(lambda fn=fn, args=args: fn(*args), deadline)
                else:
                    ms = time_ms(lambda fn=fn, args=args: fn(*args).sum().backward(), deadline)
            except Exception as exc:  # e.g. out of memory for a dense baseline: recorded, not fatal
                rows.append({**row, "status": f"failed: {type(exc).__name__}: {str(exc)[:200]}"})
                continue
            flops = case.dense_flops() if name.startswith("sdpa") else case.na_flops()
            flops *= 3.5 if mode == "forward+backward" else 1.0
            rows.append({**row, "status": "ok", "ms": ms, "tflops": flops / ms / 1e9})
    reference = outputs.get("native fused")
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    for row in rows:  # the Triton output against the native one: a benchmark of a wrong kernel is worthless
        if row["method"] == "triton" and reference is not None and "triton" in outputs and row["status"] == "ok":
            diff = (outputs["triton"] - reference).abs().max().item()
            row["max_abs_diff_vs_native"] = diff
            if not diff <= tolerance:
                row["status"] = f"failed: output differs from native fused by {diff:.3g} (tolerance {tolerance})"
    by_key = {(r["mode"], r["method"]): r for r in rows if r["status"] == "ok"}
    for row in rows:
        base = by_key.get((row["mode"], "native fused"))
        if row["status"] == "ok" and base:
            row["speedup_vs_native_fused"] = base["ms"] / row["ms"]
    return rows


def bench_msda(dtype: torch.dtype, device: str, deadline: Deadline, dry_run: bool) -> list[dict]:
    from dinat_m2f.ops.ms_deform_attn import ms_deform_attn
    from dinat_m2f.ops.ms_deform_attn_reference import ms_deform_attn_reference

    # Mask2Former's pixel-decoder encoder at a 1024 crop: levels at strides 8, 16, 32, 8 heads x 32, 4 points.
    sides = [(4, 4), (2, 2)] if dry_run else [(128, 128), (64, 64), (32, 32)]
    batch, heads, dim, points = (1, 2, 8, 2) if dry_run else (2, 8, 32, 4)
    shapes = torch.tensor(sides, device=device)
    start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    tokens = int((shapes[:, 0] * shapes[:, 1]).sum())
    g = torch.Generator().manual_seed(0)
    value = torch.randn(batch, tokens, heads, dim, generator=g).to(device, dtype).requires_grad_()
    loc = torch.rand(batch, tokens, heads, len(sides), points, 2, generator=g).to(device, dtype).requires_grad_()
    weights = torch.rand(batch, tokens, heads, len(sides), points, generator=g).to(device, dtype).requires_grad_()
    methods = {
        "native": lambda: ms_deform_attn(value, shapes, start, loc, weights),
        "grid_sample": lambda: ms_deform_attn_reference(value, shapes, loc, weights),
    }
    rows = []
    for name, fn in methods.items():
        for mode in ("forward", "forward+backward"):
            row = {"tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "mode": mode, "method": name}
            if deadline.left() <= 0:
                rows.append({**row, "status": "skipped: time budget"})
                continue
            try:
                if mode == "forward":
                    with torch.no_grad():
                        ms = time_ms(fn, deadline)
                else:
                    ms = time_ms(lambda fn=fn: fn().sum().backward(), deadline)
            except Exception as exc:
                rows.append({**row, "status": f"failed: {type(exc).__name__}: {str(exc)[:200]}"})
                continue
            rows.append({**row, "status": "ok", "ms": ms})
    for row in rows:
        base = next((r for r in rows if r["mode"] == row["mode"] and r["method"] == "grid_sample"), None)
        if row["status"] == "ok" and base and base["status"] == "ok":
            row["speedup_vs_grid_sample"] = base["ms"] / row["ms"]
    return rows


def step_bench(report: Report, dry_run: bool, deadline: Deadline, reserve_s: float) -> dict:
    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        return {"status": "failed", "error": "no CUDA device"}
    bench_deadline = Deadline(max(deadline.left() - reserve_s, 0))
    dtypes = (torch.float32,) if dry_run else (torch.bfloat16, torch.float32)
    for dtype in dtypes:  # bfloat16 and DiNAT-L stages 1-2 first: the goals are set there
        for case in na_cases(dry_run):
            report.na.extend(bench_na(case, dtype, device, bench_deadline, dry_run))
            if device == "cuda":
                torch.cuda.empty_cache()
        report.msda.extend(bench_msda(dtype, device, bench_deadline, dry_run))
    rows = report.na + report.msda
    skipped = sum(r["status"].startswith("skipped") for r in rows)
    failed = [r for r in rows if r["status"].startswith("failed")]
    ours_failed = [r for r in failed if r["method"] in ("native fused", "native unfused", "triton", "native")]
    return {
        "status": "failed" if ours_failed else "ok",
        "measurements": len(rows),
        "skipped_for_time": skipped,
        "failed": len(failed),
    }


# ----------------------------------------------------------------------------------------------- model step


def synthetic_batch(batch: int, height: int, width: int, num_classes: int, device: str) -> list[dict]:
    from detectron2.structures import Instances

    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        masks = torch.zeros(5, height, width, dtype=torch.bool)
        for i in range(5):  # five rectangles of random size and place
            y0, x0 = (int(torch.randint(0, s // 2, (1,), generator=g)) for s in (height, width))
            masks[i, y0 : y0 + height // 3, x0 : x0 + width // 3] = True
        instances = Instances((height, width))
        instances.gt_classes = torch.randint(0, num_classes, (5,), generator=g)
        instances.gt_masks = masks
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
        inputs.append({"image": image, "instances": instances, "height": height, "width": width})
    return inputs


def model_measure(
    config: str,
    device: str,
    backend: str,
    precision: str,
    train_size: int,
    infer_hw: tuple[int, int],
    batch: int,
    iters: int,
) -> dict:
    from detectron2.modeling import build_model

    from dinat_m2f.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / config))
    cfg.merge_from_list(["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.DINAT.NA_BACKEND", backend])
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    inputs = synthetic_batch(batch, train_size, train_size, num_classes, device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bfloat16")

    def train_step() -> None:
        with autocast:
            losses = model(inputs)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_step()  # warm-up
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        train_step()
    sync()
    train_s = (time.perf_counter() - t0) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    model.eval()
    h, w = infer_hw
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    with torch.no_grad(), autocast:
        model([{"image": image, "height": h, "width": w}])
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            model([{"image": image, "height": h, "width": w}])
        sync()
    infer_s = (time.perf_counter() - t0) / iters
    return {
        "config": config,
        "backend": backend,
        "precision": precision,
        "train_images_per_s": batch / train_s,
        "train_peak_memory_gib": peak,
        "inference_images_per_s": 1.0 / infer_s,
        "train_size": train_size,
        "inference_size": f"{h}x{w}",
        "status": "ok",
    }


def detectron2_importable() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def step_model(report: Report, dry_run: bool, deadline: Deadline) -> dict:
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        return {"status": "skipped: detectron2 unavailable", "error": str(exc)}
    from dinat_m2f import ops

    device = "cpu" if dry_run else "cuda"
    backends = [b for b in ("native", "triton") if b in ops.available_backends(device)]
    for backend in backends:
        for precision in ("float32",) if dry_run else ("bfloat16", "float32"):
            if deadline.left() <= 0:
                report.model.append({"backend": backend, "precision": precision, "status": "skipped: time budget"})
                continue
            try:
                if dry_run:
                    row = model_measure(DRY_MODEL_CONFIG, device, backend, precision, 64, (64, 96), 2, 1)
                else:
                    row = model_measure(MODEL_CONFIG, device, backend, precision, 1024, (800, 1333), 2, 3)
            except Exception as exc:
                row = {"backend": backend, "precision": precision, "status": f"failed: {type(exc).__name__}: {exc}"}
            report.model.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    failed = any(r["status"].startswith("failed") for r in report.model)
    return {"status": "failed" if failed else "ok"}


# ----------------------------------------------------------------------------------------------- report


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(report: Report) -> str:
    lines = ["# GPU check", "", "## Environment", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in report.environment.items()]
    lines += ["", "## Steps", "", "| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {s['status']} | {_fmt(s.get('seconds'))} |" for name, s in report.steps.items()]
    if report.na:
        lines += [
            "",
            "## Neighborhood attention",
            "",
            "Useful TFLOP/s count only in-window products (dense SDPA: all).",
            "",
        ]
        lines += ["| model | stage | B | heads | map | k | d | dtype | mode | method | ms | TFLOP/s | x native fused |"]
        lines += ["| --- " * 13 + "|"]
        for r in report.na:
            lines.append(
                f"| {r['model']} | {r['stage']} | {r['batch']} | {r['heads']} | {r['size']}x{r['size']} | "
                f"{r['kernel_size']} | {r['dilation']} | {r['dtype']} | {r['mode']} | {r['method']} | "
                f"{_fmt(r.get('ms')) if r['status'] == 'ok' else r['status']} | {_fmt(r.get('tflops'))} | "
                f"{_fmt(r.get('speedup_vs_native_fused'))} |"
            )
    if report.msda:
        lines += [
            "",
            "## Multi-scale deformable attention",
            "",
            "| tokens | dtype | mode | method | ms | x grid_sample |",
        ]
        lines += ["| --- " * 6 + "|"]
        for r in report.msda:
            ms = _fmt(r.get("ms")) if r["status"] == "ok" else r["status"]
            lines.append(
                f"| {r['tokens']} | {r['dtype']} | {r['mode']} | {r['method']} | {ms} | "
                f"{_fmt(r.get('speedup_vs_grid_sample'))} |"
            )
    if report.model or "model" in report.steps:
        lines += ["", "## Mask2Former step", ""]
        if not report.model:
            lines.append(f"{report.steps['model']['status']}")
        else:
            lines += ["| backend | precision | train img/s | peak GiB | inference img/s | status |", "| --- " * 6 + "|"]
            for r in report.model:
                lines.append(
                    f"| {r.get('backend')} | {r.get('precision')} | {_fmt(r.get('train_images_per_s'))} | "
                    f"{_fmt(r.get('train_peak_memory_gib'))} | {_fmt(r.get('inference_images_per_s'))} | {r['status']} |"
                )
    return "\n".join(lines) + "\n"


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(asdict(report), indent=1, default=str))
    md_path.write_text(markdown(report))
    return json_path, md_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time budget of the whole check (seconds)")
    parser.add_argument("--skip", default="", help=f"comma-separated steps to skip, of {','.join(STEPS)}")
    parser.add_argument("--dry-run", action="store_true", help="CPU only, tiny shapes, no build: what CI runs")
    args = parser.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(STEPS)
    if unknown:
        parser.error(f"--skip: unknown step(s) {sorted(unknown)}; steps are {','.join(STEPS)}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.budget_s)
    report = Report(args={**vars(args), "out": str(args.out), "skip": sorted(args.skip)})
    report.environment = environment()
    if not args.dry_run and not torch.cuda.is_available():
        print("[gpu-check] no CUDA device: run with --dry-run on a machine without one", file=sys.stderr)
        return 2
    dry = args.dry_run
    run_step(report, "build", args.skip, lambda: step_build(dry, deadline))
    run_step(report, "tests", args.skip, lambda: step_tests(dry, deadline))
    run_step(report, "sanitizer", args.skip, lambda: step_sanitizer(dry, deadline))
    model_reserve = 0.0 if "model" in args.skip or not detectron2_importable() else min(120.0, deadline.left() / 3)
    run_step(report, "bench", args.skip, lambda: step_bench(report, dry, deadline, model_reserve))
    run_step(report, "model", args.skip, lambda: step_model(report, dry, deadline))
    json_path, md_path = write_report(report, args.out)
    print(f"[gpu-check] wrote {json_path} and {md_path}")
    failed = report.failed()
    if failed:
        print(f"[gpu-check] failed steps: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
