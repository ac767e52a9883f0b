"""tools/benchmark_mask2former.py: the two-tree comparison (--baseline) and the profile, on a shrunken model."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinat_m2f.utils.cpu_bfloat16 import cpu_has_fast_bfloat16

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "benchmark_mask2former.py"
# DiNAT-Tiny-Mask2Former shrunk to a few layers: the mechanics, not the speed, are under test
SMALL = [
    "MODEL.DINAT.DEPTHS", "[1, 1, 1, 1]",
    "MODEL.DINAT.DILATIONS", "[[1], [1], [1], [1]]",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
]  # fmt: skip


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_mask2former", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--size", "64", "--rounds", "1", "--threads", "1", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_interleaved_alternates_the_order_and_times_every_variant_each_round():
    bench = load_benchmark()
    calls = []
    timers = {name: (lambda name=name: calls.append(name) or float(len(calls))) for name in ("a", "b")}
    times = bench.interleaved(timers, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert times == {"a": [1.0, 4.0, 5.0], "b": [2.0, 3.0, 6.0]}


def test_baseline_without_a_package_is_a_clear_error(tmp_path):
    proc = run_script("--baseline", str(tmp_path))
    assert proc.returncode == 2
    assert "no dinat_m2f package there" in proc.stderr


@pytest.mark.slow
def test_baseline_same_tree_times_both_workers_and_matches_outputs():
    proc = run_script("--mode", "both", "--batch", "1", "--baseline", str(ROOT), "--json", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for name in ("this", "baseline"):
        tree = result["trees"][name]
        assert Path(tree["dinat_m2f"]) == ROOT / "dinat_m2f"
        assert tree["threads"] == 1
    for mode in ("inference", "train"):
        assert result[f"{mode}_this_s_median"] > 0 and result[f"{mode}_baseline_s_median"] > 0
        assert result[f"{mode}_baseline_over_this"] > 0 and result[f"{mode}_cpu_baseline_over_this"] > 0
        # the same code, seed and inputs: the workers' first outputs are bit-identical
        assert result[f"{mode}_identical_first_output"] is True


@pytest.mark.slow
def test_profile_reports_the_copy_share():
    proc = run_script("--profile", "5", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aten::copy_" in proc.stdout and "Self CPU" in proc.stdout
    assert "matrix products (torch.mm 1024^3" in proc.stdout and "aten::addmm" in proc.stdout.split("matrix")[-1]


def test_avx2_check_names_every_library_off_its_avx2_path():
    bench = load_benchmark()
    good = {"aten": "AVX2", "onednn_conv": "jit:avx2", "mkl": "MKL_ENABLE_INSTRUCTIONS=AVX2", "dinat_m2f": "avx2"}
    bench.check_avx2_paths(good, "here")
    bench.check_avx2_paths({**good, "dinat_m2f": "-march=x86-64-v3"}, "here")  # a tree built for AVX2
    bad = {**good, "aten": "AVX512", "onednn_conv": "jit:avx512_core", "dinat_m2f": "-march=native"}
    with pytest.raises(RuntimeError, match="ATEN_CPU_CAPABILITY.*ONEDNN_MAX_CPU_ISA.*DINAT_M2F_CPU_ARCH=x86-64-v3"):
        bench.check_avx2_paths(bad, "here")


@pytest.mark.slow
def test_cpu_isa_avx2_puts_both_workers_on_the_avx2_paths():
    proc = run_script("--cpu-isa", "avx2", "--baseline", str(ROOT), "--json", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for paths in [result["isa_paths"]] + [tree["isa_paths"] for tree in result["trees"].values()]:
        assert paths["aten"] == "AVX2" and paths["onednn_conv"] == "jit:avx2" and paths["dinat_m2f"] == "avx2"
    assert result["sgemm_gflops"] > 0


@pytest.mark.slow
def test_dtype_bfloat16_runs_this_tree_in_bfloat16_and_the_baseline_in_float32():
    proc = run_script("--baseline", str(ROOT), "--dtype", "bfloat16", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inference: this tree bfloat16 inference" in proc.stdout and "baseline float32" in proc.stdout
    # the same tree and seed, another precision: the first outputs differ
    assert "first outputs bit-identical: False" in proc.stdout
    profile = run_script("--profile", "5", "--dtype", "bfloat16", *SMALL)
    assert profile.returncode == 0, profile.stderr[-3000:]
    assert "inference (bfloat16 inference" in profile.stdout and "aten::copy_ by caller and shape" in profile.stdout


@pytest.mark.slow
def test_train_amp_autocasts_the_training_step_in_both_trees():
    amp = run_script("--mode", "train", "--batch", "1", "--baseline", str(ROOT), "--train-amp", "--json", *SMALL)
    assert amp.returncode == 0, amp.stderr[-3000:]
    amp_result = json.loads(amp.stdout)
    assert amp_result["train_amp"] is True and amp_result["train_identical_first_output"] is True
    fp32 = run_script("--mode", "train", "--batch", "1", "--baseline", str(ROOT), "--json", *SMALL)
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    # bfloat16 autocast changes the loss and the updated weights; on a CPU without fast bfloat16, AMP "auto" trains
    # in float32 (resolve_amp_dtype), the same step bit for bit
    fast = cpu_has_fast_bfloat16()
    assert amp_result["train_amp_dtype"] == ("bfloat16" if fast else None)
    first = {r["trees"]["this"]["train_first_output"]["sha1"] for r in (amp_result, json.loads(fp32.stdout))}
    assert len(first) == (2 if fast else 1)


@pytest.mark.slow
def test_train_amp_on_the_avx2_path_trains_in_float32():
    """With every library on its AVX2 code (no bfloat16 instructions), SOLVER.AMP "auto" resolves to float32."""
    run = functools.partial(run_script, "--mode", "train", "--batch", "1", "--cpu-isa", "avx2", "--json")
    amp, fp32 = run("--train-amp", *SMALL), run(*SMALL)
    assert amp.returncode == 0 and fp32.returncode == 0, amp.stderr[-3000:] + fp32.stderr[-3000:]
    amp_result = json.loads(amp.stdout)
    assert amp_result["train_amp_dtype"] is None
    assert amp_result["train_native_s_median"] > 0 and json.loads(fp32.stdout)["train_native_s_median"] > 0


def test_a_relative_baseline_is_resolved_before_its_worker_changes_directory(monkeypatch):
    bench = load_benchmark()
    monkeypatch.chdir(ROOT)
    _, args = bench.parse_args(["--baseline", "."])
    assert args.baseline == ROOT and args.baseline.is_absolute()


def test_train_amp_without_amp_in_the_config_is_a_clear_error():
    proc = run_script("--mode", "train", "--batch", "1", "--train-amp", *SMALL, "SOLVER.AMP.ENABLED", "False")
    assert proc.returncode != 0
    assert "--train-amp" in proc.stderr and "SOLVER.AMP.ENABLED False" in proc.stderr


def test_op_inputs_have_the_encoder_shapes():
    bench = load_benchmark()
    value, shapes, starts, loc, weights = bench.op_inputs(128, 2)
    assert shapes.tolist() == [[16, 16], [8, 8], [4, 4]] and starts.tolist() == [0, 256, 320]
    assert value.shape == (2, 336, 8, 32) and loc.shape == (2, 336, 8, 3, 4, 2) and weights.shape == (2, 336, 8, 3, 4)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 336, 8))
    assert bench.op_multiply_adds(128, 2) == 2 * 336 * 8 * 3 * 4 * 4 * 32


def test_op_times_native_against_grid_sample():
    proc = run_script("--op", "--mode", "both", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for name in ("inference_forward", "train_forward", "train_forward_backward"):
        assert result[f"{name}_native_s_median"] > 0 and result[f"{name}_pytorch_over_native"] > 0
        assert result[f"{name}_max_abs_diff"] < 1e-4
    assert result["train_backward_over_forward_native"] == pytest.approx(
        result["train_backward_native_s_from_medians"] / result["train_forward_native_s_median"], rel=1e-2, abs=1e-3
    )


@pytest.mark.slow
def test_op_baseline_same_tree_matches_outputs():
    proc = run_script("--op", "--mode", "train", "--baseline", str(ROOT), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for name in ("train_forward", "train_forward_backward"):
        assert result[f"{name}_baseline_over_this"] > 0
        assert result[f"{name}_identical_first_output"] is True
    assert "inference_forward_this_s_median" not in result


def test_op_refuses_model_options():
    proc = run_script("--op", "--dtype", "bfloat16")
    assert proc.returncode == 2
    assert "--op times the float32 op alone" in proc.stderr
