"""Export: standard-op lowering of NA / deformable attention, ONNX (onnxruntime), torch.export .pt2, AOTInductor.

Each export of a tiny DiNAT-Mask2Former is run at two image sizes (one dynamic graph) and compared with PyTorch
within 1e-4 (float32), from the image to the outputs post-processing consumes.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import train_helpers

from dinat_m2f.export import MaskFormerCore, dynamic_image_shapes, lowered_ops, min_unpadded_size, postprocess
from dinat_m2f.export.lowering import ms_deform_attn_grid_sample
from dinat_m2f.ops.ms_deform_attn_reference import ms_deform_attn_reference

sys.path.insert(0, os.path.join(train_helpers.REPO, "tools"))
SIZES = ["96x128", "128x96"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from detectron2.modeling import build_model

    from dinat_m2f.config import load_config
    from dinat_m2f.engine import AtomicCheckpointer

    folder = tmp_path_factory.mktemp("export")
    cfg = load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    AtomicCheckpointer(model, save_dir=str(folder)).save("tiny")
    return model, str(folder / "tiny.pth"), folder


def test_lowered_ops_equal_the_native_ops_and_are_restored(tiny):
    from dinat_m2f.modeling.backbone.na_attention import NeighborhoodAttention2D

    model, _, _ = tiny
    core = MaskFormerCore(model).eval()
    # 64x96 pads the stride-32 map (NA padding), 96x128 does not: both lowered paths must match
    for h, w in ((64, 96), (96, 128)):
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h)) * 255
        with torch.no_grad():
            native = core(x)
            with lowered_ops(model):
                lowered = core(x)
        for a, b in zip(native, lowered):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    na = next(m for m in model.modules() if isinstance(m, NeighborhoodAttention2D))
    assert "_attention" not in na.__dict__  # restored: the native op again


def test_grid_sample_deformable_attention_equals_the_reference():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (3, 3)]
    value = torch.randn(2, 39, 2, 4, generator=g)
    loc = torch.rand(2, 7, 2, 2, 3, 2, generator=g) * 1.2 - 0.1  # some points outside [0, 1]
    weights = torch.rand(2, 7, 2, 2, 3, generator=g).softmax(-1)
    expected = ms_deform_attn_reference(value, torch.tensor(shapes), loc, weights)
    torch.testing.assert_close(ms_deform_attn_grid_sample(value, shapes, loc, weights), expected)


def test_dynamic_range_starts_where_na_stops_padding(tiny):
    model, _, _ = tiny
    # the tiny model: kernel 3, dilation 1 at stride 32 -> 96 px; kernel 3, dilation 2 at stride 4 -> 24 px
    assert min_unpadded_size(model) == 96
    with pytest.raises(ValueError, match="below 96, where NA starts padding"):
        dynamic_image_shapes(model, 64, 256)
    with pytest.raises(ValueError, match="multiples of the size divisibility 32"):
        dynamic_image_shapes(model, 100, 256)


@pytest.mark.slow
def test_onnx_and_pt2_exports_match_pytorch_at_two_sizes(tiny):
    """ONNX (lowered ops, onnxruntime) and torch.export (native ops, reloaded from .pt2): ~1 min on 2 cores."""
    import export_model
    import onnx

    model, weights, folder = tiny
    out = str(folder / "out")
    argv = ["--config-file", train_helpers.DEMO_CONFIG, "--weights", weights, "--format", "onnx", "pt2"]
    argv += ["--output", out, "--sizes", *SIZES, "--max-size", "256", "--atol", str(ATOL), "--opts"]
    report = export_model.main(argv + train_helpers.TINY_OPTS)
    assert set(report) == {"onnx", "pt2"} and all(set(r) == set(SIZES) for r in report.values())
    assert all(err <= ATOL for r in report.values() for err in r.values()), report
    graph = onnx.load(os.path.join(out, "model.onnx")).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, "custom ops left in the ONNX graph"
    assert {"GridSample", "Einsum"} <= {n.op_type for n in graph.node}  # the lowered deformable attention / NA

    # post-processing on the ONNX outputs gives the model's own results
    from dinat_m2f.export.onnx import run_onnx

    x = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(1)) * 255
    logits, masks = run_onnx(os.path.join(out, "model.onnx"), x)
    got = postprocess(model, torch.from_numpy(logits), torch.from_numpy(masks), 128, 96)[0]
    with torch.no_grad():
        expected = model([{"image": x[0], "height": 128, "width": 96}])[0]
    torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], atol=ATOL, rtol=ATOL)
    assert torch.equal(got["panoptic_seg"][0], expected["panoptic_seg"][0])


@pytest.mark.slow
def test_aoti_package_matches_pytorch_at_two_sizes(tiny):
    """AOTInductor compiles C++ for the whole graph: ~2 min on 2 cores, so only the tiniest model is compiled."""
    import export_model

    _, weights, folder = tiny
    out = str(folder / "aoti")
    argv = ["--config-file", train_helpers.DEMO_CONFIG, "--weights", weights, "--format", "aoti"]
    argv += ["--output", out, "--sizes", *SIZES, "--max-size", "256", "--atol", str(ATOL), "--opts"]
    report = export_model.main(argv + train_helpers.TINY_OPTS)
    assert set(report["aoti"]) == set(SIZES) and all(e <= ATOL for e in report["aoti"].values()), report
    assert os.path.isfile(os.path.join(out, "model_aoti.pt2"))
