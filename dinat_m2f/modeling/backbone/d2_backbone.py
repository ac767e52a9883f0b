"""Detectron2 backbones ``D2DiNAT`` and ``D2DiNATs`` (configured by ``MODEL.DINAT.*``).

Both return ``res2..res5`` (strides 4, 8, 16, 32; widths C, 2C, 4C, 8C), each stage's output taken before its
downsampler and normalised by its own LayerNorm ``norm{i}``. Parameter names equal the official dense-prediction
checkpoints (``backbone.patch_embed...``, ``backbone.levels.i...`` / ``backbone.layers.i...``, ``backbone.norm{i}``),
so an official DiNAT-Mask2Former ``model_final.pkl`` loads without renaming.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import nn

from dinat_m2f.modeling.backbone.dinat import ConvTokenizer, build_levels, check_dilations, init_weights
from dinat_m2f.modeling.backbone.dinat_s import PatchEmbed, PatchMerging
from dinat_m2f.modeling.backbone.na_attention import check_kernel_and_dilation, set_na_backend

__all__ = ["D2DiNAT", "D2DiNATs", "dinat_kwargs_from_cfg"]

_STAGE_NAMES = ("res2", "res3", "res4", "res5")
_KWARGS = frozenset(
    [
        "embed_dim",
        "depths",
        "num_heads",
        "kernel_size",
        "dilations",
        "mlp_ratio",
        "qkv_bias",
        "qk_scale",
        "drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
        "layer_scale",
        "out_features",
        "frozen_stages",
        "use_checkpoint",
        "na_backend",
    ]
)


def _merge_kwargs(cfg: CfgNode | None, kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        raise TypeError(f"unknown DiNAT backbone argument(s) {unknown}; known: {sorted(_KWARGS)}")
    if cfg is not None:
        kwargs = {**dinat_kwargs_from_cfg(cfg), **kwargs}
    for required in ("embed_dim", "depths", "num_heads"):
        if required not in kwargs:
            raise TypeError(f"the DiNAT backbone needs {required!r} (or a cfg with MODEL.DINAT)")
    return kwargs


def _int_list(value: object, key: str, length: int | None = None) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"MODEL.DINAT.{key} must be a list of integers, got {value!r}")
    if any(v < 1 for v in value):
        raise ValueError(f"MODEL.DINAT.{key} entries must be >= 1, got {list(value)}")
    if length is not None and len(value) != length:
        raise ValueError(f"MODEL.DINAT.{key} must have {length} entries (one per stage), got {list(value)}")
    return list(value)


def dinat_kwargs_from_cfg(cfg: CfgNode) -> dict:
    """Read and check ``MODEL.DINAT.*``; returns the keyword arguments of ``D2DiNAT``/``D2DiNATs``."""
    c = cfg.MODEL.DINAT
    depths = _int_list(c.DEPTHS, "DEPTHS", 4)
    num_heads = _int_list(c.NUM_HEADS, "NUM_HEADS", 4)
    try:
        check_kernel_and_dilation(c.KERNEL_SIZE, 1)
    except ValueError as exc:
        raise ValueError(f"MODEL.DINAT.KERNEL_SIZE: {exc}") from None
    check_dilations(c.DILATIONS, depths, name="MODEL.DINAT.DILATIONS")
    out_features = list(c.OUT_FEATURES)
    unknown = [f for f in out_features if f not in _STAGE_NAMES]
    if unknown or not out_features:
        raise ValueError(f"MODEL.DINAT.OUT_FEATURES must be a non-empty subset of {_STAGE_NAMES}, got {out_features}")
    if not -1 <= c.FROZEN_STAGES <= 4:
        raise ValueError(f"MODEL.DINAT.FROZEN_STAGES must be in [-1, 4], got {c.FROZEN_STAGES}")
    return dict(
        embed_dim=c.EMBED_DIM,
        depths=depths,
        num_heads=num_heads,
        kernel_size=c.KERNEL_SIZE,
        dilations=c.DILATIONS,
        mlp_ratio=c.MLP_RATIO,
        qkv_bias=c.QKV_BIAS,
        qk_scale=c.QK_SCALE,
        drop_rate=c.DROP_RATE,
        attn_drop_rate=c.ATTN_DROP_RATE,
        drop_path_rate=c.DROP_PATH_RATE,
        layer_scale=c.LAYER_SCALE,
        out_features=out_features,
        frozen_stages=c.FROZEN_STAGES,
        use_checkpoint=c.USE_CHECKPOINT,
        na_backend=c.NA_BACKEND or None,
    )


class _HierarchicalNABackbone(Backbone):
    """What D2DiNAT and D2DiNATs share: construction from cfg/kwargs, output norms, shapes, stage freezing and the
    forward loop. Subclasses name their stem, their downsampler and the attribute of their 4 stages (each stage
    returns (pre-downsample output, next input)).
    """

    _stages_attr: str
    _downsampler: Callable[..., nn.Module] | None = None  # None: the NATBlock default (ConvDownsampler)

    def __init__(self, cfg: CfgNode | None, input_shape: ShapeSpec | None, kwargs: dict):
        super().__init__()
        kwargs = _merge_kwargs(cfg, kwargs)
        self._check_kwargs(kwargs)
        in_chans = input_shape.channels if input_shape is not None and input_shape.channels else 3
        if in_chans != 3:
            raise ValueError(f"the DiNAT backbones take RGB images (3 channels), got {in_chans} input channels")
        embed_dim = kwargs["embed_dim"]
        self.patch_embed = self._build_stem(in_chans, embed_dim)
        stages = build_levels(
            embed_dim,
            kwargs["depths"],
            kwargs["num_heads"],
            kwargs.get("kernel_size", 7),
            kwargs.get("dilations"),
            kwargs.get("mlp_ratio", 4.0),
            kwargs.get("qkv_bias", True),
            kwargs.get("qk_scale"),
            kwargs.get("drop_rate", 0.0),
            kwargs.get("attn_drop_rate", 0.0),
            kwargs.get("drop_path_rate", 0.2),
            nn.LayerNorm,
            kwargs.get("layer_scale"),
            kwargs.get("use_checkpoint", False),
            downsampler=self._downsampler,
        )
        self.add_module(self._stages_attr, stages)
        widths = [embed_dim * 2**i for i in range(len(stages))]
        for i, width in enumerate(widths):
            self.add_module(f"norm{i}", nn.LayerNorm(width))
        self._out_features = list(kwargs.get("out_features", _STAGE_NAMES))
        self._out_feature_strides = {name: 4 * 2**i for i, name in enumerate(_STAGE_NAMES)}
        self._out_feature_channels = {name: widths[i] for i, name in enumerate(_STAGE_NAMES)}
        self.frozen_stages = kwargs.get("frozen_stages", -1)
        self.apply(init_weights)
        set_na_backend(self, kwargs.get("na_backend"))
        self._freeze_stages()

    def _check_kwargs(self, kwargs: dict) -> None:
        """Reject arguments this architecture cannot honour (none by default)."""

    def _build_stem(self, in_chans: int, embed_dim: int) -> nn.Module:
        raise NotImplementedError

    @property
    def stages(self) -> nn.ModuleList:
        return getattr(self, self._stages_attr)

    @property
    def size_divisibility(self) -> int:
        return 32

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def _freeze_stages(self) -> None:
        # 0 freezes the stem; i >= 1 also freezes stages 1..i (their layers, downsamplers and output norms).
        frozen: list[nn.Module] = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        for i in range(max(0, self.frozen_stages)):
            frozen.extend([self.stages[i], getattr(self, f"norm{i}")])
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> _HierarchicalNABackbone:
        super().train(mode)
        self._freeze_stages()  # keep frozen parts in eval mode (no dropout / drop path)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects images [B, 3, H, W], got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        outputs = {}
        for i, stage in enumerate(self.stages):
            out, x = stage(x)
            name = _STAGE_NAMES[i]
            if name in self._out_features:
                outputs[name] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous()
        return outputs


@BACKBONE_REGISTRY.register()
class D2DiNAT(_HierarchicalNABackbone):
    """DiNAT (ConvTokenizer + 4 levels) as a detectron2 backbone: ``MODEL.BACKBONE.NAME: "D2DiNAT"``."""

    _stages_attr = "levels"

    def __init__(self, cfg: CfgNode | None = None, input_shape: ShapeSpec | None = None, **kwargs):
        """Built from ``cfg`` by the registry, or from keyword arguments (those of ``dinat_kwargs_from_cfg``)."""
        super().__init__(cfg, input_shape, kwargs)

    def _build_stem(self, in_chans: int, embed_dim: int) -> nn.Module:
        return ConvTokenizer(in_chans, embed_dim)


@BACKBONE_REGISTRY.register()
class D2DiNATs(_HierarchicalNABackbone):
    """DiNAT_s (4x4 patch stem + PatchMerging) as a detectron2 backbone: ``MODEL.BACKBONE.NAME: "D2DiNATs"``.

    DiNAT_s has no layer scale: a set ``MODEL.DINAT.LAYER_SCALE`` is an error.
    """

    _stages_attr = "layers"
    _downsampler = PatchMerging

    def __init__(self, cfg: CfgNode | None = None, input_shape: ShapeSpec | None = None, **kwargs):
        super().__init__(cfg, input_shape, kwargs)

    def _check_kwargs(self, kwargs: dict) -> None:
        if kwargs.get("layer_scale") is not None:
            raise ValueError("D2DiNATs (DiNAT_s) has no layer scale; set MODEL.DINAT.LAYER_SCALE to None")

    def _build_stem(self, in_chans: int, embed_dim: int) -> nn.Module:
        return PatchEmbed(4, in_chans, embed_dim)
