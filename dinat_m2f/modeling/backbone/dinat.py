"""NAT / DiNAT: convolutional tokenizer, 4 levels of (dilated) neighborhood-attention layers, conv downsamplers.

Module names follow the official checkpoints (``patch_embed.proj.0``, ``levels.i.blocks.j.attn.rpb``,
``levels.i.downsample.reduction``, ``gamma1``/``gamma2``, ``norm``, ``head``). Activations are channels-last
``[B, H, W, C]`` throughout; convolutions permute to NCHW and back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.utils.checkpoint as cp
from timm.layers import DropPath
from torch import nn

from dinat_m2f.modeling.backbone.na_attention import NeighborhoodAttention2D
from dinat_m2f.modeling.backbone.spec import (
    HierarchicalSpec,
    LayerSpec,
    StageSpec,
    check_dilations,
    stochastic_depth_rates,
)
from dinat_m2f.modeling.linear import Linear

__all__ = [
    "DINAT_LAYOUT",
    "ConvDownsampler",
    "ConvTokenizer",
    "DiNAT",
    "HierarchicalTrunk",
    "Mlp",
    "NATBlock",
    "NATLayer",
    "PooledClassifier",
    "TrunkLayout",
    "check_dilations",
    "init_weights",
    "resolve_spec",
    "stochastic_depth_rates",
]


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
        # Weights stored channels_last (as ConvDownsampler's): both convs then run channels_last, the NCHW image is
        # converted once by the first, and the permute of the second's output is contiguous, so the norm copies
        # nothing. The NCHW convs plus that copy took 2.5x the time (DiNAT-T, batch 8 at 224, one thread).
        self.proj.to(memory_format=torch.channels_last)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """Stride-2 3x3 conv (no bias) doubling the width, then LayerNorm; channels-last in and out."""

    def __init__(self, dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        # The input x.permute(0, 3, 1, 2) of a channels-last map is a channels_last NCHW tensor: with the weight stored
        # channels_last too, the conv neither converts its weight per call nor changes layout, and the permute back
        # of its channels_last output is contiguous (no copy before the norm). Loading a state dict keeps the format.
        self.reduction.to(memory_format=torch.channels_last)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if torch.is_grad_enabled():
            hidden = self.act(hidden)
        else:  # in place on fc1's fresh output: one [tokens, mlp_ratio * C] allocation fewer per layer
            torch.ops.aten.gelu_(hidden, approximate=self.act.approximate)
        return self.drop(self.fc2(self.drop(hidden)))


def add_residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch, where branch is a layer's fresh output. Without autograd the sum goes into branch's memory
    (branch + x is the same float sum), one allocation of the map fewer per residual; x is never written."""
    if torch.is_grad_enabled() or branch.shape != x.shape or branch.dtype != x.dtype or branch is x:
        return x + branch
    return branch.add_(x)


class NATLayer(nn.Module):
    """Pre-norm transformer layer: x + DropPath(gamma1 * NA(norm1(x))), then x + DropPath(gamma2 * MLP(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, dilation: int, drop_path: float, layer: LayerSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2D(
            dim,
            num_heads,
            layer.kernel_size,
            dilation=dilation,
            qkv_bias=layer.qkv_bias,
            qk_scale=layer.qk_scale,
            attn_drop=layer.attn_drop_rate,
            proj_drop=layer.drop_rate,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * layer.mlp_ratio), drop=layer.drop_rate)
        self.layer_scale = layer.layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer.layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer.layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.layer_scale:
            x = add_residual(x, self.drop_path(self.attn(self.norm1(x))))
            return add_residual(x, self.drop_path(self.mlp(self.norm2(x))))
        x = add_residual(x, self.drop_path(self.gamma1 * self.attn(self.norm1(x))))
        return add_residual(x, self.drop_path(self.gamma2 * self.mlp(self.norm2(x))))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Run the layers in order, checkpointing each one's activations when asked to (and gradients are on)."""
    checkpointing = use_checkpoint and torch.is_grad_enabled()
    for block in blocks:
        x = cp.checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
    return x


class NATBlock(nn.Module):
    """One level: ``stage.depth`` NATLayers at a fixed resolution, then the layout's downsampler (not after the last
    level). Both DiNAT's ConvDownsampler and DiNAT_s's PatchMerging sit under the key ``downsample``."""

    def __init__(
        self,
        stage: StageSpec,
        layer: LayerSpec,
        downsampler: Callable[[int], nn.Module],
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.dim = stage.dim
        self.depth = stage.depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            NATLayer(stage.dim, stage.num_heads, dilation, drop_path, layer)
            for dilation, drop_path in zip(stage.dilations, stage.drop_path)
        )
        self.downsample = downsampler(stage.dim) if stage.downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the level's output before downsampling, the input of the next level)."""
        x = run_blocks(self.blocks, x, self.use_checkpoint)
        if self.downsample is None:
            return x, x
        return x, self.downsample(x)


@dataclass(frozen=True)
class TrunkLayout:
    """How a hierarchical trunk is assembled; the attribute names are those of the official checkpoints."""

    name: str  # the architecture, for messages
    stem: Callable[[int, int], nn.Module]  # (in_chans, embed_dim) -> image [B, C, H, W] to [B, H/4, W/4, embed_dim]
    downsampler: Callable[[int], nn.Module]  # dim -> halves the map, doubles the width (channels-last)
    stages_attr: str  # "levels" (DiNAT) or "layers" (DiNAT_s)
    has_layer_scale: bool = True


DINAT_LAYOUT = TrunkLayout("DiNAT", ConvTokenizer, ConvDownsampler, "levels")


class HierarchicalTrunk(nn.Module):
    """The stem and the four levels of a hierarchical NAT / DiNAT / DiNAT_s, built from a :class:`HierarchicalSpec`.

    The classifiers (+ pos_drop, final norm, head) and the detectron2 backbones (+ one output norm per stage) are both
    trunks, so their shared parameters have the same names (``patch_embed.*``, ``levels.i.*`` / ``layers.i.*``).
    """

    layout: ClassVar[TrunkLayout]

    def _build_stem(self, spec: HierarchicalSpec, in_chans: int) -> None:
        if spec.layer.layer_scale is not None and not self.layout.has_layer_scale:
            raise ValueError(
                f"{type(self).__name__}: {self.layout.name} has no layer scale; set layer_scale "
                "(MODEL.DINAT.LAYER_SCALE) to None"
            )
        self.patch_embed = self.layout.stem(in_chans, spec.embed_dim)

    def _build_stages(self, spec: HierarchicalSpec) -> None:
        stages = nn.ModuleList(
            NATBlock(stage, spec.layer, self.layout.downsampler, spec.use_checkpoint) for stage in spec.stages()
        )
        self.add_module(self.layout.stages_attr, stages)

    @property
    def stages(self) -> nn.ModuleList:
        return getattr(self, self.layout.stages_attr)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each level's output before its downsampler, channels-last (the last one is the final map)."""
        outputs = []
        for stage in self.stages:
            out, x = stage(x)
            outputs.append(out)
        return outputs


def resolve_spec(spec: Any, spec_kwargs: dict[str, Any], spec_type: type = HierarchicalSpec) -> Any:
    """``spec`` with the flat keyword overrides applied, or a new spec from the keywords alone."""
    if spec is None:
        return spec_type.from_kwargs(**spec_kwargs)
    return spec.replace(**spec_kwargs) if spec_kwargs else spec


class PooledClassifier(nn.Module):
    """What the NAT/DiNAT classifiers share: final LayerNorm, global average pool, linear head, the official init.

    Subclasses build their stem and layers, implement ``forward_map`` (image -> channels-last final map) and call
    ``_add_head`` last (so the keys ``norm``/``head`` follow the layers', as in the official checkpoints).
    """

    def _add_head(self, num_features: int, num_classes: int) -> None:
        self.num_classes = num_classes
        self.num_features = num_features
        self.norm = nn.LayerNorm(num_features)
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


class DiNAT(HierarchicalTrunk, PooledClassifier):
    """The hierarchical NAT/DiNAT classifier (NAT when every dilation is 1).

    Built from a :class:`HierarchicalSpec` or from its flat keywords (``DiNAT(embed_dim=64, depths=..., ...)``);
    keywords given with a spec override its settings.
    """

    layout = DINAT_LAYOUT
    _default_spec_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        spec: HierarchicalSpec | None = None,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        **spec_kwargs: Any,
    ):
        super().__init__()
        if spec is None:
            spec_kwargs = {**self._default_spec_kwargs, **spec_kwargs}
        self.spec = spec = resolve_spec(spec, spec_kwargs)
        self._build_stem(spec, in_chans)
        self.pos_drop = nn.Dropout(spec.layer.drop_rate)
        self._build_stages(spec)
        self._add_head(spec.widths[-1], num_classes)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_outputs(self.pos_drop(self.patch_embed(x)))[-1]
