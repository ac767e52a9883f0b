"""The leaner Mask2Former head and post-processing give bit-identical results to the straightforward (official)
formulations: the attention mask fixed up before the repeat over heads, ReLU in place, the sigmoid of semantic
inference in place, no resize when the size does not change, and at inference the intermediate predictions made
only as attention masks (mask logits at the resize's taps, pixels-major)."""

from __future__ import annotations

import math

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
    CrossAttentionLayer,
    FFNLayer,
    SelfAttentionLayer,
    features_at_resize_taps,
    resize_taps,
    training_mask_logits,
)
from dinat_m2f.modeling.transformer_decoder.position_encoding import PositionEmbeddingSine


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


def test_heads_attn_mask_of_one_image_is_its_fixed_up_rows(tiny_model):
    """nn.MultiheadAttention broadcasts a [Q, S] mask over the heads: one image's mask is not repeated."""
    dec = tiny_model.sem_seg_head.predictor
    attn = torch.rand(1, 7, 30, generator=torch.Generator().manual_seed(1)) < 0.5
    attn[0, 2] = True
    official = attn.repeat(dec.num_heads, 1, 1)
    official[torch.where(official.sum(-1) == official.shape[-1])] = False
    got = dec.heads_attn_mask(attn)
    assert got.shape == (7, 30) and torch.equal(got.expand(dec.num_heads, -1, -1), official)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layer_type", [CrossAttentionLayer, SelfAttentionLayer])
def test_attention_layers_equal_nn_multihead_attention_with_averaged_weights(batch, layer_type):
    """The layers ask nn.MultiheadAttention for per-head weights (no mean over heads, which nothing reads): the
    attention output is the default call's, bit for bit, with a [Q, S] or a [B*heads, Q, S] mask."""
    torch.manual_seed(0)
    layer = layer_type(16, 4)
    g = torch.Generator().manual_seed(1)
    tgt, query_pos = torch.randn(7, batch, 16, generator=g), torch.randn(7, batch, 16, generator=g)
    if layer_type is CrossAttentionLayer:
        memory, pos = torch.randn(11, batch, 16, generator=g), torch.randn(11, batch, 16, generator=g)
        mask = torch.rand(7, 11, generator=g) < 0.3
        mask = mask if batch == 1 else mask.repeat(batch * 4, 1, 1)
        out = layer(tgt, memory, memory_mask=mask, pos=pos, query_pos=query_pos)
        want = layer.multihead_attn(tgt + query_pos, memory + pos, memory, attn_mask=mask)[0]
    else:
        out = layer(tgt, query_pos=query_pos)
        want = layer.self_attn(tgt + query_pos, tgt + query_pos, tgt)[0]
    assert bitwise_equal(out, layer.norm(tgt + want))


def detr_position_encoding(x: torch.Tensor, num_pos_feats: int, normalize: bool) -> torch.Tensor:
    """DETR's PositionEmbeddingSine.forward without a padding mask, as published (cumulative sums over the map)."""
    not_mask = torch.ones(x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    if normalize:
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * (2 * math.pi)
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * (2 * math.pi)
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_pos_feats", [128, 16])
@pytest.mark.parametrize("bhw", [(1, 16, 16), (1, 64, 64), (1, 128, 128), (2, 17, 33), (3, 1, 5), (1, 100, 75)])
def test_position_encoding_from_rows_and_columns_equals_detr_bitwise(normalize, num_pos_feats, bhw):
    """The maskless encoding takes the sines of the H rows and W columns only: DETR's values and layout."""
    b, h, w = bhw
    pe = PositionEmbeddingSine(num_pos_feats, normalize=normalize)
    x = torch.empty(b, 3, h, w)
    want = detr_position_encoding(x, num_pos_feats, normalize)
    got = pe(x)
    assert bitwise_equal(got, want) and got.stride() == want.stride()
    assert bitwise_equal(pe(x, torch.zeros(b, h, w, dtype=torch.bool)), want)  # the masked formulation too


def test_position_encoding_computes_sines_of_rows_and_columns_only(monkeypatch):
    sizes = []
    sin = torch.Tensor.sin
    monkeypatch.setattr(torch.Tensor, "sin", lambda t: sizes.append(t.numel()) or sin(t))
    PositionEmbeddingSine(16, normalize=True)(torch.empty(1, 3, 12, 20))
    assert sorted(sizes) == [12 * 8, 20 * 8]


@pytest.mark.parametrize("batch", [1, 2])
def test_pixel_decoder_matches_the_straightforward_formulation_bitwise(tiny_model, batch):
    """The FPN resize of the encoder's finest map reads it with a dense channels-last stride (its result stays
    channels-last, no copy to NCHW): every output bit-identical to the published formulation."""
    pd = tiny_model.sem_seg_head.pixel_decoder
    g = torch.Generator().manual_seed(4)
    shapes = tiny_model.backbone.output_shape()
    feats = {k: torch.randn(batch, v.channels, 96 // v.stride, 96 // v.stride, generator=g) for k, v in shapes.items()}

    def reference(features):
        srcs, pos = [], []
        for idx, f in enumerate(pd.transformer_in_features[::-1]):
            srcs.append(pd.input_proj[idx](features[f]))
            pos.append(detr_position_encoding(features[f], pd.pe_layer.num_pos_feats, normalize=True))
        y, shapes_list, _ = pd.transformer(srcs, pos)
        y = torch.split(y, [h * w for h, w in shapes_list], dim=1)
        out = [z.transpose(1, 2).reshape(batch, -1, h, w) for z, (h, w) in zip(y, shapes_list)]
        for idx, f in enumerate(pd.in_features[: pd.num_fpn_levels][::-1]):
            cur_fpn = pd.lateral_convs[idx](features[f])
            y = cur_fpn + F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
            out.append(pd.output_convs[idx](y))
        return [pd.mask_features(out[-1]), out[0], *out[:3]]

    with torch.no_grad():
        mask_features, coarsest, multi_scale = pd.forward_features(feats)
        want = reference(feats)
    for got, ref in zip([mask_features, coarsest, *multi_scale], want):
        assert bitwise_equal(got, ref) and got.stride() == ref.stride()


def test_fpn_resize_of_one_image_returns_its_channels_last_result(tiny_model, monkeypatch):
    """The FPN resize reads the encoder's finest map as a dense channels-last view: the CPU resize returns its
    channels-last result as it is (given the map with batch stride C it copied the result to NCHW)."""
    pd = tiny_model.sem_seg_head.pixel_decoder
    shapes = tiny_model.backbone.output_shape()
    feats = {k: torch.randn(1, v.channels, 96 // v.stride, 96 // v.stride) for k, v in shapes.items()}
    results = []
    interpolate = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: results.append(interpolate(*a, **k)) or results[-1])
    with torch.no_grad():
        pd.forward_features(feats)
    assert results and results[0].is_contiguous(memory_format=torch.channels_last) and not results[0].is_contiguous()


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


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("factors", ["integer", "other"])
def test_decoder_without_aux_outputs_makes_the_same_masks_and_outputs_bitwise(tiny_model, batch, factors, layout):
    """Inference skips the intermediate class logits and full-size mask logits: the attention masks (made from the
    mask logits at the resize's taps, pixels-major) and the last layer's outputs stay bit-identical. "integer":
    the mask features are 8, 4 and 2 times the levels' sizes (the taps are gathered), "other": they are not.
    channels_last: the layout of the pixel decoder's maps in the model."""
    dec = tiny_model.sem_seg_head.predictor
    x, mask_features = decoder_inputs(tiny_model, batch)
    if factors == "integer":
        g = torch.Generator().manual_seed(3)
        x = [torch.randn(batch, t.shape[1], h, w, generator=g) for t, (h, w) in zip(x, [(4, 5), (8, 10), (16, 20)])]
        mask_features = torch.randn(batch, mask_features.shape[1], 32, 40, generator=g)
    x = [t.contiguous(memory_format=layout) for t in x]
    mask_features = mask_features.contiguous(memory_format=layout)
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


def einsum_mask_logits(mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)


def queries_with_loss(batch: int, queries: int, pattern: str, g: torch.Generator) -> list[torch.Tensor]:
    """Per image the queries a loss reads: "matched" (a few), "none" in one image, or "all"."""
    if pattern == "all":
        return [torch.arange(queries)] * batch
    picked = [torch.randperm(queries, generator=g)[:3].sort().values for _ in range(batch)]
    if pattern == "none":
        picked[0] = picked[0][:0]
    return picked


@pytest.mark.parametrize("pattern", ["matched", "none", "all"])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_training_mask_logits_equal_the_einsum_and_its_gradients_bitwise(pattern, amp, batch):
    g = torch.Generator().manual_seed(batch * 7 + amp)
    embed = torch.randn(batch, 100, 64, generator=g)
    features = torch.randn(batch, 64, 17, 23, generator=g)
    grad = torch.zeros(batch, 100, 17, 23)
    for b, queries in enumerate(queries_with_loss(batch, 100, pattern, g)):
        grad[b, queries] = torch.randn(len(queries), 17, 23, generator=g)
    results = []
    for fn in (training_mask_logits, einsum_mask_logits):
        e, f = embed.clone().requires_grad_(), features.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = fn(e, f)
        out.backward(grad.to(out.dtype))
        results.append((out, e.grad, f.grad))
    for got, want in zip(*results):
        assert bitwise_equal(got, want)


@pytest.mark.parametrize("amp", [False, True])
def test_training_decoder_gradients_equal_the_official_formulation_bitwise(tiny_model, amp):
    """In training the decoder's mask logits take ``training_mask_logits``: with a loss on a few queries of every
    prediction (as the matched-query losses read them), every gradient equals the official einsum decoder's."""
    dec = tiny_model.sem_seg_head.predictor
    x, mask_features = decoder_inputs(tiny_model, 2, seed=3)
    g = torch.Generator().manual_seed(5)
    picks = [queries_with_loss(2, 7, "matched", g) for _ in range(dec.num_layers + 1)]
    grads = []
    dec.train()
    try:
        for run in ("ours", "official"):
            inputs = [t.clone().requires_grad_() for t in (*x, mask_features)]
            dec.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                if run == "ours":
                    out = dec(inputs[:-1], inputs[-1])
                    masks = [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]
                else:
                    masks = official_decoder_forward(dec, inputs[:-1], inputs[-1])["masks"]
            loss = sum(m[b, q].float().square().sum() for m, pick in zip(masks, picks) for b, q in enumerate(pick))
            loss.backward()
            grads.append([t.grad for t in inputs] + [p.grad for p in dec.parameters() if p.grad is not None])
    finally:
        dec.eval()
    assert len(grads[0]) == len(grads[1]) > len(inputs)
    for got, want in zip(*grads):
        assert bitwise_equal(got, want)
