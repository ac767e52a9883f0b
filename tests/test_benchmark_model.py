"""tools/benchmark_model.py: its JSON record and the --keep-freed-memory switch (a subprocess each: the malloc
setting is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "benchmark_model.py"


def run_benchmark(*extra: str) -> dict:
    args = ["--models", "dinat_mini", "--batch-size", "1", "--size", "64", "--rounds", "1", "--warmup", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), DINAT_M2F_KEEP_FREED_MEMORY="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, *extra, "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("keep", [False, True])
def test_keep_freed_memory_only_when_asked(keep):
    record = run_benchmark(*(["--keep-freed-memory"] if keep else []))
    assert record["setup"]["keeps_freed_memory"] is keep
    assert record["results"]["dinat_mini"]["images_per_s"] > 0
