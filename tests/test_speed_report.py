"""tools/speed_report.py: issue #11's targets read from the benchmarks' JSON (made-up results), the plan of commands,
and one real benchmark step end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "speed_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("speed_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def record(impl: str, pass_: str, ms: float, shape="1x4x56x56x32", d=1, dtype="float32", gflops=10.0, k=7) -> dict:
    return {
        "op": "na2d",
        "impl": impl,
        "shape": shape,
        "kernel_size": k,
        "dilation": d,
        "dtype": dtype,
        "pass": pass_,
        "ms": ms,
        "ms_min": ms,
        "gflops": gflops,
    }


def test_quick_rows_hold_or_miss_at_their_thresholds(report):
    records = [
        record("fused", "fwd", 1.0),
        record("reference", "fwd", 30.0),  # exactly 30: holds
        record("fused", "fwd+bwd", 2.0, gflops=49.9),  # 24.95% of 200: misses
        record("reference", "fwd+bwd", 59.0),  # 29.5: misses
    ]
    rows = report.ops_quick_rows({"records": records, "matmul_float32_gflops": 200.0}, "native", "cmd")
    assert [(r.target.split(",")[0], r.measured, r.met) for r in rows] == [
        ("reference/fused forward", "30.0", True),
        ("reference/fused forward+backward", "29.5", False),
        ("fused forward+backward", "24.9%", False),
    ]
    assert all(r.path == "native" and r.command == "cmd" for r in rows)


def test_cell_rows_name_the_slowest_cell_and_count_the_misses(report):
    records = []
    for shape, unfused_over_fused in (("1x2x56x56x32", 1.5), ("1x4x28x28x32", 0.97), ("1x8x14x14x32", 0.99)):
        for pass_ in ("fwd", "fwd+bwd"):
            records += [record("fused", pass_, 1.0, shape), record("unfused", pass_, unfused_over_fused, shape)]
    rows = report.ops_cells_rows({"records": records, "cpu_bf16_dot": False}, "avx2", "cmd", "DiNAT-T cells")
    assert len(rows) == 2  # float32 fwd, fwd+bwd: no bf16 records, so no bf16 rows
    assert rows[0].met is False
    assert rows[0].measured == "min 0.97 at 1x4x28x28x32 k7 d1; 2 of 3 cells miss"


@pytest.mark.parametrize("bf16_dot, met", [(True, False), (False, True)])
def test_bf16_goal_is_faster_with_bf16_instructions_and_no_slower_without(report, bf16_dot, met):
    records = []
    for dtype in ("float32", "bfloat16"):
        for pass_ in ("fwd", "fwd+bwd"):
            records.append(record("fused", pass_, 1.0, dtype=dtype))  # bf16 exactly as fast as float32
    rows = report.ops_cells_rows({"records": records, "cpu_bf16_dot": bf16_dot}, "native", "cmd", "cells")
    bf16_rows = [r for r in rows if "bf16/f32" in r.target]
    assert len(bf16_rows) == 2 and all(r.met is met for r in bf16_rows)
    assert all(("AVX512_BF16" in r.goal) is bf16_dot for r in bf16_rows)


def test_model_copies_and_mask2former_rows(report):
    model = {"results": {"dinat_tiny": {"images_per_s": 12.0}, "swin_tiny_patch4_window7_224": {"images_per_s": 10.0}}}
    (row,) = report.model_rows(model, "native", "cmd")
    assert row.met is True and row.measured.startswith("1.20x")

    line = "inference (float32): 0.913 s self CPU time in operators, 2 threads, NA kernels: avx512; aten::copy_ 5.0%"
    (row,) = report.copies_rows(line, "native", "cmd")
    assert row.measured == "5.0%" and row.met is False  # the goal is below 5%
    with pytest.raises(ValueError, match="aten::copy_"):
        report.copies_rows("no profile here", "native", "cmd")

    m2f = {"this_inference_dtype": "float32", "train_amp": False}
    for mode, ratio in (("inference", 1.99), ("train", 1.5)):
        m2f.update({
            f"{mode}_baseline_over_this": ratio,
            f"{mode}_this_s_median": 1.0,
            f"{mode}_baseline_s_median": ratio,
            f"{mode}_cpu_baseline_over_this": ratio,
        })  # fmt: skip
    inference, train = report.m2f_rows(m2f, "native", "cmd")
    assert "inference (float32)" in inference.target and inference.met is False
    assert "float32" in train.target and train.met is True


def test_dry_run_plans_every_benchmark_on_every_path(report, tmp_path, capsys):
    (tmp_path / "dinat_m2f").mkdir()  # what --baseline checks for
    args = ["--dry-run", "--paths", "native,avx2", "--baseline", str(tmp_path), "--baseline-avx2", str(tmp_path)]
    args.append("--all-precisions")
    assert report.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 8
    avx2 = [line for line in lines if line.startswith("[avx2]")]
    assert len(avx2) == 8 and all(
        "DINAT_M2F_CPU_ISA=avx2" in line and "MKL_ENABLE_INSTRUCTIONS" in line for line in avx2
    )
    assert sum("benchmark_mask2former.py" in line and "--baseline" in line for line in lines) == 6
    # commands as typed in the checkout: "python tools/...", after the avx2 path's environment
    commands = [line.split(": ", 1)[1] for line in lines]
    assert all(c.startswith("python tools/") for c, line in zip(commands, lines) if line.startswith("[native]"))
    assert all(c.split(" python ", 1)[1].startswith("tools/") for c in commands if c.startswith("ATEN_CPU_CAPABILITY"))


def test_each_path_gets_its_own_baseline_tree(report, tmp_path, capsys):
    """09463ec has no run-time ISA choice: the avx2 path compares against a tree built for AVX2."""
    native, avx2 = tmp_path / "native", tmp_path / "avx2"
    for tree in (native, avx2):
        (tree / "dinat_m2f").mkdir(parents=True)
    assert (
        report.main(["--dry-run", "--paths", "native,avx2", "--baseline", str(native), "--baseline-avx2", str(avx2)])
        == 0
    )
    m2f = [line for line in capsys.readouterr().out.splitlines() if "--baseline" in line]
    assert [line.split("--baseline ")[1].split()[0] for line in m2f] == [str(native), str(avx2)]
    assert report.main(["--dry-run", "--paths", "avx2", "--baseline", str(native)]) == 0  # no AVX2 baseline: no rows
    assert "--baseline" not in capsys.readouterr().out


def test_a_failing_benchmark_becomes_a_failed_row_and_the_report_goes_on(report, tmp_path, monkeypatch, capsys):
    steps = [
        report.Step("model", "native", [sys.executable, "-c", "import sys; sys.exit('broken on purpose')"], {}, "a"),
        report.Step(
            "copies", "native", [sys.executable, "-c", "print('x self CPU time y; aten::copy_ 1.5%')"], {}, "b"
        ),
    ]
    monkeypatch.setattr(report, "plan", lambda args: steps)
    monkeypatch.setattr(report, "machine", lambda: {"cpu": "test CPU", "cores": 2})
    assert report.main(["--out", str(tmp_path)]) == 0
    failed, copies = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert failed["met"] is False and "broken on purpose" in failed["measured"]
    assert copies["measured"] == "1.5%" and copies["met"] is True
    assert "test CPU" in (tmp_path / "report.md").read_text()
    capsys.readouterr()


def test_unknown_path_and_missing_baseline_are_refused(report, tmp_path):
    with pytest.raises(SystemExit):
        report.parse_args(["--paths", "avx512"])
    with pytest.raises(SystemExit):
        report.parse_args(["--baseline", str(tmp_path)])  # no dinat_m2f package there


def test_a_real_benchmark_step_is_run_and_read(report):
    bench = [sys.executable, str(ROOT / "tools" / "benchmark_ops.py"), "--json", "--threads", "1", "--quick"]
    step = report.Step("ops-quick", "native", [*bench, "--repeats", "1", "--impls", "fused,reference"])
    rows = report.rows_of(step, report.run_step(step))
    assert len(rows) == 6  # reference/fused fwd and fwd+bwd, matmul share; at d=1 and d=8
    assert all(r.met is not None and r.command.startswith("python tools/benchmark_ops.py") for r in rows)


def test_a_failing_step_says_which_command_failed(report):
    step = report.Step("model", "native", [sys.executable, "-c", "import sys; sys.exit('broken on purpose')"])
    with pytest.raises(RuntimeError, match="broken on purpose"):
        report.run_step(step)


def test_demo_row_times_the_run_against_the_issues_11m35s(report, tmp_path, capsys):
    line = "demo: PQ=84.8 AP=62.8 mIoU=95.7"
    (fast,) = report.demo_rows({"seconds": 300.4, "line": line}, "native", "cmd")
    assert fast.met is True and fast.measured == "5m00s, PQ=84.8 AP=62.8 mIoU=95.7" and "11m35s" in fast.goal
    (slow,) = report.demo_rows({"seconds": 695.0, "line": line}, "native", "cmd")
    assert slow.met is False
    # the demo step runs from nothing in its own directory under --out, not in the checkout's datasets/
    assert report.main(["--dry-run", "--demo", "--out", str(tmp_path)]) == 0
    (demo,) = [line for line in capsys.readouterr().out.splitlines() if "run_demo.py" in line]
    assert f"DETECTRON2_DATASETS={tmp_path}/demo-native/datasets" in demo and "OUTPUT_DIR" in demo
