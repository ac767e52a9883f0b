#!/usr/bin/env python
"""Issue #11's CPU speed targets in one command: runs the benchmarks one after another, then prints each target
with its goal, what this machine measured, and whether it holds.

    python tools/speed_report.py --make-baseline                 # every target, this CPU's own code paths
    python tools/speed_report.py --baseline /path/to/09463ec-tree --paths native,avx2
    python tools/speed_report.py --dry-run --paths native,avx2   # the commands only
    make speed-report                                             # the first line, report in build/speed-report

The benchmarks (each a process of its own, run in sequence: run nothing else on the machine meanwhile, the ratios
come from interleaved timings inside each benchmark):
- ``tools/benchmark_ops.py --quick``: reference/fused at 1x4x56x56x32 k7 d1 and d8 (goal >= 30, forward and forward +
  backward) and the fused forward + backward's share of the machine's float32 matmul rate (goal >= 25%);
- ``tools/benchmark_ops.py --impls fused,unfused --dtype float32,bfloat16``: fused not slower than unfused in every
  cell (DiNAT-T at 224, batch 1 and 8; DiNAT-L at the 512 and 640 crops, batch 1, or 1 and 8 with ``--full``), and
  bfloat16 against float32 (faster where the CPU has AVX512_BF16, no slower where it has not);
- ``tools/benchmark_model.py``: DiNAT-T images/s over timm Swin-T's (goal >= 1.2, glibc's default malloc as the
  issue measured it);
- ``tools/benchmark_mask2former.py --profile``: ``aten::copy_``'s share of DiNAT-T-Mask2Former inference (< 5%);
- ``tools/benchmark_mask2former.py --baseline``: DiNAT-T-Mask2Former at 512x512 against commit 09463ec, inference
  (goal >= 2x) and a training step (>= 1.5x), float32; ``--all-precisions`` adds bfloat16 inference
  (MODEL.MASK_FORMER.TEST.DTYPE) and the training step under the config's AMP, as train_net runs it;
- with ``--demo``: ``demo/run_demo.py`` (what ``make demo`` runs) from nothing, its dataset and output in ``--out``:
  under the issue's 11m35s, with the metrics it printed.

Paths: ``native`` runs every library on this CPU's own code; ``avx2`` sets the environment of
``benchmark_mask2former --cpu-isa avx2`` (ATen, oneDNN, MKL and our NA kernels on their AVX2 code), the code an
AVX2-only CPU runs, on this CPU. The report names the CPU (model, AVX-512 / AVX512_BF16 or not): the same code paths
on a real AVX2-only CPU are not the same measurement. Writes report.md and report.json (with every benchmark's raw
JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
BASELINE_COMMIT = "09463ec"
# per path: the native path's baseline built for this CPU; the avx2 path's with -march=x86-64-v3, since 09463ec
# predates the run-time choice (DINAT_M2F_CPU_ISA) and benchmark_mask2former --cpu-isa avx2 checks every library
DEFAULT_BASELINE_DIRS = {
    "native": ROOT / "build" / f"baseline-{BASELINE_COMMIT}",
    "avx2": ROOT / "build" / f"baseline-{BASELINE_COMMIT}-avx2",
}
BASELINE_BUILD_ENVS = {"native": {}, "avx2": {"DINAT_M2F_CPU_ARCH": "x86-64-v3"}}
sys.path.insert(0, str(TOOLS))
from benchmark_mask2former import AVX2_ENV  # noqa: E402  (every library's AVX2 code: --cpu-isa avx2's environment)

PATH_ENVS = {"native": {}, "avx2": AVX2_ENV}
QUICK_SHAPE = "1x4x56x56x32"
DEMO_LIMIT_S = 11 * 60 + 35  # issue #11: make demo took 11m35s on the AVX2 machine before the work


@dataclass
class Step:
    """One benchmark process: ``kind`` says how its output is read."""

    kind: str
    path: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    label: str = ""

    def command(self) -> str:
        """The command as a person types it in the repository root."""
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        shown = ["python" if a == sys.executable else a.removeprefix(f"{ROOT}/") for a in self.argv]
        return " ".join([env, *(shlex.quote(a) for a in shown)]).strip()


@dataclass
class Row:
    """One target on one path: ``met`` is None where it was not measured."""

    target: str
    path: str
    goal: str
    measured: str
    met: bool | None
    command: str = ""


# ---------------------------------------------------------------------------------------------------------------
# What to run


def plan(args: argparse.Namespace) -> list[Step]:
    py = sys.executable
    threads = ["--threads", str(args.threads)]
    steps = []
    for path in args.paths:
        env = PATH_ENVS[path]
        ops = [py, str(TOOLS / "benchmark_ops.py"), "--json", *threads]
        steps.append(Step("ops-quick", path, [*ops, "--quick"], env, "reference / fused / unfused, 56x56"))
        cells = [*ops, "--impls", "fused,unfused", "--dtype", "float32,bfloat16", "--repeats", str(args.repeats)]
        steps.append(Step("ops-cells", path, [*cells, "--models", "dinat-t-224"], env, "DiNAT-T cells"))
        steps.append(
            Step(
                "ops-cells",
                path,
                [*cells, "--models", "dinat-l-512,dinat-l-640", "--batches", "1,8" if args.full else "1"],
                env,
                "DiNAT-L cells",
            )
        )
        model = [py, str(TOOLS / "benchmark_model.py"), "--json", *threads, "--rounds", str(args.model_rounds)]
        steps.append(Step("model", path, model, env, "DiNAT-T / Swin-T / ConvNeXt-T images/s"))
        if args.demo:
            where = args.out / f"demo-{path}"  # its own dataset and output: a run from nothing, nobody's files touched
            demo = [py, str(ROOT / "demo" / "run_demo.py"), "--opts", "OUTPUT_DIR", str(where / "output")]
            env_demo = {**env, "DETECTRON2_DATASETS": str(where / "datasets")}
            steps.append(Step("demo", path, demo, env_demo, "make demo's run, from nothing"))
        m2f = [py, str(TOOLS / "benchmark_mask2former.py"), *threads]
        if path == "avx2":
            m2f += ["--cpu-isa", "avx2"]
        steps.append(Step("copies", path, [*m2f, "--profile", "1"], env, "aten::copy_ share of inference"))
        baseline = args.baselines.get(path)
        if baseline is None:
            continue
        against = [*m2f, "--json", "--baseline", str(baseline), "--rounds", str(args.m2f_rounds)]
        steps.append(Step("m2f", path, [*against, "--mode", "both"], env, f"Mask2Former vs {BASELINE_COMMIT}"))
        if args.all_precisions:
            bf16 = [*against, "--mode", "inference", "--dtype", "bfloat16"]
            steps.append(Step("m2f", path, bf16, env, f"Mask2Former bf16 inference vs {BASELINE_COMMIT}"))
            amp = [*against, "--mode", "train", "--train-amp"]
            steps.append(Step("m2f", path, amp, env, f"Mask2Former AMP training vs {BASELINE_COMMIT}"))
    return steps


def run_step(step: Step) -> dict | str:
    """The step's JSON (a dict), for ``copies`` its profile header line, for ``demo`` its time and last line."""
    if step.kind == "demo":
        shutil.rmtree(Path(step.env["DETECTRON2_DATASETS"]).parent, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(
        step.argv, cwd=ROOT, env={**os.environ, **step.env}, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{step.command()}\nexited with {proc.returncode}:\n{tail}")
    if step.kind == "copies":
        return copy_share_line(proc.stdout, step.command())
    if step.kind == "demo":
        lines = [line for line in proc.stdout.splitlines() if line.startswith("demo: PQ=")]
        if not lines:
            raise RuntimeError(f"{step.command()}\nprinted no 'demo: PQ=...' line:\n{proc.stdout[-2000:]}")
        return {"seconds": seconds, "line": lines[-1]}
    start = proc.stdout.find("{")
    if start < 0:
        raise RuntimeError(f"{step.command()}\nprinted no JSON:\n{proc.stdout[-2000:]}")
    return json.loads(proc.stdout[start:])


def copy_share_line(stdout: str, command: str) -> str:
    for line in stdout.splitlines():
        if "aten::copy_" in line and "self CPU time" in line:
            return line.strip()
    raise RuntimeError(f"{command}\nprinted no 'aten::copy_ N%' profile header:\n{stdout[-2000:]}")


# ---------------------------------------------------------------------------------------------------------------
# Reading the results against the targets (pure functions: tests/test_speed_report.py feeds them made-up results)


def _records(data: dict) -> dict[tuple, dict]:
    return {(r["shape"], r["kernel_size"], r["dilation"], r["dtype"], r["pass"], r["impl"]): r for r in data["records"]}


def _cell(key: tuple) -> str:
    shape, k, d = key[:3]
    return f"{shape} k{k} d{d}"


def ops_quick_rows(data: dict, path: str, command: str) -> list[Row]:
    """reference/fused >= 30 at 1x4x56x56x32 d1 and d8 (forward, forward + backward); fused forward + backward
    >= 25% of the float32 matmul rate."""
    recs = _records(data)
    rows = []
    for d in sorted({key[2] for key in recs if key[0] == QUICK_SHAPE}):
        for pass_ in ("fwd", "fwd+bwd"):
            fused = recs.get((QUICK_SHAPE, 7, d, "float32", pass_, "fused"))
            ref = recs.get((QUICK_SHAPE, 7, d, "float32", pass_, "reference"))
            if fused is None or ref is None:
                continue
            ratio = ref["ms"] / fused["ms"]
            name = f"reference/fused {'forward' if pass_ == 'fwd' else 'forward+backward'}, {QUICK_SHAPE} k7 d{d}"
            rows.append(Row(name, path, ">= 30", f"{ratio:.1f}", ratio >= 30, command))
        fused = recs.get((QUICK_SHAPE, 7, d, "float32", "fwd+bwd", "fused"))
        if fused is not None:
            share = 100 * fused["gflops"] / data["matmul_float32_gflops"]
            rows.append(
                Row(
                    f"fused forward+backward, % of float32 matmul rate "
                    f"({data['matmul_float32_gflops']:.0f} GFLOP/s), {QUICK_SHAPE} k7 d{d}",
                    path,
                    ">= 25%",
                    f"{share:.1f}%",
                    share >= 25,
                    command,
                )
            )
    return rows


def _ratio_row(pairs: dict[tuple, float], target: str, goal: str, ok, path: str, command: str) -> Row:
    """One row for ratios keyed by cell: the minimum, where it is, and how many cells miss ``ok``."""
    worst = min(pairs, key=pairs.get)
    misses = [key for key, value in pairs.items() if not ok(value)]
    measured = f"min {pairs[worst]:.2f} at {_cell(worst)}; {len(misses)} of {len(pairs)} cells miss"
    return Row(target, path, goal, measured, not misses, command)


def ops_cells_rows(data: dict, path: str, command: str, label: str) -> list[Row]:
    """Fused not slower than unfused in every cell (per dtype and pass); bfloat16 against float32 (fused)."""
    recs = _records(data)
    rows = []
    for dtype in ("float32", "bfloat16"):
        for pass_ in ("fwd", "fwd+bwd"):
            pairs = {
                key: recs[(*key[:5], "unfused")]["ms"] / r["ms"]
                for key, r in recs.items()
                if key[3] == dtype and key[4] == pass_ and key[5] == "fused" and (*key[:5], "unfused") in recs
            }
            if pairs:
                name = f"{label}: fused/unfused speed, {dtype} {pass_}"
                rows.append(_ratio_row(pairs, name, ">= 1.00 in every cell", lambda v: v >= 1.0, path, command))
    bf16_dot = bool(data.get("cpu_bf16_dot"))
    for pass_ in ("fwd", "fwd+bwd"):
        pairs = {
            key: r["ms"] / recs[(*key[:3], "bfloat16", pass_, "fused")]["ms"]
            for key, r in recs.items()
            if key[3] == "float32"
            and key[4] == pass_
            and key[5] == "fused"
            and (*key[:3], "bfloat16", pass_, "fused") in recs
        }
        if not pairs:
            continue
        if bf16_dot:
            goal, ok = "> 1.00 (faster: the CPU has AVX512_BF16)", (lambda v: v > 1.0)
        else:
            goal, ok = ">= 1.00 (no slower: no bf16 instructions)", (lambda v: v >= 1.0)
        rows.append(_ratio_row(pairs, f"{label}: bf16/f32 speed of the fused op, {pass_}", goal, ok, path, command))
    return rows


def model_rows(data: dict, path: str, command: str) -> list[Row]:
    results = data["results"]
    dinat, swin = results.get("dinat_tiny"), results.get("swin_tiny_patch4_window7_224")
    if dinat is None or swin is None:
        return []
    ratio = dinat["images_per_s"] / swin["images_per_s"]
    measured = f"{ratio:.2f}x ({dinat['images_per_s']:.1f} vs {swin['images_per_s']:.1f} images/s)"
    return [Row("DiNAT-T images/s over timm Swin-T (batch 8, 224)", path, ">= 1.2x", measured, ratio >= 1.2, command)]


def copies_rows(line: str, path: str, command: str) -> list[Row]:
    match = re.search(r"aten::copy_ ([0-9.]+)%", line)
    if match is None:
        raise ValueError(f"no 'aten::copy_ N%' in {line!r}")
    share = float(match.group(1))
    return [
        Row("aten::copy_ share of DiNAT-T-Mask2Former inference", path, "< 5%", f"{share:.1f}%", share < 5, command)
    ]


def m2f_rows(data: dict, path: str, command: str) -> list[Row]:
    rows = []
    precision = "bfloat16" if data.get("this_inference_dtype") == "bfloat16" else "float32"
    for mode, goal in (("inference", 2.0), ("train", 1.5)):
        key = f"{mode}_baseline_over_this"
        if key not in data:
            continue
        if mode == "inference":
            what = f"Mask2Former inference ({precision}) speed-up over {BASELINE_COMMIT}"
        else:
            amp = "float32"
            if data.get("train_amp"):
                amp = f"under the config's AMP: {data.get('train_amp_dtype') or 'float32'} here"
            what = f"Mask2Former training step ({amp}) speed-up over {BASELINE_COMMIT}"
        ratio = data[key]
        measured = (
            f"{ratio:.2f}x ({data[f'{mode}_this_s_median']:.3f} vs {data[f'{mode}_baseline_s_median']:.3f} s; "
            f"process CPU time {data[f'{mode}_cpu_baseline_over_this']:.2f}x)"
        )
        rows.append(Row(what, path, f">= {goal:g}x", measured, ratio >= goal, command))
    return rows


def demo_rows(data: dict, path: str, command: str) -> list[Row]:
    """make demo from nothing (synthetic data, training, evaluation, overlays) under the issue's 11m35s."""
    minutes, seconds = divmod(round(data["seconds"]), 60)
    metrics = data["line"].removeprefix("demo: ")
    measured = f"{minutes}m{seconds:02d}s, {metrics}"
    goal = f"< {DEMO_LIMIT_S // 60}m{DEMO_LIMIT_S % 60:02d}s, metrics printed"
    return [Row("make demo from nothing", path, goal, measured, data["seconds"] < DEMO_LIMIT_S, command)]


def rows_of(step: Step, result: dict | str) -> list[Row]:
    command = step.command()
    if step.kind == "ops-quick":
        return ops_quick_rows(result, step.path, command)
    if step.kind == "ops-cells":
        return ops_cells_rows(result, step.path, command, step.label)
    if step.kind == "model":
        return model_rows(result, step.path, command)
    if step.kind == "copies":
        return copies_rows(result, step.path, command)
    if step.kind == "m2f":
        return m2f_rows(result, step.path, command)
    if step.kind == "demo":
        return demo_rows(result, step.path, command)
    raise ValueError(f"unknown step kind {step.kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# The machine and the report


def machine() -> dict:
    """The CPU (model name, the ISA extensions that pick our code paths), cores, torch and our build."""
    from dinat_m2f.utils.cpu_info import cpu_flags, cpuinfo_field

    info: dict = {"cpu": cpuinfo_field("model name") or "unknown", "cores": os.cpu_count()}
    have = cpu_flags()
    info["isa"] = [
        f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16") if f in have
    ]
    import torch

    import dinat_m2f

    build = dinat_m2f.build_info()
    info.update(
        torch=torch.__version__,
        na_cpu_isa=build.get("cpu_isa"),
        na_cpu_isas_supported=build.get("cpu_isas_supported"),
        na_cpu_bf16_dot=build.get("cpu_bf16_dot"),
    )
    return info


def markdown(rows: list[Row], info: dict, started: str, seconds: float, skipped: list[str]) -> str:
    isa = ", ".join(info.get("isa", [])) or "none found"
    lines = [
        f"# Speed report ({started}, {seconds / 60:.1f} min)",
        "",
        f"CPU: {info['cpu']} ({info['cores']} logical cores; {isa}); torch {info.get('torch')}; NA kernels' "
        f"default path {info.get('na_cpu_isa')} (built: {info.get('na_cpu_isas_supported')}).",
        "Paths: native = this CPU's own code in every library; avx2 = ATen, oneDNN, MKL and our NA kernels forced to "
        "their AVX2 code on this CPU (an emulation of an AVX2-only CPU, not one).",
        "",
        "| target | path | goal | measured | holds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        held = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.target} | {r.path} | {r.goal} | {r.measured} | {held} |")
    lines += ["", f"{sum(r.met is True for r in rows)} of {len(rows)} rows hold."]
    lines += [f"Not measured: {s}" for s in skipped]
    lines += ["", "Commands:", ""]
    lines += [f"- `{c}`" for c in dict.fromkeys(r.command for r in rows)]
    return "\n".join(lines) + "\n"


def make_baseline(directory: Path, build_env: dict[str, str]) -> Path:
    """A worktree of BASELINE_COMMIT at ``directory`` with its extension built in place (CPU only, ``build_env``)."""
    if (directory / "dinat_m2f").is_dir() and any((directory / "dinat_m2f").glob("_C*.so")):
        return directory
    if not directory.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(directory), BASELINE_COMMIT], cwd=ROOT, check=True)
    print(f"building the extension of {BASELINE_COMMIT} in {directory} (CPU only, a few minutes)", file=sys.stderr)
    env = {**os.environ, **build_env, "FORCE_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=directory,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return directory


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="native", help="comma-separated: native, avx2 (default native)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of every benchmark (default 2)")
    parser.add_argument(
        "--baseline", type=Path, default=None, help=f"a tree of commit {BASELINE_COMMIT}, built for this CPU"
    )
    parser.add_argument(
        "--baseline-avx2",
        type=Path,
        default=None,
        help=f"a tree of {BASELINE_COMMIT} built with DINAT_M2F_CPU_ARCH=x86-64-v3, for the avx2 path",
    )
    parser.add_argument(
        "--make-baseline",
        action="store_true",
        help="create and build the baselines the paths need that no option gives (git worktrees under build/)",
    )
    parser.add_argument("--full", action="store_true", help="DiNAT-L cells at batch 8 too (much longer)")
    parser.add_argument("--all-precisions", action="store_true", help="also bf16 inference and AMP training")
    parser.add_argument("--demo", action="store_true", help="also time make demo's run from nothing (~5 min)")
    parser.add_argument("--repeats", type=int, default=5, help="benchmark_ops repeats per cell (default 5)")
    parser.add_argument("--model-rounds", type=int, default=7, help="benchmark_model rounds (default 7)")
    parser.add_argument("--m2f-rounds", type=int, default=5, help="benchmark_mask2former rounds (default 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "speed-report")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in args.paths if p not in PATH_ENVS]
    if unknown or not args.paths:
        parser.error(f"--paths: unknown {unknown}; choose from {', '.join(PATH_ENVS)}")
    args.baselines = {}
    for path, given, option in (
        ("native", args.baseline, "--baseline"),
        ("avx2", args.baseline_avx2, "--baseline-avx2"),
    ):
        if given is not None and not (given / "dinat_m2f").is_dir():
            parser.error(f"{option} {given}: no dinat_m2f package there (a checkout of {BASELINE_COMMIT}?)")
        if path in args.paths and given is not None:
            args.baselines[path] = given
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path in args.paths if args.make_baseline else ():
        if path not in args.baselines:
            directory = DEFAULT_BASELINE_DIRS[path]
            args.baselines[path] = directory if args.dry_run else make_baseline(directory, BASELINE_BUILD_ENVS[path])
    steps = plan(args)
    if args.dry_run:
        print("\n".join(f"[{s.path}] {s.label}: {s.command()}" for s in steps))
        return 0
    skipped = [
        f"{path}: Mask2Former against {BASELINE_COMMIT} (no baseline tree: --make-baseline, --baseline[-avx2])"
        for path in args.paths
        if path not in args.baselines
    ]
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    rows: list[Row] = []
    raw = []
    for i, step in enumerate(steps, 1):
        elapsed = time.perf_counter() - t0
        print(f"[{i}/{len(steps)}] {elapsed / 60:5.1f} min  {step.path}: {step.label}", file=sys.stderr, flush=True)
        try:
            result = run_step(step)
        except RuntimeError as e:  # one broken benchmark must not lose the others' results: a row says it failed
            print(f"  failed: {e}", file=sys.stderr)
            raw.append({"step": asdict(step), "error": str(e)})
            rows.append(
                Row(
                    f"{step.label} (failed)",
                    step.path,
                    "-",
                    f"failed: {str(e).splitlines()[-1]}",
                    False,
                    step.command(),
                )
            )
            continue
        raw.append({"step": asdict(step), "result": result})
        rows += rows_of(step, result)
    info = machine()
    text = markdown(rows, info, started, time.perf_counter() - t0, skipped)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text)
    report = {"machine": info, "rows": [asdict(r) for r in rows], "raw": raw}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(text)
    print(f"written: {args.out / 'report.md'}, {args.out / 'report.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
