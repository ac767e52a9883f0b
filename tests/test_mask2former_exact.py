"""The leaner Mask2Former head and post-processing give bit-identical results to the straightforward (official)
formulations: the attention mask fixed up before the repeat over heads, ReLU in place, the sigmoid of semantic
inference in place, no resize when the size does not change, and at inference the intermediate predictions made
only as attention masks (mask logits at the resize's taps, pixels-major)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess as d2_sem_seg_postprocess
from test_mask2former import tiny_cfg

from dinat_m2f.modeling.meta_arch.maskformer import sem_seg_postprocess
from dinat_m2f.modeling.pixel_decoder.msdeformattn import MSDeformAttnTransformerEncoderLayer
from dinat_m2f.modeling.transformer_decoder.mask2former_transformer_decoder import (
    MLP,
    FFNLayer,
    features_at_resize_taps,
    resize_taps,
)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(-1), b.contiguous().view(-1))


def official_decoder_forward(dec, x: list[torch.Tensor], mask_features: torch.Tensor) -> dict:
    """Mask2Former's MultiScaleMaskedTransformerDecoder.forward as published: the sigmoid mask repeated over heads
    before the all-blocked fix-up, out-of-place ReLU (same modules, same weights)."""

    def ffn(layer, t):
        return layer.norm(t + layer.linear2(F.relu(layer.linear1(t))))

    def mask_embed(t):
        for i, lin in enumerate(dec.mask_embed.layers):
            t = lin(t)
            t = F.relu(t) if i < len(dec.mask_embed.layers) - 1 else t
        return t

    def heads(output, size):
        out = dec.decoder_norm(output).transpose(0, 1)
        masks = torch.einsum("bqc,bchw->bqhw", mask_embed(out), mask_features)
        attn = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        attn = attn.sigmoid().flatten(2).unsqueeze(1).repeat(1, dec.num_heads, 1, 1).flatten(0, 1) < 0.5
        return dec.class_embed(out), masks, attn.detach()

    src, pos, sizes = [], [], []
    for i in range(dec.num_feature_levels):
        sizes.append(x[i].shape[-2:])
        pos.append(dec.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
        src.append((dec.input_proj[i](x[i]).flatten(2) + dec.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
    bs = src[0].shape[1]
    query_embed = dec.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
    output = dec.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
    classes, masks = [], []
    c, m, attn = heads(output, sizes[0])
    classes.append(c)
    masks.append(m)
    for i in range(dec.num_layers):
        level = i % dec.num_feature_levels
        attn[torch.where(attn.sum(-1) == attn.shape[-1])] = False
        output = dec.transformer_cross_attention_layers[i](
            output, src[level], memory_mask=attn, pos=pos[level], query_pos=query_embed
        )
        output = dec.transformer_self_attention_layers[i](output, query_pos=query_embed)
        output = ffn(dec.transformer_ffn_layers[i], output)
        c, m, attn = heads(output, sizes[(i + 1) % dec.num_feature_levels])
        classes.append(c)
        masks.append(m)
    return {"classes": classes, "masks": masks}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_cfg(dec_layers=5, queries=7)).eval()


def decoder_inputs(model, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dim = model.sem_seg_head.predictor.query_feat.weight.shape[1]
    x = [torch.randn(batch, dim, s, s + 1, generator=g) for s in (3, 5, 9)]
    return x, torch.randn(batch, dim, 18, 20, generator=g)


@pytest.mark.parametrize("batch", [1, 2])
def test_decoder_matches_the_official_formulation_bitwise(tiny_model, batch):
    dec = tiny_model.sem_seg_head.predictor
    x, mask_features = decoder_inputs(tiny_model, batch)
    # one query blocked everywhere after the first prediction: its row takes the fix-up branch
    with torch.no_grad():
        dec.mask_embed.layers[-1].bias[3] = -1e4
    try:
        with torch.no_grad():
            ours = dec(x, mask_features)
            ref = official_decoder_forward(dec, x, mask_features)
    finally:
        with torch.no_grad():
            dec.mask_embed.layers[-1].bias[3] = 0.0
    got_classes = [a["pred_logits"] for a in ours["aux_outputs"]] + [ours["pred_logits"]]
    got_masks = [a["pred_masks"] for a in ours["aux_outputs"]] + [ours["pred_masks"]]
    assert len(got_masks) == len(ref["masks"]) == dec.num_layers + 1
    for got, want in zip(got_classes + got_masks, ref["classes"] + ref["masks"]):
        assert bitwise_equal(got, want)


def test_heads_attn_mask_is_the_repeat_then_fix_up(tiny_model):
    dec = tiny_model.sem_seg_head.predictor
    attn = torch.rand(2, 7, 30, generator=torch.Generator().manual_seed(1)) < 0.5
    attn[0, 2] = True  # blocked everywhere: the fix-up lets it attend everywhere
    attn[1, 5] = True
    official = attn.unsqueeze(1).repeat(1, dec.num_heads, 1, 1).flatten(0, 1)
    official[torch.where(official.sum(-1) == official.shape[-1])] = False
    assert torch.equal(dec.heads_attn_mask(attn), official)


def reference_ffn(layer, x):
    return layer.norm(x + layer.linear2(F.relu(layer.linear1(x))))


def reference_mlp(mlp, x):
    for i, lin in enumerate(mlp.layers):
        x = lin(x)
        x = F.relu(x) if i < len(mlp.layers) - 1 else x
    return x


@pytest.mark.parametrize("which", ["ffn", "mlp"])
def test_in_place_relu_layers_match_forward_and_gradients(which):
    torch.manual_seed(0)
    module, reference = (FFNLayer(16, 40), reference_ffn) if which == "ffn" else (MLP(16, 24, 8, 3), reference_mlp)
    x = torch.randn(5, 2, 16, requires_grad=True)
    out = module(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    ref_out = reference(module, x)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), [x, *module.parameters()])
    assert bitwise_equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert bitwise_equal(g, r)


def test_encoder_layer_in_place_relu_matches_forward_and_gradients():
    torch.manual_seed(0)
    layer = MSDeformAttnTransformerEncoderLayer(d_model=16, d_ffn=40, dropout=0.0, n_levels=2, n_heads=2, n_points=2)
    layer.self_attn.impl = "pytorch"
    shapes = torch.tensor([[3, 4], [2, 2]])
    starts = torch.tensor([0, 12])
    src = torch.randn(1, 16, 16, requires_grad=True)
    pos = torch.randn(1, 16, 16)
    ref_points = torch.rand(1, 16, 2, 2)

    def reference(src):
        attn = layer.self_attn(src + pos, ref_points, src, shapes, starts)
        src = layer.norm1(src + attn)
        return layer.norm2(src + layer.linear2(F.relu(layer.linear1(src))))

    out = layer(src, pos, ref_points, shapes, starts)
    grads = torch.autograd.grad(out.square().sum(), [src, *layer.parameters()])
    ref_out = reference(src)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), [src, *layer.parameters()])
    assert bitwise_equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert bitwise_equal(g, r)


@pytest.mark.parametrize(
    "result_hw, img_size, out_hw",
    [((32, 32), (32, 32), (32, 32)), ((32, 40), (30, 37), (30, 37)), ((32, 40), (30, 37), (45, 50))],
)
def test_sem_seg_postprocess_matches_detectron2_bitwise(result_hw, img_size, out_hw):
    g = torch.Generator().manual_seed(0)
    result = torch.randn(5, *result_hw, generator=g)
    result[0, 0, :3] = -0.0
    ours = sem_seg_postprocess(result, img_size, *out_hw)
    want = d2_sem_seg_postprocess(result, img_size, *out_hw)
    assert bitwise_equal(ours, want) and ours.is_contiguous()


def test_sem_seg_postprocess_skips_the_resize_at_the_same_size(monkeypatch):
    calls = []
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(a) or pytest.fail("resized"))
    result = torch.randn(3, 16, 24)
    ours = sem_seg_postprocess(result, (16, 24), 16, 24)
    assert ours.data_ptr() == result.data_ptr() and bitwise_equal(ours, result)  # no copy either
    assert not calls


def straightforward_semantic(model, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The official semantic path: upsample the mask logits, sigmoid (out of place), einsum, crop and resize."""
    images = [(image - model.pixel_mean) / model.pixel_std]
    from detectron2.structures import ImageList

    images = ImageList.from_tensors(images, model.size_divisibility)
    outputs = model.sem_seg_head(model.backbone(images.tensor))
    masks = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
    scores = torch.einsum("qc,qhw->chw", F.softmax(outputs["pred_logits"][0], -1)[:, :-1], masks[0].sigmoid())
    return d2_sem_seg_postprocess(scores, images.image_sizes[0], height, width)


@pytest.mark.parametrize("size, out", [((64, 64), (64, 64)), ((60, 52), (60, 52)), ((60, 52), (30, 26))])
def test_semantic_only_inference_matches_the_straightforward_path_bitwise(size, out):
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(2)) * 255
    with torch.inference_mode():
        got = model([{"image": image, "height": out[0], "width": out[1]}])[0]["sem_seg"]
        want = straightforward_semantic(model, image, *out)
    assert bitwise_equal(got, want)
    with torch.no_grad():  # autograd on (eval without no_grad): the out-of-place branch, same values
        assert bitwise_equal(model([{"image": image, "height": out[0], "width": out[1]}])[0]["sem_seg"], want)


def recorded_attn_masks(dec, x, mask_features, aux_outputs: bool) -> tuple[dict, list[torch.Tensor]]:
    """The decoder's outputs and the attention masks its layers got."""
    masks = []
    heads_attn_mask = dec.heads_attn_mask
    dec.heads_attn_mask = lambda m: masks.append(m) or heads_attn_mask(m)
    try:
        with torch.no_grad():
            out = dec(x, mask_features, aux_outputs=aux_outputs)
    finally:
        del dec.heads_attn_mask
    return out, masks


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("factors", ["integer", "other"])
def test_decoder_without_aux_outputs_makes_the_same_masks_and_outputs_bitwise(tiny_model, batch, factors):
    """Inference skips the intermediate class logits and full-size mask logits: the attention masks (made from the
    mask logits at the resize's taps, pixels-major) and the last layer's outputs stay bit-identical. "integer":
    the mask features are 8, 4 and 2 times the levels' sizes (the taps are gathered), "other": they are not."""
    dec = tiny_model.sem_seg_head.predictor
    x, mask_features = decoder_inputs(tiny_model, batch)
    if factors == "integer":
        g = torch.Generator().manual_seed(3)
        x = [torch.randn(batch, t.shape[1], h, w, generator=g) for t, (h, w) in zip(x, [(4, 5), (8, 10), (16, 20)])]
        mask_features = torch.randn(batch, mask_features.shape[1], 32, 40, generator=g)
    with torch.no_grad():
        dec.mask_embed.layers[-1].bias[3] = -1e4  # one query blocked everywhere: the fix-up branch
    try:
        full, full_masks = recorded_attn_masks(dec, x, mask_features, aux_outputs=True)
        lean, lean_masks = recorded_attn_masks(dec, x, mask_features, aux_outputs=False)
    finally:
        with torch.no_grad():
            dec.mask_embed.layers[-1].bias[3] = 0.0
    assert "aux_outputs" not in lean and len(full["aux_outputs"]) == dec.num_layers
    assert len(lean_masks) == len(full_masks) == dec.num_layers
    for got, want in zip(lean_masks, full_masks):
        assert bitwise_equal(got, want)
    assert bitwise_equal(lean["pred_logits"], full["pred_logits"])
    assert bitwise_equal(lean["pred_masks"], full["pred_masks"])


@pytest.mark.parametrize("in_hw, out_hw", [((128, 128), (16, 16)), ((64, 80), (16, 10)), ((48, 40), (12, 7))])
def test_resize_at_the_taps_equals_the_resize_of_all_pixels_bitwise(in_hw, out_hw):
    maps = torch.randn(2, 5, *in_hw, generator=torch.Generator().manual_seed(0)) * 4
    taps = features_at_resize_taps(maps, out_hw)
    gathered = [maps.shape[d] != taps.shape[d] for d in (2, 3)]
    assert gathered == [in_hw[i] % out_hw[i] == 0 and (in_hw[i] // out_hw[i]) % 2 == 0 for i in range(2)]
    want = F.interpolate(maps, size=out_hw, mode="bilinear", align_corners=False)
    got = F.interpolate(taps, size=out_hw, mode="bilinear", align_corners=False)
    assert bitwise_equal(got, want)
    # and pixels-major (channels_last) input, which the decoder's inference path feeds the resize
    got_cl = F.interpolate(taps.contiguous(memory_format=torch.channels_last), size=out_hw, mode="bilinear")
    assert bitwise_equal(got_cl, want)


def test_resize_taps_are_the_two_rows_around_each_sample():
    assert resize_taps(32, 4).tolist() == [3, 4, 11, 12, 19, 20, 27, 28]  # factor 8: rows 8i + 3.5 -/+ 0.5
    assert resize_taps(16, 4).tolist() == [1, 2, 5, 6, 9, 10, 13, 14]  # factor 4
    assert resize_taps(8, 4) is None  # factor 2 reads every row
    assert resize_taps(12, 4) is None  # factor 3: one row per output, weight 1
    assert resize_taps(18, 4) is None  # not a whole factor


def test_inference_makes_one_full_prediction(tiny_model, monkeypatch):
    dec = tiny_model.sem_seg_head.predictor
    calls = []
    heads = dec.forward_prediction_heads
    monkeypatch.setattr(dec, "forward_prediction_heads", lambda *a: calls.append(a[2]) or heads(*a))
    with torch.inference_mode():
        tiny_model([{"image": torch.rand(3, 64, 64) * 255}])
    assert calls == [None]  # the last layer's, without an attention mask
