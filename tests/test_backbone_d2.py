"""D2DiNAT / D2DiNATs: config, registry, shapes and strides (odd sizes, with and without padding), freezing,
activation checkpointing, torch.compile and loading an official-format detectron2 checkpoint."""

from __future__ import annotations

import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import BACKBONE_REGISTRY, ShapeSpec, build_backbone
from test_backbone import official_dinat_keys, official_dinat_s_keys  # tests/ is on sys.path (rootless tests)
from torch import nn

from dinat_m2f.config import get_cfg
from dinat_m2f.modeling.backbone import D2DiNAT, D2DiNATs


def small_cfg(name: str = "D2DiNAT", **dinat):
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = name
    c = cfg.MODEL.DINAT
    c.EMBED_DIM, c.DEPTHS, c.NUM_HEADS, c.KERNEL_SIZE = 16, [2, 2, 1, 1], [1, 2, 2, 4], 3
    c.DILATIONS = [[1, 4], [1, 2], [1], [1]]
    c.DROP_PATH_RATE = 0.0
    for key, value in dinat.items():
        setattr(c, key, value)
    return cfg


def test_config_defaults_follow_the_official_wrapper():
    c = get_cfg().MODEL.DINAT
    assert (c.EMBED_DIM, c.DEPTHS, c.NUM_HEADS, c.KERNEL_SIZE) == (192, [3, 4, 18, 5], [6, 12, 24, 48], 7)
    assert (c.DILATIONS, c.MLP_RATIO, c.QKV_BIAS, c.QK_SCALE) == (None, 2.0, True, None)
    assert (c.DROP_RATE, c.ATTN_DROP_RATE, c.DROP_PATH_RATE, c.LAYER_SCALE) == (0.0, 0.0, 0.3, None)
    assert c.OUT_FEATURES == ["res2", "res3", "res4", "res5"]
    assert (c.FROZEN_STAGES, c.USE_CHECKPOINT) == (-1, False)
    assert "D2DiNAT" in BACKBONE_REGISTRY and "D2DiNATs" in BACKBONE_REGISTRY


@pytest.mark.parametrize("name", ["D2DiNAT", "D2DiNATs"])
@pytest.mark.parametrize(
    "height,width",
    [
        (97, 131),  # res2 25x33 >= k*d = 12: no padding in stage 1; padding in later stages only where needed
        (29, 35),  # res2 8x9 < 12, res3 4x5 < 6, res4/res5 below k: every DiNA (and NA) layer pads
    ],
)
def test_outputs_shapes_and_strides_for_odd_sizes(name, height, width):
    torch.manual_seed(0)
    backbone = build_backbone(small_cfg(name)).eval()
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res2": (16, 4),
        "res3": (32, 8),
        "res4": (64, 16),
        "res5": (128, 32),
    }
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, height, width))
    for key, spec in shapes.items():
        # strided convs (and the 4x4 patchify + Swin merging, zero-padded) give ceil sizes
        expected = (2, spec.channels, -(-height // spec.stride), -(-width // spec.stride))
        assert tuple(out[key].shape) == expected, key
        assert torch.isfinite(out[key]).all()
        # NCHW in the channels-last memory the stages compute in (no copy; the pixel decoder's convs prefer it)
        assert out[key].is_contiguous(memory_format=torch.channels_last), key


def test_out_features_subset():
    backbone = build_backbone(small_cfg(OUT_FEATURES=["res3", "res5"]))
    assert set(backbone.output_shape()) == {"res3", "res5"}
    assert set(backbone(torch.randn(1, 3, 64, 64))) == {"res3", "res5"}


@pytest.mark.parametrize(
    "dilations,message",
    [
        ([[1, 4], [1, 2], [1]], "MODEL.DINAT.DILATIONS must be a list of 4 per-stage lists"),
        ([[1, 4], [1, 2, 1], [1], [1]], r"MODEL.DINAT.DILATIONS\[1\] must list one dilation per layer"),
        ([[1, 0], [1, 2], [1], [1]], r"MODEL.DINAT.DILATIONS\[0\]\[1\] must be an integer >= 1, got 0"),
        ([[1, 4.0], [1, 2], [1], [1]], r"MODEL.DINAT.DILATIONS\[0\]\[1\] must be an integer >= 1, got 4.0"),
        ([[1, "4"], [1, 2], [1], [1]], r"MODEL.DINAT.DILATIONS\[0\]\[1\] must be an integer >= 1, got '4'"),
        (7, "list of 4 per-stage lists"),
    ],
)
def test_bad_dilations_are_config_errors(dilations, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(small_cfg(DILATIONS=dilations))


def test_other_bad_config_values():
    with pytest.raises(ValueError, match="MODEL.DINAT.KERNEL_SIZE: kernel_size must be an odd integer > 1, got 4"):
        build_backbone(small_cfg(KERNEL_SIZE=4))
    with pytest.raises(ValueError, match="DEPTHS must have 4 entries"):
        build_backbone(small_cfg(DEPTHS=[2, 2, 1]))
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_backbone(small_cfg(OUT_FEATURES=["res6"]))
    with pytest.raises(ValueError, match="no layer scale"):
        build_backbone(small_cfg("D2DiNATs", LAYER_SCALE=1e-5))
    with pytest.raises(TypeError, match="unknown DiNAT backbone argument"):
        D2DiNAT(embed_dim=16, depths=[1] * 4, num_heads=[1] * 4, kernal_size=3)


def test_layer_scale_is_plumbed():
    backbone = build_backbone(small_cfg(LAYER_SCALE=1e-5))
    block = backbone.levels[0].blocks[0]
    assert torch.equal(block.gamma1.detach(), torch.full((16,), 1e-5))


def test_frozen_stages():
    backbone = build_backbone(small_cfg(FROZEN_STAGES=2, DROP_PATH_RATE=0.2)).train()
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert all(n.startswith(("patch_embed.", "levels.0.", "levels.1.", "norm0.", "norm1.")) for n in frozen)
    assert all(n.startswith(("levels.2.", "levels.3.", "norm2.", "norm3.")) for n in trainable)
    assert frozen and trainable
    assert not backbone.levels[1].training and backbone.levels[2].training  # frozen stages stay in eval mode


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_backbone(small_cfg()).double().train()
    ckpt = build_backbone(small_cfg(USE_CHECKPOINT=True)).double().train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 45, 61, dtype=torch.float64)
    grads = []
    for model in (plain, ckpt):
        loss = sum((out * torch.linspace(0, 1, out.shape[-1], dtype=torch.float64)).sum() for out in model(x).values())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert ckpt.levels[0].use_checkpoint
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_torch_compile_fullgraph_forward_and_backward():
    """fullgraph=True: no graph break (fake kernels and autograd of the native ops, padding, crop).

    aot_eager keeps this test fast; inductor compiles the same graph (checked by hand, too slow for CI on 2 cores).
    """
    torch.manual_seed(0)
    backbone = build_backbone(small_cfg()).train()
    x = torch.randn(1, 3, 29, 35)  # exercises the padding path
    eager = backbone(x)
    compiled = torch.compile(backbone, fullgraph=True, backend="aot_eager")(x)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-5)
    sum(v.sum() for v in compiled.values()).backward()
    assert backbone.levels[0].blocks[1].attn.rpb.grad is not None


class _Wrapper(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone


@pytest.mark.parametrize("name", ["D2DiNAT", "D2DiNATs"])
def test_official_detectron2_checkpoint_keys_load_with_every_tensor_used(name, tmp_path):
    """An official DiNAT-M2F model_final.pkl names the backbone tensors backbone.<official name>."""
    cfg = small_cfg(name)
    if name == "D2DiNAT":
        expected = official_dinat_keys(16, [2, 2, 1, 1], [1, 2, 2, 4], 2.0, 3, dense=True)
    else:
        cfg.MODEL.DINAT.MLP_RATIO = 4.0
        cfg.MODEL.DINAT.KERNEL_SIZE = 7
        expected = official_dinat_s_keys(16, [2, 2, 1, 1], [1, 2, 2, 4], dense=True)
    backbone = build_backbone(cfg)
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == expected
    torch.manual_seed(1)
    weights = {f"backbone.{k}": torch.randn(shape).numpy() for k, shape in expected.items()}
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test"}, f)
    model = _Wrapper(backbone)
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(path)))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    for key, value in model.state_dict().items():
        assert torch.equal(value, torch.from_numpy(weights[key])), key


def test_m2f_dinat_large_config_builds_with_official_names():
    """The backbone of the official M2F DiNAT-L configs (k=11, spec 3.2 dilations), on the meta device."""
    cfg = get_cfg()
    c = cfg.MODEL.DINAT
    c.KERNEL_SIZE = 11
    c.DILATIONS = [[1, 14, 1], [1, 4, 1, 7], [1, 2, 1, 3] * 4 + [1, 3], [1, 1, 1, 1, 1]]
    with torch.device("meta"):
        backbone = BACKBONE_REGISTRY.get("D2DiNAT")(cfg, ShapeSpec(channels=3))
    expected = official_dinat_keys(192, [3, 4, 18, 5], [6, 12, 24, 48], 2.0, 11, dense=True)
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == expected
    assert [b.attn.dilation for b in backbone.levels[2].blocks][-4:] == [1, 3, 1, 3]


def test_classification_weights_fill_the_d2_backbone():
    """D2DiNAT accepts a classifier's weights (minus head/norm) under the same names, as the converter emits."""
    from dinat_m2f.modeling.backbone import DiNAT

    kwargs = dict(embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 2, 2, 4], kernel_size=3, mlp_ratio=2.0)
    classifier = DiNAT(**kwargs, dilations=[[1, 4], [1, 2], [1], [1]], num_classes=10)
    backbone = D2DiNAT(**kwargs, dilations=[[1, 4], [1, 2], [1], [1]])
    weights = {k: v for k, v in classifier.state_dict().items() if not k.startswith(("head.", "norm."))}
    result = backbone.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert isinstance(D2DiNATs(**{**kwargs, "kernel_size": 3}), D2DiNATs)


def test_d2_backbone_is_the_classifier_trunk_from_one_spec():
    """A D2 backbone built from a classification variant's spec has the classifier's trunk (same names, same maps)."""
    import dataclasses

    from dinat_m2f.modeling.backbone import VARIANTS, DiNAT, HierarchicalSpec

    spec = VARIANTS["dinat_mini"].spec.replace(embed_dim=16, num_heads=(1, 2, 2, 4), drop_path_rate=0.0)
    assert spec.layer.mlp_ratio == 3.0 and spec.dilations[0] == (1, 8, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.embed_dim = 32
    with pytest.raises(TypeError, match=r"unknown HierarchicalSpec setting\(s\) \['kernal_size'\]"):
        spec.replace(kernal_size=3)
    assert (
        HierarchicalSpec.from_kwargs(**{"embed_dim": 16, "depths": [1] * 4, "num_heads": [1] * 4}).dilations
        == ((1,),) * 4
    )

    torch.manual_seed(0)
    classifier = DiNAT(spec, num_classes=10).eval()
    backbone = D2DiNAT(spec=spec).eval()
    trunk = {k: v for k, v in classifier.state_dict().items() if not k.startswith(("head.", "norm."))}
    result = backbone.load_state_dict(trunk, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = backbone(x)
        maps = classifier.stage_outputs(classifier.patch_embed(x))
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        expected = getattr(backbone, f"norm{i}")(maps[i]).permute(0, 3, 1, 2)
        torch.testing.assert_close(features[name], expected, rtol=0, atol=0)


def test_every_spec_setting_has_its_config_key():
    """The backbone reads each spec setting from MODEL.DINAT.<NAME>: a new setting needs its field and its default."""
    from dinat_m2f.modeling.backbone import HierarchicalSpec
    from dinat_m2f.modeling.backbone.d2_backbone import dinat_kwargs_from_cfg

    cfg = small_cfg(KERNEL_SIZE=5, MLP_RATIO=3.0, QK_SCALE=0.5, ATTN_DROP_RATE=0.1, USE_CHECKPOINT=True)
    kwargs = dinat_kwargs_from_cfg(cfg)
    assert set(kwargs) == set(HierarchicalSpec.flat_names()) | {
        "out_features",
        "frozen_stages",
        "trunc_normal_init",
        "na_backend",
    }
    spec = build_backbone(cfg).spec
    assert (spec.layer.kernel_size, spec.layer.mlp_ratio, spec.layer.qk_scale) == (5, 3.0, 0.5)
    assert (spec.layer.attn_drop_rate, spec.use_checkpoint, spec.embed_dim) == (0.1, True, 16)
