"""Weight files cannot run code (issue 15.1), and unreadable checkpoints name themselves (15.6, 15.7).

A pickle with a planted ``__reduce__`` is refused by every entry point (train_net MODEL.WEIGHTS, --resume,
--eval-only, the demo, the converter), while the official layouts (detectron2 checkpoints with optimizer/scheduler
state, converted backbones with numpy arrays or tensors) still load.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import train_helpers
from torch import nn

from dinat_m2f.config import load_config
from dinat_m2f.engine import AtomicCheckpointer
from dinat_m2f.utils.safe_load import CorruptWeightsError, UnsafeWeightsError, load_weights_file

sys.path.insert(0, os.path.join(train_helpers.REPO, "tools"))
import convert_dinat_checkpoint  # noqa: E402


class Planted:
    """Unpickling this creates ``marker``: the code a malicious weight file would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _write(path, obj) -> str:
    if str(path).endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return str(path)


def _planted_file(tmp_path, suffix: str, payload_key: str = "__author__") -> tuple[str, str]:
    marker = str(tmp_path / "code_ran")
    state = {"w": torch.zeros(2), "b": torch.zeros(2)}
    return _write(tmp_path / f"planted{suffix}", {"model": state, payload_key: Planted(marker)}), marker


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_planted_reduce_is_refused_naming_file_and_global(tmp_path, suffix):
    path, marker = _planted_file(tmp_path, suffix)
    with pytest.raises(UnsafeWeightsError, match=r"planted\S*: refused to load the global 'builtins.exec'") as err:
        load_weights_file(path)
    assert "MODEL.TRUST_WEIGHTS" in str(err.value)
    assert not os.path.exists(marker)
    # the payload is live: opting in to full unpickling runs it (so the refusal above is what protects)
    load_weights_file(path, trust=True)
    assert os.path.exists(marker)


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_checkpointer_load_and_resume_refuse_planted_files(tmp_path, suffix):
    path, marker = _planted_file(tmp_path, suffix)
    with pytest.raises(UnsafeWeightsError, match="builtins.exec"):
        AtomicCheckpointer(Tiny()).load(path)
    # --resume: last_checkpoint names a planted file
    run = tmp_path / "run"
    run.mkdir()
    os.replace(path, run / f"model_0000001{suffix}")
    (run / "last_checkpoint").write_text(f"model_0000001{suffix}")
    with pytest.raises(UnsafeWeightsError, match="builtins.exec"):
        AtomicCheckpointer(Tiny(), save_dir=str(run)).resume_or_load("", resume=True)
    assert not os.path.exists(marker)


def test_train_net_eval_only_training_and_demo_refuse_planted_files(tmp_path):
    import train_net

    sys.path.insert(0, os.path.join(train_helpers.REPO, "demo"))
    import demo

    path, marker = _planted_file(tmp_path, ".pth", payload_key="iteration")
    pkl, _ = _planted_file(tmp_path, ".pkl")
    train_helpers.make_tiny_dataset(str(tmp_path / "datasets"))
    opts = [*train_helpers.TINY_OPTS, "OUTPUT_DIR", str(tmp_path / "out")]
    for weights in (path, pkl):
        args = ["--config-file", train_helpers.DEMO_CONFIG, *opts, "MODEL.WEIGHTS", weights]
        with pytest.raises(UnsafeWeightsError, match="builtins.exec"):
            train_net.main(train_net.argument_parser().parse_args(["--eval-only", *args]))
        with pytest.raises(UnsafeWeightsError, match="builtins.exec"):
            train_net.Trainer(train_net.setup(train_net.argument_parser().parse_args(args))).resume_or_load(False)
        cfg = load_config(train_helpers.DEMO_CONFIG, [*opts, "MODEL.WEIGHTS", weights])
        with pytest.raises(UnsafeWeightsError, match="builtins.exec"):
            demo.Overlayer(cfg)
    assert not os.path.exists(marker)
    # --trust-weights is the explicit opt-in: the file is then unpickled fully (and here runs its payload)
    args = ["--eval-only", "--trust-weights", "--config-file", train_helpers.DEMO_CONFIG, *opts, "MODEL.WEIGHTS", path]
    with pytest.raises(Exception):  # noqa: B017 (it then fails on the file's unfit tensors; the point is the marker)
        train_net.main(train_net.argument_parser().parse_args(args))
    assert os.path.exists(marker)


def test_converter_refuses_planted_input(tmp_path, caplog):
    path, marker = _planted_file(tmp_path, ".pth")
    out = tmp_path / "out.pth"
    assert convert_dinat_checkpoint.main([path, str(out)]) == 2
    assert "refused to load the global 'builtins.exec'" in caplog.text
    assert not out.exists() and not os.path.exists(marker)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_converted_backbone_pkl_layouts_load(tmp_path, protocol):
    """detectron2 .pkl layouts: numpy arrays (our old converter, Caffe2-era files) or torch tensors pickled plainly
    (the official convert-pretrained-*-to-d2.py scripts), with ``__author__`` and ``matching_heuristics``."""
    arrays = {"levels.0.w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int64(3)}
    tensors = {"levels.0.w": torch.arange(6.0).reshape(2, 3), "levels.0.b": torch.ones(3, dtype=torch.float16)}
    for name, model in (("arrays", arrays), ("tensors", tensors)):
        path = tmp_path / f"{name}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": model, "__author__": "third_party", "matching_heuristics": True}, f, protocol)
        loaded = load_weights_file(str(path))
        assert loaded["__author__"] == "third_party" and loaded["matching_heuristics"] is True
        for key, value in model.items():
            got = loaded["model"][key]
            assert type(got) is type(value)
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else np.array_equal(got, value), key


def test_pth_with_numpy_arrays_loads(tmp_path):
    path = _write(tmp_path / "np.pth", {"model": {"w": np.ones((2, 2), np.float32)}, "__author__": "x", "it": 3})
    loaded = load_weights_file(path)
    assert np.array_equal(loaded["model"]["w"], np.ones((2, 2), np.float32)) and loaded["it"] == 3


def test_checkpoint_saved_by_the_trainer_loads_and_resumes_with_weights_only(tmp_path):
    """A real checkpoint of our Trainer (model, iteration, AdamW state, LR scheduler, hooks) needs no allow-list."""
    import train_net

    train_helpers.make_tiny_dataset(str(tmp_path / "datasets"))
    out = str(tmp_path / "out")
    argv = ["--config-file", train_helpers.DEMO_CONFIG, *train_helpers.TINY_OPTS, "OUTPUT_DIR", out]
    argv += ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"]
    trainer = train_net.Trainer(train_net.setup(train_net.argument_parser().parse_args(argv)))
    trainer.resume_or_load(resume=False)
    trainer.train()

    data = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    assert data["iteration"] == 1
    assert data["trainer"]["_trainer"]["optimizer"]["state"]  # AdamW moments
    assert data["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 2  # the LR schedule's state
    assert load_weights_file(os.path.join(out, "model_final.pth"))["iteration"] == 1

    resumed = train_net.Trainer(train_net.setup(train_net.argument_parser().parse_args(["--resume", *argv])))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2


# ------------------------------------------------------------------------------ killed saves, truncated files


def test_stale_save_temporaries_are_removed_when_a_run_starts(tmp_path, caplog):
    stale = [".model_0000005.pth.k2j4_x9q.tmp", ".last_checkpoint.a1b2c3d4.tmp", ".model_final.pth.zz99aa11.tmp"]
    kept = ["notes.tmp", ".hidden.tmp", "model_0000004.pth", ".model_0000005.pth"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 10)
    with caplog.at_level(logging.INFO):
        AtomicCheckpointer(Tiny(), save_dir=str(tmp_path)).resume_or_load("", resume=False)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert f"Removed {tmp_path / stale[0]}" in caplog.text


def test_truncated_weights_file_error_names_the_file(tmp_path):
    ckpt = AtomicCheckpointer(Tiny(), save_dir=str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    path = tmp_path / "model_0000001.pth"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptWeightsError, match=f"{path}: cannot read this weight file, it is truncated"):
        AtomicCheckpointer(Tiny()).load(str(path))
    pkl = tmp_path / "cut.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"w": np.zeros(100)}})[:50])
    with pytest.raises(CorruptWeightsError, match=f"{pkl}: cannot read"):
        load_weights_file(str(pkl))


def test_resume_from_truncated_last_checkpoint_names_it_and_the_previous_good_one(tmp_path):
    ckpt = AtomicCheckpointer(Tiny(), save_dir=str(tmp_path))
    for i in (1, 2, 3):
        ckpt.save(f"model_{i:07d}", iteration=i)
        os.utime(tmp_path / f"model_{i:07d}.pth", (1000 + i, 1000 + i))
    (tmp_path / "model_0000002.pth").write_bytes(b"PK\x03\x04 also truncated")
    last = tmp_path / "model_0000003.pth"
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    with pytest.raises(CorruptWeightsError) as err:
        AtomicCheckpointer(Tiny(), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    message = str(err.value)
    assert f"the last checkpoint {last} (named by {tmp_path / 'last_checkpoint'}) is unreadable" in message
    assert f"the newest intact one is {tmp_path / 'model_0000001.pth'}" in message
    assert f"printf '%s' model_0000001.pth > {tmp_path / 'last_checkpoint'}" in message
    # following the advice resumes
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    assert AtomicCheckpointer(Tiny(), save_dir=str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 1
