"""tools/convert_dinat_checkpoint.py and dinat_m2f.modeling.backbone.convert."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from dinat_m2f.config import get_cfg
from dinat_m2f.modeling.backbone import D2DiNAT, DiNAT
from dinat_m2f.modeling.backbone.convert import (
    CheckpointMismatchError,
    check_against_target,
    convert_state_dict,
    cubic_resize_matrix,
    resize_rpb,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_dinat_checkpoint  # noqa: E402

ARCH = dict(embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2.0)
DILATIONS = [[1, 2], [1, 2], [1], [1]]


def _ramp(heads: int, size: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias linear in the (row, column) index, per head, and the index grid."""
    idx = torch.arange(size, dtype=dtype)
    slopes = torch.arange(1, heads + 1, dtype=dtype)[:, None, None]
    return slopes * (2.0 * idx[:, None] - 0.5 * idx[None, :]) + 3.0, idx


@pytest.mark.parametrize("k_from,k_to", [(7, 11), (3, 5), (11, 7), (7, 7)])
def test_rpb_resize_is_exact_on_a_linear_ramp(k_from, k_to):
    rpb, _ = _ramp(3, 2 * k_from - 1)
    out = resize_rpb(rpb, k_to, method="keys")
    assert out.shape == (3, 2 * k_to - 1, 2 * k_to - 1)
    # offsets +-(k-1) map onto +-(k'-1): new index j sits at old index j * (2k-2) / (2k'-2)
    pos = torch.arange(2 * k_to - 1, dtype=torch.float64) * (2 * k_from - 2) / (2 * k_to - 2)
    slopes = torch.arange(1, 4, dtype=torch.float64)[:, None, None]
    expected = slopes * (2.0 * pos[:, None] - 0.5 * pos[None, :]) + 3.0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_rpb_resize_is_exact_on_quadratics_and_keeps_dtype():
    idx = torch.arange(13, dtype=torch.float64)
    quad = (idx[:, None] - 4.0) ** 2 + 0.25 * idx[None, :] ** 2
    pos = torch.arange(21, dtype=torch.float64) * 12 / 20
    expected = (pos[:, None] - 4.0) ** 2 + 0.25 * pos[None, :] ** 2
    torch.testing.assert_close(resize_rpb(quad[None], 11, method="keys")[0], expected, rtol=0, atol=1e-11)
    assert resize_rpb(quad[None].float(), 11, method="keys").dtype == torch.float32
    torch.testing.assert_close(cubic_resize_matrix(13, 21).sum(1), torch.ones(21, dtype=torch.float64))


def test_torch_method_is_swin_style_interpolate():
    rpb = torch.randn(2, 13, 13, dtype=torch.float64)
    expected = F.interpolate(rpb[None], size=(21, 21), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(resize_rpb(rpb, 11, method="torch"), expected)
    with pytest.raises(ValueError, match="unknown rpb resize method"):
        resize_rpb(rpb, 11, method="nearest")
    with pytest.raises(ValueError, match=r"\[heads, 2k-1, 2k-1\]"):
        resize_rpb(torch.randn(2, 12, 12), 11)


def test_convert_state_dict_drops_head_and_logs():
    model = DiNAT(**ARCH, kernel_size=3, dilations=DILATIONS, num_classes=10)
    weights, log = convert_state_dict(model.state_dict(), kernel_size=5)
    assert not any(k.startswith(("head.", "norm.")) for k in weights)
    assert weights["levels.0.blocks.1.attn.rpb"].shape == (1, 9, 9)
    assert any("dropped the classification head" in line and "head.weight" in line for line in log)
    assert any(line.startswith("resized levels.3.blocks.0.attn.rpb: (4, 5, 5) -> (4, 9, 9)") for line in log)
    assert "6 relative-position biases resized to kernel 5" in log


def test_check_against_target_names_every_problem():
    target = {"a.weight": (2, 2), "b.weight": (3,), "norm0.weight": (4,)}
    weights = {"a.weight": torch.zeros(2, 3), "c.bias": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError) as err:
        check_against_target(weights, target, new_ok=("norm0.",))
    message = str(err.value)
    assert "shape mismatch a.weight: checkpoint (2, 3) vs model (2, 2)" in message
    assert "unexpected c.bias" in message
    assert "missing b.weight" in message
    assert "norm0" not in message
    assert check_against_target({"a.weight": torch.zeros(2, 2)}, {"a.weight": (2, 2), "norm0.w": (1,)}, ("norm0.",))


# ----------------------------------------------------------------------------------------------- the CLI


def _write_config(tmp_path: Path, kernel_size: int) -> Path:
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "D2DiNAT"
    c = cfg.MODEL.DINAT
    c.EMBED_DIM, c.DEPTHS, c.NUM_HEADS, c.MLP_RATIO = ARCH["embed_dim"], ARCH["depths"], ARCH["num_heads"], 2.0
    c.KERNEL_SIZE, c.DILATIONS = kernel_size, DILATIONS
    path = tmp_path / f"dinat_k{kernel_size}.yaml"
    path.write_text(cfg.dump())
    return path


def _official_pth(tmp_path: Path, wrap: bool = False) -> tuple[Path, dict]:
    torch.manual_seed(0)
    state = DiNAT(**ARCH, kernel_size=3, dilations=DILATIONS, num_classes=10).state_dict()
    for key in state:
        if key.endswith("attn.rpb"):
            state[key] = _ramp(state[key].shape[0], 5, torch.float32)[0]
    path = tmp_path / "official.pth"
    torch.save({"model": state} if wrap else state, path)
    return path, state


class _Wrapper(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def test_cli_converts_resizes_and_loads_into_d2dinat(tmp_path, caplog):
    pth, official = _official_pth(tmp_path, wrap=True)
    out = tmp_path / "converted.pth"
    config = str(_write_config(tmp_path, 5))
    with caplog.at_level(logging.INFO):
        rc = convert_dinat_checkpoint.main([str(pth), str(out), "--config-file", config, "--rpb-resize", "keys"])
    assert rc == 0
    assert "resized levels.0.blocks.0.attn.rpb: (1, 5, 5) -> (1, 9, 9)" in caplog.text
    payload = torch.load(out, weights_only=True)
    assert payload["matching_heuristics"] is True and "__author__" in payload
    assert not any(k.startswith(("head.", "norm.")) for k in payload["model"])
    pos = torch.arange(9, dtype=torch.float64) * 4 / 8
    torch.testing.assert_close(
        payload["model"]["levels.2.blocks.0.attn.rpb"].double(),
        torch.arange(1, 3, dtype=torch.float64)[:, None, None] * (2.0 * pos[:, None] - 0.5 * pos[None, :]) + 3.0,
        rtol=0,
        atol=1e-5,
    )

    # detectron2 loads it into a k=5 D2DiNAT (backbone.X <- X): every converted tensor is used
    model = _Wrapper(D2DiNAT(**ARCH, kernel_size=5, dilations=DILATIONS))
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(out)))
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert sorted(incompatible.missing_keys) == sorted(
        f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")
    )
    assert torch.equal(
        model.backbone.levels[1].blocks[0].attn.qkv.weight, official["levels.1.blocks.0.attn.qkv.weight"]
    )


def test_cli_reports_mismatches_by_name_and_writes_nothing(tmp_path, caplog):
    pth, state = _official_pth(tmp_path)
    state["levels.1.blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)  # wrong shape
    state["levels.9.extra"] = torch.zeros(1)  # unknown tensor
    del state["levels.0.downsample.reduction.weight"]  # missing tensor
    torch.save(state, pth)
    out = tmp_path / "converted.pth"
    rc = convert_dinat_checkpoint.main([str(pth), str(out), "--config-file", str(_write_config(tmp_path, 3))])
    assert rc == 2 and not out.exists()
    assert "shape mismatch levels.1.blocks.0.mlp.fc1.weight" in caplog.text
    assert "unexpected levels.9.extra" in caplog.text
    assert "missing levels.0.downsample.reduction.weight" in caplog.text


def test_cli_errors_on_bad_files_and_contradictions(tmp_path, caplog):
    out = tmp_path / "o.pth"
    assert convert_dinat_checkpoint.main([str(tmp_path / "absent.pth"), str(out)]) == 2
    assert "no checkpoint at" in caplog.text
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert convert_dinat_checkpoint.main([str(corrupt), str(out)]) == 2
    assert "not a readable torch checkpoint" in caplog.text
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    assert convert_dinat_checkpoint.main([str(empty), str(out)]) == 2
    assert "non-tensor entries" in caplog.text
    pth, _ = _official_pth(tmp_path)
    cfg = str(_write_config(tmp_path, 5))
    assert convert_dinat_checkpoint.main([str(pth), str(out), "--config-file", cfg, "--kernel-size", "7"]) == 2
    assert "contradicts MODEL.DINAT.KERNEL_SIZE 5" in caplog.text
    assert not out.exists()


def test_cli_kernel_size_only(tmp_path):
    pth, _ = _official_pth(tmp_path)
    out = tmp_path / "k7.pth"
    assert convert_dinat_checkpoint.main([str(pth), str(out), "--kernel-size", "7"]) == 0
    weights = torch.load(out, weights_only=True)["model"]
    assert weights["levels.3.blocks.0.attn.rpb"].shape == (4, 13, 13)


def test_cli_default_resize_is_swin_style_bicubic(tmp_path):
    """The default resize is the official 11x11interp file's: F.interpolate(bicubic), not Keys (exact on ramps)."""
    pth, official = _official_pth(tmp_path)
    out = tmp_path / "default.pth"
    assert convert_dinat_checkpoint.main([str(pth), str(out), "--kernel-size", "5"]) == 0
    weights = torch.load(out, weights_only=True)["model"]
    rpb = official["levels.1.blocks.0.attn.rpb"]
    swin = F.interpolate(rpb[None].double(), size=(9, 9), mode="bicubic", align_corners=False)[0].float()
    torch.testing.assert_close(weights["levels.1.blocks.0.attn.rpb"], swin)
    keys = resize_rpb(rpb, 5, method="keys")
    assert not torch.allclose(weights["levels.1.blocks.0.attn.rpb"], keys, atol=1e-4)


def test_cli_writes_a_torch_file_and_refuses_a_pkl_name(tmp_path, caplog):
    pth, _ = _official_pth(tmp_path)
    assert convert_dinat_checkpoint.main([str(pth), str(tmp_path / "out.pkl"), "--kernel-size", "3"]) == 2
    assert "must end in .pth" in caplog.text and not (tmp_path / "out.pkl").exists()
    out = tmp_path / "out.pth"
    assert convert_dinat_checkpoint.main([str(pth), str(out), "--kernel-size", "3"]) == 0
    payload = torch.load(out, weights_only=True)  # plain tensors: loads without unpickling code
    assert all(isinstance(v, torch.Tensor) for v in payload["model"].values())
    # a detectron2 .pkl (numpy arrays, the old output) is still a valid input
    legacy = tmp_path / "legacy.pkl"
    with open(legacy, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in payload["model"].items()}, "__author__": "x"}, f)
    again = tmp_path / "again.pth"
    assert convert_dinat_checkpoint.main([str(legacy), str(again), "--kernel-size", "3"]) == 0
    assert os.path.getsize(again) > 0
    assert torch.equal(torch.load(again, weights_only=True)["model"]["levels.0.blocks.0.attn.rpb"],
                       payload["model"]["levels.0.blocks.0.attn.rpb"])  # fmt: skip
