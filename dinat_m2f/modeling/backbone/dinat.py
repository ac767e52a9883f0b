"""NAT / DiNAT: convolutional tokenizer, 4 levels of (dilated) neighborhood-attention layers, conv downsamplers.

Module names follow the official checkpoints (``patch_embed.proj.0``, ``levels.i.blocks.j.attn.rpb``,
``levels.i.downsample.reduction``, ``gamma1``/``gamma2``, ``norm``, ``head``). Activations are channels-last
``[B, H, W, C]`` throughout; convolutions permute to NCHW and back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.utils.checkpoint as cp
from timm.layers import DropPath
from torch import nn

from dinat_m2f.modeling.backbone.na_attention import NeighborhoodAttention2D

__all__ = [
    "ConvDownsampler",
    "ConvTokenizer",
    "DiNAT",
    "Mlp",
    "NATBlock",
    "NATLayer",
    "PooledClassifier",
    "check_dilations",
    "init_weights",
    "stochastic_depth_rates",
]


def check_dilations(dilations: object, depths: Sequence[int], name: str = "dilations") -> list[list[int]]:
    """Validate ``dilations[stage][layer]`` against ``depths``; ``None`` means every dilation is 1 (plain NA).

    Raises ValueError naming the stage/layer at fault (wrong number of stages or layers, zero, negative, non-int).
    """
    if dilations is None:
        return [[1] * depth for depth in depths]
    if not isinstance(dilations, (list, tuple)) or len(dilations) != len(depths):
        raise ValueError(
            f"{name} must be a list of {len(depths)} per-stage lists (one per entry of DEPTHS={list(depths)}), "
            f"got {dilations!r}"
        )
    checked = []
    for stage, (stage_dilations, depth) in enumerate(zip(dilations, depths)):
        if not isinstance(stage_dilations, (list, tuple)) or len(stage_dilations) != depth:
            raise ValueError(
                f"{name}[{stage}] must list one dilation per layer of stage {stage} (depth {depth}), "
                f"got {stage_dilations!r}"
            )
        for layer, dilation in enumerate(stage_dilations):
            if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
                raise ValueError(f"{name}[{stage}][{layer}] must be an integer >= 1, got {dilation!r}")
        checked.append(list(stage_dilations))
    return checked


def stochastic_depth_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Linearly increasing drop-path rates over all layers of all stages, split per stage."""
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    out, start = [], 0
    for depth in depths:
        out.append(rates[start : start + depth])
        start += depth
    return out


def init_weights(module: nn.Module) -> None:
    """The official init (apply with ``model.apply``): trunc-normal Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ConvTokenizer(nn.Module):
    """Two stride-2 3x3 convs (no activation in between) then LayerNorm: NCHW image -> [B, H/4, W/4, C]."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """Stride-2 3x3 conv (no bias) doubling the width, then LayerNorm; channels-last in and out."""

    def __init__(self, dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class NATLayer(nn.Module):
    """Pre-norm transformer layer: x + DropPath(gamma1 * NA(norm1(x))), then x + DropPath(gamma2 * MLP(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        layer_scale: float | None = None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2D(
            dim,
            num_heads,
            kernel_size,
            dilation=dilation,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.layer_scale:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Run the layers in order, checkpointing each one's activations when asked to (and gradients are on)."""
    checkpointing = use_checkpoint and torch.is_grad_enabled()
    for block in blocks:
        x = cp.checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
    return x


class NATBlock(nn.Module):
    """One level: ``depth`` NATLayers at a fixed resolution, then an optional downsampler.

    DiNAT downsamples with a ConvDownsampler; DiNAT_s passes ``downsampler=PatchMerging``. Both sit under the key
    ``downsample`` in the official checkpoints.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        kernel_size: int,
        dilations: Sequence[int],
        downsample: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        layer_scale: float | None = None,
        use_checkpoint: bool = False,
        downsampler: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            NATLayer(
                dim,
                num_heads,
                kernel_size,
                dilation=dilations[i],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
                norm_layer=norm_layer,
                layer_scale=layer_scale,
            )
            for i in range(depth)
        )
        downsampler = downsampler or ConvDownsampler
        self.downsample = downsampler(dim, norm_layer=norm_layer) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the level's output before downsampling, the input of the next level)."""
        x = run_blocks(self.blocks, x, self.use_checkpoint)
        if self.downsample is None:
            return x, x
        return x, self.downsample(x)


def build_levels(
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    kernel_size: int,
    dilations: object,
    mlp_ratio: float,
    qkv_bias: bool,
    qk_scale: float | None,
    drop_rate: float,
    attn_drop_rate: float,
    drop_path_rate: float,
    norm_layer: Callable[..., nn.Module],
    layer_scale: float | None,
    use_checkpoint: bool,
    downsampler: Callable[..., nn.Module] | None = None,
) -> nn.ModuleList:
    """The ``levels`` ModuleList shared by the classifiers and the detectron2 backbones (DiNAT and DiNAT_s)."""
    if len(num_heads) != len(depths):
        raise ValueError(f"NUM_HEADS {list(num_heads)} must have one entry per stage of DEPTHS {list(depths)}")
    dilations = check_dilations(dilations, depths)
    rates = stochastic_depth_rates(drop_path_rate, depths)
    return nn.ModuleList(
        NATBlock(
            dim=embed_dim * 2**i,
            depth=depths[i],
            num_heads=num_heads[i],
            kernel_size=kernel_size,
            dilations=dilations[i],
            downsample=i < len(depths) - 1,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            drop_path=rates[i],
            norm_layer=norm_layer,
            layer_scale=layer_scale,
            use_checkpoint=use_checkpoint,
            downsampler=downsampler,
        )
        for i in range(len(depths))
    )


class PooledClassifier(nn.Module):
    """What the NAT/DiNAT classifiers share: final LayerNorm, global average pool, linear head, the official init.

    Subclasses build their stem and layers, implement ``forward_map`` (image -> channels-last final map) and call
    ``_add_head`` last (so the keys ``norm``/``head`` follow the layers', as in the official checkpoints).
    """

    def _add_head(self, num_features: int, num_classes: int, norm_layer: Callable[..., nn.Module]) -> None:
        self.num_classes = num_classes
        self.num_features = num_features
        self.norm = norm_layer(num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"rpb"}

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] -> pooled features [B, num_features]."""
        x = self.norm(self.forward_map(x)).flatten(1, 2)
        return self.avgpool(x.transpose(1, 2)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class DiNAT(PooledClassifier):
    """The hierarchical NAT/DiNAT classifier (NAT when every dilation is 1)."""

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        kernel_size: int = 7,
        dilations: Sequence[Sequence[int]] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        layer_scale: float | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(drop_rate)
        self.levels = build_levels(
            embed_dim,
            depths,
            num_heads,
            kernel_size,
            dilations,
            mlp_ratio,
            qkv_bias,
            qk_scale,
            drop_rate,
            attn_drop_rate,
            drop_path_rate,
            norm_layer,
            layer_scale,
            use_checkpoint,
        )
        self._add_head(embed_dim * 2 ** (len(depths) - 1), num_classes, norm_layer)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            _, x = level(x)
        return x
