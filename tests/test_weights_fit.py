"""A weight file that does not fit the model is an error, not a randomly initialised model (issue 15.2, 15.9).

Missing or mis-shaped tensors are refused unless expected: the parts a backbone-only file cannot hold (pixel decoder,
transformer decoder, the backbone's output norms) or what MODEL.WEIGHTS_REINIT declares. A k=3 backbone file into a
k=5 model points to the converter.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys

import pytest
import torch
import train_helpers
from torch import nn

from dinat_m2f.config import load_config
from dinat_m2f.engine import AtomicCheckpointer
from dinat_m2f.engine.weights_fit import WeightsMismatchError, check_weights_fit, match_weights
from dinat_m2f.modeling.backbone import D2DiNAT, DiNAT

sys.path.insert(0, os.path.join(train_helpers.REPO, "tools"))
import convert_dinat_checkpoint  # noqa: E402

ARCH = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], mlp_ratio=2.0)
DILATIONS = [[1], [1], [1], [1]]


class Head(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.class_embed = nn.Linear(8, num_classes + 1)
        self.mask_embed = nn.Linear(8, 8)


class Net(nn.Module):
    """Named like MaskFormer: ``backbone.*``, ``sem_seg_head.predictor.*``."""

    def __init__(self, num_classes: int = 4, kernel_size: int = 5) -> None:
        super().__init__()
        self.backbone = D2DiNAT(**ARCH, kernel_size=kernel_size, dilations=DILATIONS)
        self.sem_seg_head = nn.Module()
        self.sem_seg_head.pixel_decoder = nn.Linear(16, 8)
        self.sem_seg_head.predictor = Head(num_classes)


def _save_full(tmp_path, model: nn.Module, rename=None, drop=()) -> str:
    state = {(rename(k) if rename else k): v for k, v in model.state_dict().items() if k not in drop}
    path = tmp_path / "full.pth"
    torch.save({"model": state, "iteration": 7}, path)
    return str(path)


def _load(model: nn.Module, path: str, reinit=()) -> dict:
    return AtomicCheckpointer(model, weights_reinit=reinit).load(path)


def _assert_same(a: nn.Module, b: nn.Module, prefix: str = "") -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        if k.startswith(prefix):
            assert torch.equal(v, sb[k]), k


def test_full_model_file_loads_every_tensor(tmp_path):
    torch.manual_seed(0)
    src = Net()
    dst = Net()
    assert _load(dst, _save_full(tmp_path, src))["iteration"] == 7
    _assert_same(src, dst)


def test_renamed_keys_are_an_error_naming_the_count(tmp_path):
    src, dst = Net(), Net()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    path = _save_full(tmp_path, src, rename=lambda k: "net." + k)
    with pytest.raises(WeightsMismatchError, match=rf"{path}: none of its {len(before)} tensors has a counterpart"):
        _load(dst, path)
    for k, v in dst.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_one_misshaped_tensor_is_an_error_naming_it(tmp_path):
    src = Net()
    state = src.state_dict()
    state["sem_seg_head.predictor.mask_embed.weight"] = torch.zeros(8, 9)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(WeightsMismatchError) as err:
        _load(Net(), str(path))
    message = str(err.value)
    assert "full-model file" in message
    assert "1 mis-shaped: sem_seg_head.predictor.mask_embed.weight (file (8, 9), model (8, 8))" in message
    assert "MODEL.WEIGHTS_REINIT" in message


def test_half_the_keys_missing_is_an_error(tmp_path):
    src = Net()
    keys = list(src.state_dict())
    dropped = keys[1::2]
    with pytest.raises(WeightsMismatchError, match=rf"{len(dropped)} missing: {dropped[0]}, "):
        _load(Net(), _save_full(tmp_path, src, drop=dropped))


def test_declared_class_count_change_loads_the_rest(tmp_path, caplog):
    torch.manual_seed(0)
    src = Net(num_classes=7)
    path = _save_full(tmp_path, src)
    with pytest.raises(WeightsMismatchError, match=r"2 mis-shaped: sem_seg_head.predictor.class_embed.weight"):
        _load(Net(num_classes=3), path)
    dst = Net(num_classes=3)
    fresh = dst.sem_seg_head.predictor.class_embed.weight.clone()
    with caplog.at_level(logging.INFO):
        _load(dst, path, reinit=["sem_seg_head.predictor.class_embed.*"])
    assert "re-initialised as declared by MODEL.WEIGHTS_REINIT (2)" in caplog.text
    assert torch.equal(dst.sem_seg_head.predictor.class_embed.weight, fresh)
    _assert_same(src, dst, prefix="backbone.")
    _assert_same(src.sem_seg_head.predictor.mask_embed, dst.sem_seg_head.predictor.mask_embed)


def _classifier_pth(tmp_path, kernel_size: int) -> str:
    torch.manual_seed(1)
    classifier = DiNAT(**ARCH, kernel_size=kernel_size, dilations=DILATIONS, num_classes=10)
    path = tmp_path / f"classifier_k{kernel_size}.pth"
    torch.save({"model": classifier.state_dict()}, path)
    return str(path)


def _convert(tmp_path, source: str, kernel_size: int) -> str:
    out = tmp_path / f"converted_k{kernel_size}.pth"
    assert convert_dinat_checkpoint.main([source, str(out), "--kernel-size", str(kernel_size)]) == 0
    return str(out)


def test_converted_backbone_file_fills_the_backbone_and_leaves_the_heads(tmp_path, caplog):
    """A backbone-only file may leave the decoders and backbone.norm0..3 at their init, nothing else."""
    converted = _convert(tmp_path, _classifier_pth(tmp_path, 5), 5)
    dst = Net()
    with caplog.at_level(logging.INFO):
        _load(dst, converted)
    assert "is a backbone-only file: 14 tensors outside it start from their init" in caplog.text
    weights = torch.load(converted, weights_only=True)["model"]
    for k, v in weights.items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k
    # a backbone tensor missing from the file is still an error
    del weights["levels.1.blocks.0.mlp.fc1.weight"]
    torch.save({"model": weights, "__author__": "t", "matching_heuristics": True}, tmp_path / "holed.pth")
    with pytest.raises(WeightsMismatchError, match=r"backbone-only file.*1 missing: backbone.levels.1.blocks.0.mlp"):
        _load(Net(), str(tmp_path / "holed.pth"))


def test_kernel_mismatch_points_to_the_converter_unless_declared(tmp_path, caplog):
    """The official configs' k=7 file in a k=11 model, in small: a k=3 file into a k=5 model."""
    k3 = _convert(tmp_path, _classifier_pth(tmp_path, 3), 3)
    with pytest.raises(WeightsMismatchError) as err:
        _load(Net(kernel_size=5), k3)
    message = str(err.value)
    assert "4 mis-shaped: backbone.levels.0.blocks.0.attn.rpb (file (1, 5, 5), model (1, 9, 9))" in message
    assert "tools/convert_dinat_checkpoint.py" in message
    dst = Net(kernel_size=5)
    with caplog.at_level(logging.INFO):
        _load(dst, k3, reinit=["backbone.*.rpb"])
    assert "re-initialised as declared by MODEL.WEIGHTS_REINIT (4)" in caplog.text
    qkv = torch.load(k3, weights_only=True)["model"]["levels.2.blocks.0.attn.qkv.weight"]
    assert torch.equal(dst.backbone.levels[2].blocks[0].attn.qkv.weight, qkv)


def test_unconverted_classification_checkpoint_says_to_convert(tmp_path):
    with pytest.raises(WeightsMismatchError, match=r"none of its .*convert_dinat_checkpoint.py"):
        _load(Net(), _classifier_pth(tmp_path, 5))


def test_match_weights_pairs_by_longest_dotted_suffix():
    model = {"backbone.a.w": (2,), "backbone.b.a.w": (3,), "head.x": (1,)}
    fit = match_weights(model, {"a.w": (2,), "b.a.w": (4,), "head.cls": (5,)}, heuristics=True)
    assert fit.matched == {"backbone.a.w": "a.w", "backbone.b.a.w": "b.a.w"}
    assert fit.misshaped == [("backbone.b.a.w", (4,), (3,))]
    assert fit.missing == ["head.x"] and fit.unexpected == ["head.cls"]
    assert match_weights(model, {"a.w": (2,)}, heuristics=False).matched == {}
    with pytest.raises(WeightsMismatchError, match=r"backbone-only file.*1 mis-shaped: backbone.b.a.w"):
        check_weights_fit(fit, "f.pth")


def test_eval_only_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    """train_net.py --eval-only used to report metrics of a random model after loading 0 tensors."""
    from detectron2.modeling import build_model

    import train_net

    cfg = load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS)
    state = build_model(cfg).state_dict()
    path = tmp_path / "renamed.pth"
    torch.save({"model": {"module_" + k: v for k, v in state.items()}}, path)
    argv = ["--eval-only", "--config-file", train_helpers.DEMO_CONFIG, *train_helpers.TINY_OPTS]
    argv += ["MODEL.WEIGHTS", str(path), "OUTPUT_DIR", str(tmp_path / "out")]
    with pytest.raises(WeightsMismatchError, match=f"none of its {len(state)} tensors"):
        train_net.main(train_net.argument_parser().parse_args(argv))


def test_converted_backbone_starts_the_real_model(tmp_path, caplog):
    """MaskFormer built from the tiny config takes a converted ImageNet DiNAT: backbone filled, decoders fresh."""
    from detectron2.modeling import build_model

    cfg = load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS)
    c = cfg.MODEL.DINAT
    torch.manual_seed(2)
    classifier = DiNAT(embed_dim=c.EMBED_DIM, depths=c.DEPTHS, num_heads=c.NUM_HEADS, kernel_size=c.KERNEL_SIZE, dilations=c.DILATIONS,
                       mlp_ratio=c.MLP_RATIO, num_classes=10)  # fmt: skip
    source, config = tmp_path / "in1k.pth", tmp_path / "tiny.yaml"
    torch.save({"model": classifier.state_dict()}, source)
    config.write_text(cfg.dump())
    out = tmp_path / "in1k_d2.pth"
    assert convert_dinat_checkpoint.main([str(source), str(out), "--config-file", str(config)]) == 0

    model = build_model(cfg)
    with caplog.at_level(logging.INFO):
        AtomicCheckpointer(model).load(str(out))
    assert "is a backbone-only file" in caplog.text
    for k, v in classifier.state_dict().items():
        if not k.startswith(("head.", "norm.")):
            assert torch.equal(model.backbone.state_dict()[k], v), k


def test_legacy_key_names_renamed_by_the_model_still_fit(tmp_path):
    """Judged on what was loaded: the decoder's load hook renames an old checkpoint's ``static_query``."""
    from detectron2.modeling import build_model

    cfg = load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS)
    torch.manual_seed(3)
    src = build_model(cfg)
    legacy = {k.replace("query_feat", "static_query"): v for k, v in src.state_dict().items()}  # no version metadata
    assert "sem_seg_head.predictor.static_query.weight" in legacy
    torch.save({"model": legacy}, tmp_path / "legacy.pth")
    dst = build_model(cfg)
    AtomicCheckpointer(dst).load(str(tmp_path / "legacy.pth"))
    _assert_same(src, dst)


def test_official_script_pkl_with_the_classifier_head_starts_the_real_model(tmp_path):
    """The official convert-pretrained-dinat-model-to-d2.py keeps head.* and norm.*; the classifier's norm.weight is a
    suffix of the decoders' *.norm.weight (another width, skipped by detectron2): still a backbone-only file."""
    from detectron2.modeling import build_model

    cfg = load_config(train_helpers.DEMO_CONFIG, train_helpers.TINY_OPTS)
    c = cfg.MODEL.DINAT
    classifier = DiNAT(embed_dim=c.EMBED_DIM, depths=c.DEPTHS, num_heads=c.NUM_HEADS, kernel_size=c.KERNEL_SIZE, dilations=c.DILATIONS,
                       mlp_ratio=c.MLP_RATIO, num_classes=10)  # fmt: skip
    path = tmp_path / "dinat_official_script.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": classifier.state_dict(), "__author__": "third_party", "matching_heuristics": True}, f)
    model = build_model(cfg)
    assert any(k.endswith(".norm.weight") and not k.startswith("backbone.") for k in model.state_dict())
    AtomicCheckpointer(model).load(str(path))
    assert torch.equal(model.backbone.levels[3].blocks[0].mlp.fc2.weight, classifier.levels[3].blocks[0].mlp.fc2.weight)
