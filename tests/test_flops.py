"""FLOP counting of the NA ops (paper convention) and every variant's parameters / FLOPs against the papers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dinat_m2f import ops
from dinat_m2f.config import get_cfg
from dinat_m2f.utils.flops import dinat_flop_count_analysis, variant_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import analyze_model  # noqa: E402


class _Ops(nn.Module):
    def __init__(self, mode: str, kernel: int = 3, dilation: int = 2, heads: int = 2):
        super().__init__()
        self.mode, self.kernel, self.dilation = mode, kernel, dilation
        self.rpb = nn.Parameter(torch.zeros(heads, 2 * kernel - 1, 2 * kernel - 1))

    def forward(self, q, k, v):
        if self.mode == "qk":
            return ops.na2d_qk(q, k, self.kernel, self.dilation, rpb=self.rpb)
        if self.mode == "qk_no_bias":
            return ops.na2d_qk(q, k, self.kernel, self.dilation)
        if self.mode == "av":
            attn = torch.zeros(*q.shape[:-1], self.kernel**2)
            return ops.na2d_av(attn, v, self.kernel, self.dilation)
        if self.mode == "fused":
            return ops.na2d(q, k, v, self.kernel, self.dilation, rpb=self.rpb)
        if self.mode == "packed":  # the backbone's call: q, k, v packed as the qkv projection output
            qkv = torch.stack([t.movedim(1, 3) for t in (q, k, v)], dim=3)  # [B, H, W, 3, heads, D]
            return ops.na2d_qkv(qkv, self.kernel, self.dilation, rpb=self.rpb, backend="native")
        if self.mode == "packed1d":
            qkv = torch.stack([t[:, :, 0].movedim(1, 2) for t in (q, k, v)], dim=2)  # [B, L, 3, heads, D]
            return ops.na1d_qkv(qkv, self.kernel, self.dilation, backend="native")
        return ops.na1d(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.kernel, self.dilation)


@pytest.mark.parametrize(
    "mode,expected",
    [
        # B=2, heads=2, H=7, W=9, D=5, k=3 -> positions 252, K=9
        ("qk", 252 * (5 * 9 + 9)),
        ("qk_no_bias", 252 * 5 * 9),
        ("av", 252 * 5 * 9),
        ("fused", 252 * (2 * 5 * 9 + 9)),
        ("packed", 252 * (2 * 5 * 9 + 9)),
        ("packed1d", 2 * 2 * 9 * (2 * 5 * 3)),
        ("na1d", 2 * 2 * 9 * (2 * 5 * 3)),  # 1D: K = k, no bias
    ],
)
def test_na_op_handles_count_like_the_paper(mode, expected):
    q = torch.randn(2, 2, 7, 9, 5)
    flops = dinat_flop_count_analysis(_Ops(mode), (q, q.clone(), q.clone()))
    assert flops.total() == expected


# Paper numbers (spec/dinat.md 2.1-2.3): (params in M, GFLOPs) at the variant's own resolution.
PAPER = {
    "dinat_mini": (20, 2.7),
    "dinat_tiny": (28, 4.3),
    "dinat_small": (51, 7.8),
    "dinat_base": (90, 13.7),
    "dinat_large": (200, 30.6),
    "dinat_large_384": (200, 89.7),
    "dinat_large_384_11x11": (200, 92.4),
    "dinat_s_tiny": (28, 4.5),
    "dinat_s_small": (50, 8.7),
    "dinat_s_base": (88, 15.4),
    "dinat_s_large": (197, 34.5),
    "dinat_s_large_384": (197, 101.5),
    "nat_iso_small": (22, 4.3),
    "dinat_iso_small": (22, 4.3),
    "dinat_iso_base": (86, 16.9),
}


def _within(value: float, paper: float, rel: float, digits: int) -> bool:
    """Within ``rel`` of the paper's value, or equal to it once rounded as the paper rounds."""
    return abs(value - paper) <= rel * paper or round(value, digits) == paper


@pytest.mark.parametrize("name", sorted(PAPER))
def test_variant_params_and_flops_match_the_paper(name):
    params, flops, _ = variant_flops(name)
    paper_params, paper_gflops = PAPER[name]
    # Papers round params to 1M: 1% of the value or the rounding (e.g. 200.94M -> "200M", 28.29M -> "28M").
    assert _within(params / 1e6, paper_params, 0.01, 0), (name, params)
    assert abs(flops / 1e9 - paper_gflops) <= 0.01 * paper_gflops, (name, flops)


def test_analyze_model_variant_json(capsys):
    assert analyze_model.main(["--variant", "dinat_mini", "--input-size", "64", "96", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == 19_984_174 and result["input"] == [3, 64, 96]
    assert result["gflops"] * 1e9 == variant_flops("dinat_mini", (64, 96))[1]


def test_analyze_model_detectron2_config(tmp_path, capsys):
    """A whole detectron2 model (here detectron2's SemanticSegmentor + SemSegFPNHead on D2DiNAT)."""
    from detectron2.modeling import build_model

    import dinat_m2f.modeling.backbone  # noqa: F401

    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.BACKBONE.NAME = "D2DiNAT"
    c = cfg.MODEL.DINAT
    c.EMBED_DIM, c.DEPTHS, c.NUM_HEADS, c.KERNEL_SIZE = 16, [1, 1, 1, 1], [1, 2, 2, 4], 3
    c.DILATIONS = [[1], [1], [1], [1]]
    cfg.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.MODEL.DEVICE = "cpu"
    path = tmp_path / "semseg_dinat.yaml"
    path.write_text(cfg.dump())

    assert analyze_model.main(["--config-file", str(path), "--input-size", "64", "96", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input"] == [3, 64, 96]
    assert result["params"] == sum(p.numel() for p in build_model(cfg).parameters())
    # at least the backbone's NA: 5 NA layers at res2..res5 with D=16 (k=3): sum over stages of h*H*W*(2*D*9+9)
    na = sum(h * (64 // s) * (96 // s) * (2 * 16 * 9 + 9) for h, s in zip([1, 2, 2, 4], [4, 8, 16, 32]))
    assert result["gflops"] * 1e9 > na


class _Baddbmm(nn.Module):
    def forward(self, bias, a, b):
        return torch.baddbmm(bias, a, b)


def test_baddbmm_counted_like_bmm():
    """nn.MultiheadAttention (Mask2Former's decoder) computes its scores with baddbmm on recent PyTorch."""
    flops = dinat_flop_count_analysis(_Baddbmm(), (torch.zeros(4, 5, 7), torch.randn(4, 5, 3), torch.randn(4, 3, 7)))
    assert flops.total() == 4 * 5 * 3 * 7
