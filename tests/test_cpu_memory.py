"""dinat_m2f.utils.cpu_memory: freed CPU tensors' memory is reused without page faults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A forward-like sequence of 36 MB temporaries (matmul, in-place and out-of-place ops, softmax), run until the heap
# is warm; then the fewest minor page faults of three more runs (once in a full test run one of them found a 36 MB
# block fresh, 8,789 faults: heap fragmentation, not the setting; with the setting off every run faults > 20,000).
CHILD = """
import json, resource, torch
from dinat_m2f.utils.cpu_memory import keep_freed_cpu_memory
applied = keep_freed_cpu_memory()
x = torch.randn(3000, 3000)
def forward():
    y = torch.mm(x, x).relu_() + x
    return (y.softmax(-1) * 2).sum()
for _ in range(3):
    forward()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    forward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": min(faults)}))
"""

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def run_child(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DINAT_M2F_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["DINAT_M2F_KEEP_FREED_MEMORY"] = env_value
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    kept = run_child(None)
    assert kept["applied"] is True
    assert kept["faults"] < 500  # each fresh 36 MB block would be 8,789 faults


def test_the_environment_variable_turns_it_off_and_glibc_faults_again():
    default = run_child("0")
    assert default["applied"] is False
    assert default["faults"] > 20_000  # glibc's default: each 36 MB block is mmapped and unmapped every time
