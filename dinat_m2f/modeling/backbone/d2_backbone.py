"""Detectron2 backbones ``D2DiNAT`` and ``D2DiNATs`` (configured by ``MODEL.DINAT.*``).

Both return ``res2..res5`` (strides 4, 8, 16, 32; widths C, 2C, 4C, 8C), each stage's output taken before its
downsampler and normalised by its own LayerNorm ``norm{i}``. Parameter names equal the official dense-prediction
checkpoints (``backbone.patch_embed...``, ``backbone.levels.i...`` / ``backbone.layers.i...``, ``backbone.norm{i}``),
so an official DiNAT-Mask2Former ``model_final.pkl`` loads without renaming.
"""

from __future__ import annotations

from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import nn

from dinat_m2f.modeling.backbone.dinat import DINAT_LAYOUT, HierarchicalTrunk, init_weights, resolve_spec
from dinat_m2f.modeling.backbone.dinat_s import DINAT_S_LAYOUT
from dinat_m2f.modeling.backbone.na_attention import check_kernel_and_dilation, set_na_backend
from dinat_m2f.modeling.backbone.spec import HierarchicalSpec, check_dilations

__all__ = ["D2DiNAT", "D2DiNATs", "dinat_kwargs_from_cfg"]

_STAGE_NAMES = ("res2", "res3", "res4", "res5")
# Keywords of the backbone itself; every other keyword is a HierarchicalSpec setting (``MODEL.DINAT.<NAME>``).
_BACKBONE_KWARGS = ("out_features", "frozen_stages", "trunc_normal_init", "na_backend")


def _merge_kwargs(cfg: CfgNode | None, kwargs: dict) -> dict:
    known = set(HierarchicalSpec.flat_names()) | set(_BACKBONE_KWARGS)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown DiNAT backbone argument(s) {unknown}; known: {sorted(known)}")
    if cfg is not None:
        kwargs = {**dinat_kwargs_from_cfg(cfg), **kwargs}
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
    """Read and check ``MODEL.DINAT.*``; returns the keyword arguments of ``D2DiNAT``/``D2DiNATs``.

    Every HierarchicalSpec setting is read from the key of the same name in upper case (``kernel_size`` from
    ``MODEL.DINAT.KERNEL_SIZE``): a new setting needs only its field and its config default.
    """
    c = cfg.MODEL.DINAT
    kwargs = {name: c[name.upper()] for name in HierarchicalSpec.flat_names()}
    kwargs["depths"] = _int_list(c.DEPTHS, "DEPTHS", 4)
    kwargs["num_heads"] = _int_list(c.NUM_HEADS, "NUM_HEADS", 4)
    try:
        check_kernel_and_dilation(c.KERNEL_SIZE, 1)
    except ValueError as exc:
        raise ValueError(f"MODEL.DINAT.KERNEL_SIZE: {exc}") from None
    check_dilations(c.DILATIONS, kwargs["depths"], name="MODEL.DINAT.DILATIONS")
    out_features = list(c.OUT_FEATURES)
    unknown = [f for f in out_features if f not in _STAGE_NAMES]
    if unknown or not out_features:
        raise ValueError(f"MODEL.DINAT.OUT_FEATURES must be a non-empty subset of {_STAGE_NAMES}, got {out_features}")
    if not -1 <= c.FROZEN_STAGES <= 4:
        raise ValueError(f"MODEL.DINAT.FROZEN_STAGES must be in [-1, 4], got {c.FROZEN_STAGES}")
    return dict(
        kwargs,
        out_features=out_features,
        frozen_stages=c.FROZEN_STAGES,
        trunc_normal_init=c.TRUNC_NORMAL_INIT,
        na_backend=c.NA_BACKEND or None,
    )


class _HierarchicalNABackbone(HierarchicalTrunk, Backbone):
    """A hierarchical trunk (the classifier's stem and levels, same parameter names) as a detectron2 backbone: one
    LayerNorm ``norm{i}`` per stage output, shapes, stage freezing. Subclasses choose the layout (DiNAT or DiNAT_s).
    """

    def __init__(
        self,
        cfg: CfgNode | None = None,
        input_shape: ShapeSpec | None = None,
        *,
        spec: HierarchicalSpec | None = None,
        **kwargs: Any,
    ):
        """Built from ``cfg`` by the registry, from a ``spec`` (e.g. a classification variant's), or from keyword
        arguments (those of ``dinat_kwargs_from_cfg``); keywords override the cfg or the spec."""
        super().__init__()
        kwargs = _merge_kwargs(cfg, kwargs)
        out_features = kwargs.pop("out_features", _STAGE_NAMES)
        frozen_stages = kwargs.pop("frozen_stages", -1)
        trunc_normal_init = kwargs.pop("trunc_normal_init", False)
        na_backend = kwargs.pop("na_backend", None)
        if spec is None:
            for required in ("embed_dim", "depths", "num_heads"):
                if required not in kwargs:
                    raise TypeError(f"the DiNAT backbone needs {required!r} (or a cfg with MODEL.DINAT)")
        self.spec = spec = resolve_spec(spec, kwargs)
        in_chans = input_shape.channels if input_shape is not None and input_shape.channels else 3
        if in_chans != 3:
            raise ValueError(f"the DiNAT backbones take RGB images (3 channels), got {in_chans} input channels")
        self._build_stem(spec, in_chans)
        self._build_stages(spec)
        for i, width in enumerate(spec.widths):
            self.add_module(f"norm{i}", nn.LayerNorm(width))
        self._out_features = list(out_features)
        self._out_feature_strides = {name: 4 * 2**i for i, name in enumerate(_STAGE_NAMES)}
        self._out_feature_channels = {name: spec.widths[i] for i, name in enumerate(_STAGE_NAMES)}
        self.frozen_stages = frozen_stages
        if trunc_normal_init:
            self.apply(init_weights)  # the official D2DiNAT defines this init but never applies it (the default)
        set_na_backend(self, na_backend)
        self._freeze_stages()

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
        outputs = {}
        for i, out in enumerate(self.stage_outputs(self.patch_embed(x))):
            name = _STAGE_NAMES[i]
            if name in self._out_features:
                # NCHW in channels_last memory, the layout the stage computed it in: no copy, and the pixel
                # decoder's convolutions (oneDNN) run faster on it than on contiguous NCHW
                outputs[name] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2)
        return outputs


@BACKBONE_REGISTRY.register()
class D2DiNAT(_HierarchicalNABackbone):
    """DiNAT (ConvTokenizer + 4 levels) as a detectron2 backbone: ``MODEL.BACKBONE.NAME: "D2DiNAT"``."""

    layout = DINAT_LAYOUT


@BACKBONE_REGISTRY.register()
class D2DiNATs(_HierarchicalNABackbone):
    """DiNAT_s (4x4 patch stem + PatchMerging) as a detectron2 backbone: ``MODEL.BACKBONE.NAME: "D2DiNATs"``.

    DiNAT_s has no layer scale: a set ``MODEL.DINAT.LAYER_SCALE`` is an error.
    """

    layout = DINAT_S_LAYOUT
