"""The NAT/DiNAT models: attention module (incl. the paper-era padding), official state-dict names, variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dinat_m2f import ops
from dinat_m2f.modeling.backbone import VARIANTS, NeighborhoodAttention2D, build_variant
from dinat_m2f.modeling.backbone.dinat import check_dilations
from dinat_m2f.ops import reference


class BigOpCounter(TorchDispatchMode):
    """Records the ops named in `names` that produce a tensor of at least `min_numel` elements."""

    def __init__(self, names: set[str], min_numel: int):
        super().__init__()
        self.names, self.min_numel, self.ops = names, min_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outs = result if isinstance(result, (tuple, list)) else [result]
        big = any(isinstance(t, torch.Tensor) and t.numel() >= self.min_numel for t in outs)
        if func._schema.name in self.names and big:
            self.ops.append(func._schema.name)
        return result


# --------------------------------------------------------------------------------------------- attention module


def _hand_built(attn: NeighborhoodAttention2D, x: torch.Tensor) -> torch.Tensor:
    """NATTEN <= 0.15 NeighborhoodAttention2D.forward, written out with the pure-PyTorch reference ops."""
    batch, height, width, channels = x.shape
    k, d, heads = attn.kernel_size, attn.dilation, attn.num_heads
    pad_b, pad_r = max(0, k * d - height), max(0, k * d - width)
    xp = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zeros bottom / right, BEFORE qkv
    hp, wp = xp.shape[1:3]
    qkv = F.linear(xp, attn.qkv.weight, attn.qkv.bias).reshape(batch, hp, wp, 3, heads, channels // heads)
    q, kk, v = qkv.permute(3, 0, 4, 1, 2, 5)
    logits = reference.na2d_qk(q * (channels // heads) ** -0.5, kk, k, d, rpb=attn.rpb)
    out = reference.na2d_av(logits.softmax(-1), v, k, d)  # padded tokens are keys too: no mask
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, hp, wp, channels)[:, :height, :width]
    return F.linear(out, attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize(
    "height,width,kernel,dilation",
    [
        (9, 11, 3, 2),  # no padding (9, 11 >= 6)
        (5, 11, 3, 2),  # padding at the bottom only
        (8, 4, 3, 3),  # padding on both axes, at the right more than the map
        (3, 3, 5, 1),  # map smaller than the kernel itself
    ],
)
def test_attention_matches_hand_built_padded_computation(height, width, kernel, dilation):
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(12, 3, kernel, dilation).double().eval()
    with torch.no_grad():
        attn.qkv.bias.normal_()  # a non-zero bias makes the padded tokens matter
        attn.rpb.normal_()
    x = torch.randn(2, height, width, 12, dtype=torch.float64)
    out = attn(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _hand_built(attn, x), rtol=1e-10, atol=1e-10)


def test_padding_tokens_are_unmasked():
    """Masking the padded keys out (what a modern implementation might do) gives a different answer."""
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(8, 2, 3, 2).double().eval()
    with torch.no_grad():
        attn.qkv.bias.normal_()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)  # H = 4 < k*d = 6: two padded rows
    out = attn(x)

    xp = F.pad(x, (0, 0, 0, 0, 0, 2))
    q, k, v = F.linear(xp, attn.qkv.weight, attn.qkv.bias).reshape(1, 6, 8, 3, 2, 4).permute(3, 0, 4, 1, 2, 5)
    logits = reference.na2d_qk(q * 0.5, k, 3, 2, rpb=attn.rpb)
    key_rows = reference.window_indices(6, 3, 2)  # [6, 3]: the key rows of each query row
    padded_key = (key_rows >= 4)[:, None, :, None].expand(6, 8, 3, 3).flatten(-2)  # [H, W, k*k]
    masked = reference.na2d_av(logits.masked_fill(padded_key, float("-inf")).softmax(-1), v, 3, 2)
    masked = attn.proj(masked.permute(0, 2, 3, 1, 4).reshape(1, 6, 8, 8)[:, :4])
    assert padded_key[:4].any()  # some real queries do have padded keys in their window
    assert not torch.allclose(out, masked)
    torch.testing.assert_close(out, _hand_built(attn, x), rtol=1e-10, atol=1e-10)


def test_attention_gradcheck_through_padding():
    """float64 gradcheck of the module (input, rpb and qkv weight) on a map that needs padding."""
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(4, 2, 3, 2).double().train()
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, requires_grad=True)

    def run(x, rpb, weight):
        return torch.func.functional_call(attn, {"rpb": rpb, "qkv.weight": weight}, (x,))

    assert torch.autograd.gradcheck(
        run, (x, attn.rpb.detach().clone().requires_grad_(), attn.qkv.weight.detach().clone().requires_grad_())
    )


def test_attention_dropout_path_equals_fused_when_dropout_is_negligible():
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(16, 2, 3, 2, attn_drop=1e-12).double()
    x = torch.randn(2, 7, 9, 16, dtype=torch.float64)
    fused = attn.eval()(x)
    unfused = attn.train()(x)  # qk -> softmax -> dropout (p ~ 0) -> av
    torch.testing.assert_close(unfused, fused, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attn_drop", [0.0, 1e-12])  # fused and unfused paths
def test_attention_under_cpu_autocast(attn_drop):
    """bf16 autocast (the training engine's CPU AMP): q/k/v are bf16, rpb fp32; runs and stays close to fp32."""
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(16, 2, 3, 2, attn_drop=attn_drop).train()
    x = torch.randn(2, 5, 9, 16)  # padded map
    reference_out = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_out, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert attn.rpb.grad is not None and attn.rpb.grad.dtype == torch.float32


def _before_packed_path(attn: NeighborhoodAttention2D, x: torch.Tensor) -> torch.Tensor:
    """The module's forward before the packed-qkv path (same native kernels on contiguous q, k, v copies)."""
    batch, height, width, channels = x.shape
    hp, wp = max(height, attn.kernel_size * attn.dilation), max(width, attn.kernel_size * attn.dilation)
    xp = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))
    qkv = attn.qkv(xp).reshape(batch, hp, wp, 3, attn.num_heads, attn.head_dim).permute(3, 0, 4, 1, 2, 5)
    q, k, v = qkv.contiguous().unbind(0)
    out = ops.na2d(q, k, v, attn.kernel_size, attn.dilation, rpb=attn.rpb, scale=attn.scale, backend="native")
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, hp, wp, channels)[:, :height, :width]
    return attn.proj(out)


@pytest.mark.parametrize(
    "height,width,kernel,dilation,dtype",
    [
        (9, 40, 7, 1, torch.float32),  # query tiles along W
        (13, 12, 3, 4, torch.float32),  # the largest dilation
        (5, 11, 3, 2, torch.float64),  # padded
        (6, 6, 3, 2, torch.float32),  # every window is its dilation group: the whole-group tiles
        (56, 56, 7, 8, torch.float32),  # DiNAT's dilated 56x56 stage: whole-group tiles, saving the weights
    ],
)
def test_attention_output_and_gradients_identical_to_before(height, width, kernel, dilation, dtype):
    """Seeded: the packed-qkv path gives bit-identical outputs and gradients to the old contiguous-copy path."""
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(64, 2, kernel, dilation).to(dtype).train()
    with torch.no_grad():
        attn.qkv.bias.normal_()
        attn.rpb.normal_()
    x = torch.randn(2, height, width, 64, dtype=dtype)
    results = []
    for forward in (attn, lambda t: _before_packed_path(attn, t)):
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        out = forward(xi)
        out.backward(torch.ones_like(out))
        results.append([out.detach(), xi.grad, attn.rpb.grad.clone(), attn.qkv.weight.grad.clone()])
    for got, want in zip(*results):
        assert torch.equal(got, want), (got - want).abs().max()


def test_attention_makes_no_layout_copies():
    """Forward + backward of the module (native backend, no padding): no copy of a q/k/v/output-sized tensor."""
    copy_ops = {"aten::copy_", "aten::clone", "aten::select_backward", "aten::stack", "aten::cat", "aten::_to_copy"}
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(32, 2, 3, 2, backend="native").train()
    x = torch.randn(2, 9, 10, 32, requires_grad=True)
    with BigOpCounter(copy_ops, min_numel=x.numel()) as counter:
        attn(x).sum().backward()
    assert counter.ops == []


@pytest.mark.parametrize("layer_scale", [None, 1e-2])
def test_layer_inference_adds_in_place_bit_identical(layer_scale):
    """Without autograd NATLayer adds its residuals and applies the MLP's GELU in place (add_residual, Mlp): no
    out-of-place add or gelu of a map-sized tensor, the same bits as the autograd path, and the input unchanged."""
    from dinat_m2f.modeling.backbone.dinat import NATLayer
    from dinat_m2f.modeling.backbone.spec import LayerSpec

    torch.manual_seed(0)
    layer = NATLayer(32, 2, 2, 0.1, LayerSpec(kernel_size=3, mlp_ratio=3.0, layer_scale=layer_scale)).eval()
    x = torch.randn(2, 7, 9, 32)
    kept = x.clone()
    want = layer(x.clone().requires_grad_()).detach()
    with torch.no_grad(), BigOpCounter({"aten::add", "aten::gelu"}, min_numel=x.numel()) as counter:
        got = layer(x)
    assert counter.ops == []
    assert torch.equal(got, want), (got - want).abs().max()
    assert torch.equal(x, kept)
    with torch.inference_mode():
        assert torch.equal(layer(x), want)
    assert torch.equal(x, kept)


def test_conv_tokenizer_runs_channels_last_and_matches_nchw():
    """The stem's convs keep channels_last weights (also after loading a contiguous state dict): the map reaches the
    norm contiguous, and the tokens match the NCHW formulation."""
    from dinat_m2f.modeling.backbone.dinat import ConvTokenizer

    torch.manual_seed(0)
    stem = ConvTokenizer(3, 64)
    stem.load_state_dict({name: t.contiguous() for name, t in stem.state_dict().items()})
    for conv in stem.proj:
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 37, 30)
    assert stem.proj(x).permute(0, 2, 3, 1).is_contiguous()
    want = x
    for conv in stem.proj:
        want = F.conv2d(want, conv.weight.contiguous(), conv.bias, stride=2, padding=1)
    want = stem.norm(want.permute(0, 2, 3, 1))
    torch.testing.assert_close(stem(x), want, rtol=1e-5, atol=1e-5)


def test_attention_parameters_keep_the_official_layout():
    """The packed path changes no parameter: names, shapes and contiguity are those of NATTEN's module."""
    attn = NeighborhoodAttention2D(12, 3, 5, 2)
    shapes = {name: tuple(t.shape) for name, t in attn.state_dict().items()}
    assert shapes == {
        "qkv.weight": (36, 12),
        "qkv.bias": (36,),
        "rpb": (3, 9, 9),
        "proj.weight": (12, 12),
        "proj.bias": (12,),
    }
    assert all(t.is_contiguous() for t in attn.state_dict().values())


def test_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernel_size must be an odd integer"):
        NeighborhoodAttention2D(8, 2, 4)
    with pytest.raises(ValueError, match="dilation must be an integer >= 1"):
        NeighborhoodAttention2D(8, 2, 3, 0)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        NeighborhoodAttention2D(10, 3, 3)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        NeighborhoodAttention2D(8, 2, 3)(torch.randn(2, 8, 8))


def test_check_dilations_messages():
    assert check_dilations(None, [2, 1]) == [[1, 1], [1]]
    with pytest.raises(ValueError, match="dilations must be a list of 2 per-stage lists"):
        check_dilations([[1, 2]], [2, 1])
    with pytest.raises(ValueError, match=r"dilations\[1\] must list one dilation per layer"):
        check_dilations([[1, 2], [1, 2]], [2, 1])
    with pytest.raises(ValueError, match=r"dilations\[0\]\[1\] must be an integer >= 1, got 0"):
        check_dilations([[1, 0], [1]], [2, 1])
    with pytest.raises(ValueError, match=r"got 2.0"):
        check_dilations([[1, 2.0], [1]], [2, 1])
    with pytest.raises(ValueError, match=r"got True"):
        check_dilations([[1, True], [1]], [2, 1])


# --------------------------------------------------------------------------------- official key names and shapes


def _layer_keys(prefix: str, dim: int, heads: int, kernel: int, hidden: int, layer_scale: bool) -> dict:
    keys = {
        f"{prefix}.norm1.weight": (dim,),
        f"{prefix}.norm1.bias": (dim,),
        f"{prefix}.attn.qkv.weight": (3 * dim, dim),
        f"{prefix}.attn.qkv.bias": (3 * dim,),
        f"{prefix}.attn.rpb": (heads, 2 * kernel - 1, 2 * kernel - 1),
        f"{prefix}.attn.proj.weight": (dim, dim),
        f"{prefix}.attn.proj.bias": (dim,),
        f"{prefix}.norm2.weight": (dim,),
        f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (hidden, dim),
        f"{prefix}.mlp.fc1.bias": (hidden,),
        f"{prefix}.mlp.fc2.weight": (dim, hidden),
        f"{prefix}.mlp.fc2.bias": (dim,),
    }
    if layer_scale:
        keys[f"{prefix}.gamma1"] = (dim,)
        keys[f"{prefix}.gamma2"] = (dim,)
    return keys


def _add_levels(keys: dict, stage: str, c: int, depths, block_keys, downsample_shapes) -> None:
    # Level i: its blocks (block_keys(prefix, i, dim)), then a downsampler (but after the last level).
    for i, depth in enumerate(depths):
        dim = c * 2**i
        for j in range(depth):
            keys.update(block_keys(f"{stage}.{i}.blocks.{j}", i, dim))
        if i < len(depths) - 1:
            reduction, norm = downsample_shapes(dim)
            keys[f"{stage}.{i}.downsample.reduction.weight"] = reduction
            keys[f"{stage}.{i}.downsample.norm.weight"] = norm
            keys[f"{stage}.{i}.downsample.norm.bias"] = norm


def _add_output_norms(keys: dict, c: int, levels: int, classes: int, dense: bool) -> dict:
    # Dense prediction: a norm per level (norm0..3); classification: one final norm and the linear head.
    if dense:
        for i in range(levels):
            keys[f"norm{i}.weight"] = keys[f"norm{i}.bias"] = (c * 2**i,)
    else:
        final = c * 2 ** (levels - 1)
        keys.update({"norm.weight": (final,), "norm.bias": (final,), "head.weight": (classes, final)})
        keys["head.bias"] = (classes,)
    return keys


def official_dinat_keys(c, depths, heads, mlp, k, layer_scale=False, classes=1000, dense=False) -> dict:
    """spec/dinat.md 1.2 (classification) or the dense-prediction variant (no norm/head, norm0..3)."""
    keys = {
        "patch_embed.proj.0.weight": (c // 2, 3, 3, 3),
        "patch_embed.proj.0.bias": (c // 2,),
        "patch_embed.proj.1.weight": (c, c // 2, 3, 3),
        "patch_embed.proj.1.bias": (c,),
        "patch_embed.norm.weight": (c,),
        "patch_embed.norm.bias": (c,),
    }
    _add_levels(
        keys,
        "levels",
        c,
        depths,
        lambda prefix, i, dim: _layer_keys(prefix, dim, heads[i], k, int(dim * mlp), layer_scale),
        lambda dim: ((2 * dim, dim, 3, 3), (2 * dim,)),  # 3x3 stride-2 conv, norm after
    )
    return _add_output_norms(keys, c, len(depths), classes, dense)


def official_dinat_s_keys(c, depths, heads, classes=1000, dense=False) -> dict:
    keys = {
        "patch_embed.proj.weight": (c, 3, 4, 4),
        "patch_embed.proj.bias": (c,),
        "patch_embed.norm.weight": (c,),
        "patch_embed.norm.bias": (c,),
    }
    _add_levels(
        keys,
        "layers",
        c,
        depths,
        lambda prefix, i, dim: _layer_keys(prefix, dim, heads[i], 7, 4 * dim, False),
        lambda dim: ((2 * dim, 4 * dim), (4 * dim,)),  # Swin patch merging: norm, then linear
    )
    return _add_output_norms(keys, c, len(depths), classes, dense)


def official_iso_keys(c, heads) -> dict:
    keys = {
        "patch_embed.proj.weight": (c, 3, 16, 16),
        "patch_embed.proj.bias": (c,),
        "patch_embed.norm.weight": (c,),
        "patch_embed.norm.bias": (c,),
    }
    for j in range(12):
        keys.update(_layer_keys(f"layers.{j}", c, heads, 7, 4 * c, False))
    keys.update({"norm.weight": (c,), "norm.bias": (c,), "head.weight": (1000, c), "head.bias": (1000,)})
    return keys


_D = (3, 4, 18, 5)
_SD = (2, 2, 18, 2)
OFFICIAL_KEYS = {
    "dinat_mini": lambda: official_dinat_keys(64, (3, 4, 6, 5), (2, 4, 8, 16), 3, 7),
    "dinat_tiny": lambda: official_dinat_keys(64, _D, (2, 4, 8, 16), 3, 7),
    "dinat_small": lambda: official_dinat_keys(96, _D, (3, 6, 12, 24), 2, 7),
    "dinat_base": lambda: official_dinat_keys(128, _D, (4, 8, 16, 32), 2, 7, layer_scale=True),
    "dinat_large": lambda: official_dinat_keys(192, _D, (6, 12, 24, 48), 2, 7),
    "dinat_large_384": lambda: official_dinat_keys(192, _D, (6, 12, 24, 48), 2, 7),
    "dinat_large_384_11x11": lambda: official_dinat_keys(192, _D, (6, 12, 24, 48), 2, 11),
    "dinat_large_21k": lambda: official_dinat_keys(192, _D, (6, 12, 24, 48), 2, 7, classes=21841),
    "dinat_large_21k_11x11": lambda: official_dinat_keys(192, _D, (6, 12, 24, 48), 2, 11, classes=21841),
    "nat_mini": lambda: official_dinat_keys(64, (3, 4, 6, 5), (2, 4, 8, 16), 3, 7),
    "nat_tiny": lambda: official_dinat_keys(64, _D, (2, 4, 8, 16), 3, 7),
    "nat_small": lambda: official_dinat_keys(96, _D, (3, 6, 12, 24), 2, 7, layer_scale=True),
    "nat_base": lambda: official_dinat_keys(128, _D, (4, 8, 16, 32), 2, 7, layer_scale=True),
    "dinat_s_tiny": lambda: official_dinat_s_keys(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "dinat_s_small": lambda: official_dinat_s_keys(96, _SD, (3, 6, 12, 24)),
    "dinat_s_base": lambda: official_dinat_s_keys(128, _SD, (4, 8, 16, 32)),
    "dinat_s_large": lambda: official_dinat_s_keys(192, _SD, (6, 12, 24, 48)),
    "dinat_s_large_384": lambda: official_dinat_s_keys(192, _SD, (6, 12, 24, 48)),
    "dinat_s_large_21k": lambda: official_dinat_s_keys(192, _SD, (6, 12, 24, 48), classes=21841),
    "nat_iso_small": lambda: official_iso_keys(384, 12),
    "dinat_iso_small": lambda: official_iso_keys(384, 12),
    "nat_iso_base": lambda: official_iso_keys(768, 24),
    "dinat_iso_base": lambda: official_iso_keys(768, 24),
}


def test_every_variant_has_official_keys():
    assert sorted(OFFICIAL_KEYS) == sorted(VARIANTS)


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_state_dict_loads_strictly(name):
    """A state dict with the official names and shapes (meta tensors: no memory) loads with strict=True."""
    expected = OFFICIAL_KEYS[name]()
    with torch.device("meta"):
        model = build_variant(name)
        official = {key: torch.empty(shape) for key, shape in expected.items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    result = model.load_state_dict(official, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("name", ["dinat_mini", "dinat_s_tiny", "dinat_iso_small"])
def test_state_dict_values_round_trip_and_forward(name):
    torch.manual_seed(0)
    official = {k: torch.randn(shape) * 0.02 for k, shape in OFFICIAL_KEYS[name]().items()}
    with torch.device("meta"):  # skip the random init: every tensor comes from the state dict
        model = build_variant(name).eval()
    model.load_state_dict(official, strict=True, assign=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, official[key]), key
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 112, 112))  # below 224 every DiNA layer pads: still runs
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_variants_hyper_parameters():
    with torch.device("meta"):
        tiny, nat, iso = build_variant("dinat_tiny"), build_variant("nat_tiny"), build_variant("dinat_iso_small")
    dilations = [[blk.attn.dilation for blk in level.blocks] for level in tiny.levels]
    assert dilations == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    large_384 = VARIANTS["dinat_large_384"]
    assert large_384.input_size == 384
    assert large_384.spec.dilations[:2] == ((1, 13, 1), (1, 6, 1, 6))
    assert all(blk.attn.dilation == 1 for level in nat.levels for blk in level.blocks)
    assert [layer.attn.dilation for layer in iso.layers] == [1, 2] * 6
    with pytest.raises(KeyError, match="unknown DiNAT variant"):
        build_variant("dinat_huge")


def test_dinat_s_odd_input_pads_like_swin():
    model = build_variant("dinat_s_tiny", num_classes=0).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 99, 101))  # 25x26 tokens: odd maps merged with zero padding
    assert features.shape == (1, 768)


def test_conv_downsampler_makes_no_copies_and_matches_an_nchw_weight():
    """The downsampler's weight is stored channels_last (the layout of its permuted channels-last input): the conv
    converts nothing per call, and the result is bit-identical to the same conv with a contiguous weight."""
    from dinat_m2f.modeling.backbone.dinat import ConvDownsampler

    torch.manual_seed(0)
    down = ConvDownsampler(32)
    state = {k: v.contiguous() for k, v in down.state_dict().items()}
    fresh = ConvDownsampler(32)
    fresh.load_state_dict(state)  # loading a contiguous (official) weight keeps the channels_last storage
    assert fresh.reduction.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 14, 14, 32)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fresh(x)
    assert [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone")] == []
    want = F.conv2d(x.permute(0, 3, 1, 2), state["reduction.weight"], stride=2, padding=1)
    assert torch.equal(out, fresh.norm(want.permute(0, 2, 3, 1)))


def test_attention_compiles_with_fullgraph_on_two_shapes():
    """The packed path (public op, fakes with the kernels' strides, autograd) traces without graph breaks; the
    second shape (padded) recompiles with symbolic sizes."""
    torch.manual_seed(0)
    attn = NeighborhoodAttention2D(32, 2, 3, 2, backend="native").train()
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    for shape in ((2, 9, 10, 32), (2, 5, 10, 32)):
        x = torch.randn(*shape, requires_grad=True)
        want = attn(x)
        (grad_want,) = torch.autograd.grad(want.sum(), [x])
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), [x])
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, grad_want, rtol=1e-6, atol=1e-6)
