"""Mask2Former end to end on tiny models: build from the config, official parameter names, inference modes,
training on CPU (float32 and bf16 autocast), the DiNAT backbone and the size of the DiNAT-L COCO model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from detectron2.data.catalog import Metadata
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec, build_model
from detectron2.structures import Instances
from torch import nn

import dinat_m2f.modeling  # noqa: F401  (registers MaskFormer & co.)
from dinat_m2f.config import get_cfg
from dinat_m2f.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn

ROOT = Path(__file__).resolve().parents[1]


@BACKBONE_REGISTRY.register()
class _M2FTestConvBackbone(Backbone):
    """Test-only backbone: strided convs giving res2..res5 (strides 4..32)."""

    def __init__(self, cfg, input_shape):
        super().__init__()
        chans = [8, 16, 24, 32]
        self.stem = nn.Conv2d(3, chans[0], 4, 4)
        self.stages = nn.ModuleList(nn.Conv2d(chans[i - 1], chans[i], 3, 2, 1) for i in range(1, 4))
        self._shapes = {f"res{i + 2}": ShapeSpec(channels=c, stride=4 * 2**i) for i, c in enumerate(chans)}

    def forward(self, x):
        x = self.stem(x)
        out = {"res2": x}
        for i, stage in enumerate(self.stages):
            x = torch.relu(stage(x))
            out[f"res{i + 3}"] = x
        return out

    def output_shape(self):
        return self._shapes

    @property
    def size_divisibility(self):
        return 32


def tiny_cfg(backbone="_M2FTestConvBackbone", num_classes=3, enc_layers=2, dec_layers=4, queries=6):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.SEM_SEG_HEAD.NAME = "MaskFormerHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = enc_layers
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 32
    cfg.MODEL.MASK_FORMER.NHEADS = 4
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 64
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = dec_layers
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = queries
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 256
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.8
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.8
    cfg.DATASETS.TRAIN = ()
    return cfg


def gt_instances(h, w):
    inst = Instances((h, w))
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, : h // 2] = True
    masks[1, h // 2 :, : w // 2] = True
    inst.gt_masks = masks
    inst.gt_classes = torch.tensor([0, 2])
    return inst


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(3, 64, 64, generator=g) * 255, "instances": gt_instances(64, 64)},
        {"image": torch.rand(3, 48, 60, generator=g) * 255, "instances": gt_instances(48, 60)},
    ]


def official_head_keys(enc_layers: int, dec_layers: int) -> set[str]:
    """Parameter and buffer names of the official Mask2Former head (MSDeformAttnPixelDecoder + decoder)."""
    keys = {"criterion.empty_weight"}
    pd = "sem_seg_head.pixel_decoder."
    for i in range(3):
        keys |= {f"{pd}input_proj.{i}.{j}.{p}" for j in (0, 1) for p in ("weight", "bias")}
    keys.add(f"{pd}transformer.level_embed")
    for i in range(enc_layers):
        layer = f"{pd}transformer.encoder.layers.{i}."
        for m in ("self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                  "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"):  # fmt: skip
            keys |= {f"{layer}{m}.weight", f"{layer}{m}.bias"}
    keys |= {f"{pd}mask_features.weight", f"{pd}mask_features.bias"}
    keys |= {f"{pd}adapter_1.weight", f"{pd}adapter_1.norm.weight", f"{pd}adapter_1.norm.bias"}
    keys |= {f"{pd}layer_1.weight", f"{pd}layer_1.norm.weight", f"{pd}layer_1.norm.bias"}
    pr = "sem_seg_head.predictor."
    for i in range(dec_layers - 1):
        for name, attn in (("transformer_self_attention_layers", "self_attn"),
                           ("transformer_cross_attention_layers", "multihead_attn")):  # fmt: skip
            base = f"{pr}{name}.{i}."
            keys |= {f"{base}{attn}.in_proj_weight", f"{base}{attn}.in_proj_bias"}
            keys |= {f"{base}{attn}.out_proj.weight", f"{base}{attn}.out_proj.bias"}
            keys |= {f"{base}norm.weight", f"{base}norm.bias"}
        base = f"{pr}transformer_ffn_layers.{i}."
        keys |= {f"{base}{m}.{p}" for m in ("linear1", "linear2", "norm") for p in ("weight", "bias")}
    keys |= {f"{pr}decoder_norm.weight", f"{pr}decoder_norm.bias", f"{pr}query_feat.weight"}
    keys |= {f"{pr}query_embed.weight", f"{pr}level_embed.weight", f"{pr}class_embed.weight", f"{pr}class_embed.bias"}
    keys |= {f"{pr}mask_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    return keys


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def test_official_state_dict_names_load_strictly(tiny_model):
    sd = tiny_model.state_dict()
    head_keys = {k for k in sd if not k.startswith("backbone.")}
    assert head_keys == official_head_keys(enc_layers=2, dec_layers=4)
    # a state dict written under the official names (fresh values) loads strictly and lands in the model
    official = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    torch.manual_seed(1)
    other = build_model(tiny_cfg())
    other.load_state_dict(official, strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, official[k]), k


def test_legacy_static_query_name_is_renamed():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    sd = model.state_dict()
    key = "sem_seg_head.predictor.query_feat.weight"
    legacy = {(k.replace("query_feat", "static_query") if k == key else k): v for k, v in sd.items()}
    legacy[key.replace("query_feat", "static_query")] = torch.ones_like(sd[key])
    # metadata without versions, as in old checkpoints
    model.load_state_dict(legacy, strict=True)
    assert torch.equal(model.state_dict()[key], torch.ones_like(sd[key]))


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    batch = fixed_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(8):
        torch.manual_seed(1)  # same sampled points every step: the loss is a function of the weights only
        losses = model(batch)
        # 3 losses for the final prediction + 3 per auxiliary one (DEC_LAYERS - 1 = 3)
        assert len(losses) == 12 and all(torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert totals[-1] < 0.9 * totals[0], totals


def test_loss_weights_and_deep_supervision_switch():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = False
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(fixed_batch())
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    assert model.criterion.weight_dict == {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def test_inference_outputs_all_modes(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model([{"image": torch.rand(3, 60, 52) * 255, "height": 30, "width": 26}])[0]
    assert out["sem_seg"].shape == (3, 30, 26)
    panoptic, segments = out["panoptic_seg"]
    assert panoptic.shape == (30, 26) and panoptic.dtype == torch.int32
    inst = out["instances"]
    assert inst.image_size == (30, 26)
    assert len(inst) == 0  # no thing classes in the (empty) training metadata


def test_native_and_grid_sample_paths_agree(tiny_model):
    tiny_model.eval()
    image = [{"image": torch.rand(3, 64, 64) * 255}]
    attn_modules = [m for m in tiny_model.modules() if isinstance(m, MSDeformAttn)]
    assert len(attn_modules) == 2 and all(m.impl == "native" for m in attn_modules)
    with torch.no_grad():
        native = tiny_model(image)[0]["sem_seg"]
        for m in attn_modules:
            m.impl = "pytorch"
        try:
            reference = tiny_model(image)[0]["sem_seg"]
        finally:
            for m in attn_modules:
                m.impl = "native"
    torch.testing.assert_close(native, reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="impl must be one of"):
        attn_modules[0].impl = "cuda"


def test_bf16_autocast_on_cpu_end_to_end():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    seen = []
    decoder = model.sem_seg_head.pixel_decoder
    decoder.mask_features.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(fixed_batch())
        total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert seen == [torch.float32]  # the pixel decoder ran in float32 under autocast
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([{"image": torch.rand(3, 64, 64) * 255}])[0]
    assert torch.isfinite(out["sem_seg"].float()).all()


# ------------------------------------------------------------------------------------------------ inference


def crafted_model(thing_ids=(0,)):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(num_classes=3))
    model.metadata = Metadata(thing_dataset_id_to_contiguous_id={i + 1: i for i in thing_ids})
    return model


def test_panoptic_inference_on_crafted_logits():
    model = crafted_model()  # class 0 is a thing, classes 1 and 2 are stuff; thresholds 0.8 / 0.8
    big, k = 10.0, 3  # k: the no-object column
    logits = torch.zeros(6, 4)
    masks = torch.full((6, 8, 8), -big)
    logits[0, 0] = big  # Q0: thing, left half -> segment 1
    masks[0, :, :4] = big
    logits[1, 1] = big  # Q1: stuff class 1, rows 1-3 of the right half -> segment 2
    masks[1, 1:4, 4:] = big
    logits[2, 1] = big  # Q2: stuff class 1 again, rows 4-7 of the right half -> merged into segment 2
    masks[2, 4:, 4:] = big
    logits[3, k] = big  # Q3: no-object -> dropped
    masks[3] = big
    logits[4, 2] = 1.0  # Q4: class 2 with score 0.47 < 0.8 -> dropped
    masks[4] = big
    logits[5, 0] = torch.log(torch.tensor(17.0))  # Q5: thing with score 0.85 on row 0, columns 2-7:
    masks[5, 0, 2:] = big  # it keeps only columns 4-7 (Q0 outscores it), 4/6 < 0.8 -> dropped
    panoptic, segments = model.panoptic_inference(logits, masks)
    expected = torch.zeros(8, 8, dtype=torch.int32)
    expected[:, :4] = 1
    expected[1:, 4:] = 2
    assert torch.equal(panoptic, expected)
    confident = pytest.approx(math.exp(big) / (math.exp(big) + 3))  # softmax of (big, 0, 0, 0)
    assert segments == [
        {"id": 1, "isthing": True, "category_id": 0, "score": confident},
        {"id": 2, "isthing": False, "category_id": 1, "score": confident},  # Q1's score (Q2 merged into it)
    ]
    # lower the overlap threshold: Q5 becomes a segment of its own (id 3) on the unclaimed row-0 pixels
    model.overlap_threshold = 0.5
    panoptic, segments = model.panoptic_inference(logits, masks)
    expected[0, 4:] = 3
    assert torch.equal(panoptic, expected)
    assert segments[-1] == {"id": 3, "isthing": True, "category_id": 0, "score": pytest.approx(0.85)}


def test_panoptic_inference_with_nothing_kept():
    model = crafted_model()
    logits = torch.zeros(3, 4)
    logits[:, 3] = 5.0  # all no-object
    panoptic, segments = model.panoptic_inference(logits, torch.randn(3, 5, 7))
    assert segments == [] and panoptic.shape == (5, 7) and not panoptic.any()


def test_semantic_inference_is_softmax_times_sigmoid():
    model = crafted_model()
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(6, 4, generator=g), torch.randn(6, 5, 5, generator=g)
    expected = torch.zeros(3, 5, 5)
    prob = logits.softmax(-1)
    for q in range(6):
        for c in range(3):
            expected[c] += prob[q, c] * masks[q].sigmoid()
    torch.testing.assert_close(model.semantic_inference(logits, masks), expected)


def test_instance_inference_topk_scores_and_boxes_from_masks():
    model = crafted_model(thing_ids=(0, 1))  # panoptic_on: only things (0, 1) survive
    model.test_topk_per_image = 4
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 3.0, 2.5, 0.0]])
    masks = torch.full((2, 10, 12), -6.0)
    masks[0, 2:5, 1:6] = 6.0  # rows 2-4, cols 1-5 -> box (1, 2, 6, 5)
    masks[1, 7:, 9:] = 2.0  # rows 7-9, cols 9-11 -> box (9, 7, 12, 10)
    inst = model.instance_inference(logits, masks)
    prob = logits.softmax(-1)
    # top-4 of the 2 x 3 (query, class) scores, minus the stuff class 2
    pairs = sorted(zip(inst.pred_classes.tolist(), inst.scores.tolist()), key=lambda p: -p[1])
    assert len(inst) == 3 and set(inst.pred_classes.tolist()) <= {0, 1}
    by_query = {0: (masks[0], (1, 2, 6, 5)), 1: (masks[1], (9, 7, 12, 10))}
    expected = []
    for q, c in [(0, 0), (1, 1), (1, 0)]:
        m, _ = by_query[q]
        inside = m > 0
        expected.append((c, (prob[q, c] * m.sigmoid()[inside].sum() / (inside.sum() + 1e-6)).item()))
    assert [c for c, _ in pairs] == [c for c, _ in sorted(expected, key=lambda p: -p[1])]
    assert [s for _, s in pairs] == pytest.approx(sorted((s for _, s in expected), reverse=True), rel=1e-5)
    query_of_score = {round(s, 5): q for (q, _), (_, s) in zip([(0, 0), (1, 1), (1, 0)], expected)}
    for box, score in zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist()):
        assert tuple(box) == by_query[query_of_score[round(score, 5)]][1]
    assert inst.pred_masks.shape == (3, 10, 12)


# ------------------------------------------------------------------------------------------------ config, DiNAT


def test_config_has_every_mask2former_key_with_its_default():
    cfg = get_cfg()
    mf = cfg.MODEL.MASK_FORMER
    assert (mf.CLASS_WEIGHT, mf.DICE_WEIGHT, mf.MASK_WEIGHT, mf.NO_OBJECT_WEIGHT) == (1.0, 1.0, 20.0, 0.1)
    assert (mf.TRAIN_NUM_POINTS, mf.OVERSAMPLE_RATIO, mf.IMPORTANCE_SAMPLE_RATIO) == (12544, 3.0, 0.75)
    assert (mf.DEC_LAYERS, mf.NHEADS, mf.DROPOUT, mf.DIM_FEEDFORWARD, mf.HIDDEN_DIM) == (6, 8, 0.1, 2048, 256)
    assert mf.TRANSFORMER_DECODER_NAME == "MultiScaleMaskedTransformerDecoder"
    assert (mf.TEST.OBJECT_MASK_THRESHOLD, mf.TEST.OVERLAP_THRESHOLD, mf.SIZE_DIVISIBILITY) == (0.0, 0.0, 32)
    assert cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES == ["res3", "res4", "res5"]
    assert (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE) == (1024, 0.1, 2.0)
    assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BACKBONE_MULTIPLIER, cfg.SOLVER.WEIGHT_DECAY_EMBED) == ("ADAMW", 0.1, 0.0)
    assert cfg.INPUT.DATASET_MAPPER_NAME == "mask_former_semantic" and cfg.INPUT.SIZE_DIVISIBILITY == -1
    assert cfg.MODEL.SWIN.DEPTHS == [2, 2, 6, 2]


def test_wrong_transformer_in_feature_is_rejected():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    with pytest.raises(ValueError, match="multi_scale_pixel_decoder"):
        build_model(cfg)


def test_in_feature_the_backbone_lacks_is_named():
    cfg = tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res6"]
    with pytest.raises(ValueError, match=r"IN_FEATURES names \['res6'\], which the backbone does not output"):
        build_model(cfg)


def test_tiny_dinat_mask2former_trains_and_infers():
    cfg = tiny_cfg(backbone="D2DiNAT", enc_layers=1, dec_layers=2)
    cfg.MODEL.DINAT.EMBED_DIM = 16
    cfg.MODEL.DINAT.DEPTHS = [1, 1, 1, 1]
    cfg.MODEL.DINAT.NUM_HEADS = [1, 2, 2, 4]
    cfg.MODEL.DINAT.KERNEL_SIZE = 3
    cfg.MODEL.DINAT.DILATIONS = [[1], [2], [1], [1]]
    cfg.MODEL.DINAT.DROP_PATH_RATE = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert type(model.backbone).__name__ == "D2DiNAT"
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(3, 96, 96, generator=g) * 255, "instances": gt_instances(96, 96)}]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(4):
        torch.manual_seed(1)
        total = sum(model(batch).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert totals[-1] < totals[0], totals
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 96, 96) * 255}])[0]
    assert out["sem_seg"].shape == (3, 96, 96)


def test_dinat_large_coco_panoptic_has_220m_parameters():
    cfg = get_cfg()
    cfg.merge_from_file(
        str(ROOT / "configs/coco/panoptic-segmentation/dinat/maskformer2_dinat_large_IN21k_bs16_100ep.yaml")
    )
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(cfg)
    assert model.sem_seg_head.predictor.num_queries == 200 and model.sem_seg_head.num_classes == 133
    assert len(model.sem_seg_head.pixel_decoder.transformer.encoder.layers) == 6
    assert len(model.sem_seg_head.predictor.transformer_ffn_layers) == 9
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 220e6) <= 0.02 * 220e6, params
    assert official_head_keys(6, 10) == {k for k in model.state_dict() if not k.startswith("backbone.")}


@pytest.mark.parametrize(
    "config_file",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("Base-")),
)
def test_every_config_builds_a_mask2former(config_file):
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / config_file))
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    assert type(model).__name__ == "MaskFormer"
    assert model.sem_seg_head.num_classes == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert model.sem_seg_head.predictor.num_queries == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
