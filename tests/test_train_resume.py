"""A run SIGKILLed mid-training and restarted with --resume ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import REPO

HELPER = os.path.join(REPO, "tests", "train_helpers.py")
OPTS = ["SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "3"]


def _cmd(out_dir, *flags):
    return [sys.executable, HELPER, *flags, str(out_dir), *OPTS]


def _run(out_dir, env, *flags):
    proc = subprocess.run(_cmd(out_dir, *flags), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    _run(tmp_path / "uninterrupted", env)

    # Interrupted run: blocks after iteration 7 (checkpoints exist after iterations 2 and 5), then SIGKILL.
    killed = tmp_path / "killed"
    killed.mkdir()
    with open(tmp_path / "killed.log", "w") as log_file:
        proc = subprocess.Popen(_cmd(killed, "--sleep-after-iter", "7"), env=env, stdout=log_file, stderr=log_file)
    deadline = time.time() + 600
    while not (killed / "blocked").exists():
        assert proc.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()
        assert time.time() < deadline, "timed out waiting for the run to reach iteration 7"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "last_checkpoint").read_text() == "model_0000005.pth"
    assert not (killed / "model_final.pth").exists()

    _run(killed, env, "--resume")
    log = (killed / "log.txt").read_text()
    assert "Resumed the data stream at sample 12" in log  # iterations 0..5 done, 2 images each

    a = _weights(tmp_path / "uninterrupted" / "model_final.pth")
    b = _weights(killed / "model_final.pth")
    assert a["iteration"] == b["iteration"] == 9
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resume"
    # and the optimizer state too (Adam moments)
    sa, sb = (x["trainer"]["_trainer"]["optimizer"]["state"] for x in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])
    # not trivially equal: training moved the weights after the checkpoint it resumed from
    c = _weights(killed / "model_0000005.pth")["model"]
    assert any(not torch.equal(c[k], b["model"][k]) for k in c)


@pytest.mark.slow
def test_resume_cleans_killed_saves_and_names_a_truncated_last_checkpoint(tmp_path):
    """train_net.py --resume: a killed save's temporary is removed; a truncated last checkpoint is an error naming it
    and the newest intact checkpoint (not a bare zip error)."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    _run(run, env)
    assert (run / "last_checkpoint").read_text() == "model_final.pth"
    stale = run / ".model_0000011.pth.x7_k2abc.tmp"
    stale.write_bytes(b"\0" * 1000)
    final = run / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])

    proc = subprocess.run(_cmd(run, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert not stale.exists()
    assert f"{final}: cannot read this weight file, it is truncated or corrupt" in proc.stderr
    assert f"the newest intact one is {run / 'model_0000008.pth'}" in proc.stderr
    assert f"printf '%s' model_0000008.pth > {run / 'last_checkpoint'}" in proc.stderr
