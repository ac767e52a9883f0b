"""tools/gpu_check.py's CPU-side logic, so that `make gpu-check` cannot rot between GPU runs.

The dry run goes through every step on the CPU with tiny shapes (the sanitizer's script on the CPU kernels, the
benchmark harness, the Mask2Former step on the demo config) and writes the report; the shapes of the real run and
the flex_attention mask are checked against the reference.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dinat_m2f.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_the_report(gpu_check, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    steps = report["steps"]
    assert steps["build"]["status"] == "skipped: dry run" and "build_ext" in steps["build"]["command"]
    assert steps["tests"]["status"] == "skipped: dry run"
    assert any("tests/test_na_triton.py" in c for c in steps["tests"]["commands"])
    assert steps["sanitizer"]["status"] == "ok", steps["sanitizer"]
    assert steps["bench"]["status"] == "ok" and steps["model"]["status"] == "ok", steps
    ours = [r for r in report["na"] if r["method"] == "native fused"]
    assert ours and all(r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0 for r in ours)
    assert {r["method"] for r in report["msda"]} == {"native", "grid_sample"}
    assert report["model"][0]["status"] == "ok" and report["model"][0]["train_images_per_s"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "## Neighborhood attention" in markdown and "| native fused |" in markdown
    assert "## Mask2Former step" in markdown


def test_failed_step_is_reported_and_sets_the_exit_status(gpu_check, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_check, "step_sanitizer", broken)
    status = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--skip", "bench,model"])
    assert status == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"]["sanitizer"] == {
        "status": "failed",
        "error": "RuntimeError: planted failure",
        "seconds": report["steps"]["sanitizer"]["seconds"],
    }
    assert report["steps"]["bench"]["status"] == "skipped: --skip"
    assert "| sanitizer | failed |" in (tmp_path / "report.md").read_text()


def test_arguments_are_checked(gpu_check, tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path), "--skip", "bench,lint"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path), "--budget-s", "0"])
    args = gpu_check.parse_args(["--out", str(tmp_path), "--skip", "tests,model"])
    assert args.skip == {"tests", "model"} and not args.dry_run


def test_real_run_covers_the_paper_shapes(gpu_check):
    cases = gpu_check.na_cases(dry_run=False)
    large = {(c.stage, c.size, c.heads, c.kernel_size, c.dilation) for c in cases if c.model == "DiNAT-L@1024"}
    assert {
        (1, 256, 6, 11, 1),
        (1, 256, 6, 11, 14),
        (2, 128, 12, 11, 7),
        (3, 64, 24, 11, 3),
        (4, 32, 48, 11, 1),
    } <= large
    tiny = {(c.stage, c.size, c.kernel_size, c.dilation) for c in cases if c.model == "DiNAT-T@224"}
    assert {(1, 56, 7, 8), (2, 28, 7, 4), (3, 14, 7, 2), (4, 7, 7, 1)} <= tiny
    assert all(c.head_dim == 32 for c in cases)


@pytest.mark.parametrize(("size", "kernel_size", "dilation"), [(9, 3, 1), (10, 3, 3), (11, 5, 2)])
def test_flex_mask_is_the_neighborhood(gpu_check, size, kernel_size, dilation):
    case = gpu_check.NACase("t", 1, 1, 1, size, 16, kernel_size, dilation)
    n = size * size
    idx = torch.arange(n)
    mask = gpu_check.na_flex_mask(case)(0, 0, idx[:, None], idx[None, :])
    win = ref.window_indices(size, kernel_size, dilation)  # [size, k]
    expected = torch.zeros(n, n, dtype=torch.bool)
    for qi in range(size):
        for qj in range(size):
            keys = (win[qi][:, None] * size + win[qj][None, :]).flatten()
            expected[qi * size + qj, keys] = True
    assert torch.equal(mask, expected)
