"""The settings of a NAT / DiNAT model, described once as small frozen dataclasses.

- :class:`LayerSpec`: what every neighborhood-attention layer of a model shares (kernel, MLP ratio, dropouts, ...).
  A new per-model layer option (e.g. the NA backend) is one field here: ``NATLayer`` hands the spec to its parts,
  ``from_kwargs``/``replace`` accept it by name and the detectron2 backbone reads it from ``MODEL.DINAT``.
- :class:`StageSpec`: one level of a hierarchical model (width, heads, per-layer dilations and drop-path rates).
- :class:`HierarchicalSpec`: a DiNAT / NAT / DiNAT_s trunk; :meth:`HierarchicalSpec.stages` derives its stages.
- :class:`IsotropicSpec`: an isotropic (ViT-like) NAT / DiNAT.

``from_kwargs`` and ``replace`` take flat keyword names (``kernel_size=...``, ``drop_path_rate=...``): the model's own
fields and those of its ``layer``, as the model constructors, the variants table and ``MODEL.DINAT`` name them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

__all__ = [
    "HierarchicalSpec",
    "IsotropicSpec",
    "LayerSpec",
    "StageSpec",
    "check_dilations",
    "stochastic_depth_rates",
]

_Spec = TypeVar("_Spec", bound="_FlatKwargs")


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


@dataclass(frozen=True)
class LayerSpec:
    """What every NATLayer of a model shares (defaults: the official NAT/DiNAT ones)."""

    kernel_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0  # dropout after the attention projection and in the MLP
    attn_drop_rate: float = 0.0
    layer_scale: float | None = None  # None: no gamma1/gamma2


@dataclass(frozen=True)
class StageSpec:
    """One level of a hierarchical model: ``len(dilations)`` layers of width ``dim``, then an optional downsampler."""

    dim: int
    num_heads: int
    dilations: tuple[int, ...]
    drop_path: tuple[float, ...]  # one stochastic-depth rate per layer
    downsample: bool

    @property
    def depth(self) -> int:
        return len(self.dilations)


class _FlatKwargs:
    """``from_kwargs`` / ``replace`` with flat keyword names: the dataclass's own fields and its ``layer``'s."""

    layer: LayerSpec

    @classmethod
    def flat_names(cls) -> list[str]:
        own = [f.name for f in dataclasses.fields(cls) if f.name != "layer"]  # type: ignore[arg-type]
        return own + [f.name for f in dataclasses.fields(LayerSpec)]

    @classmethod
    def _split(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        unknown = sorted(set(kwargs) - set(cls.flat_names()))
        if unknown:
            raise TypeError(f"unknown {cls.__name__} setting(s) {unknown}; known: {sorted(cls.flat_names())}")
        layer_names = {f.name for f in dataclasses.fields(LayerSpec)}
        layer = {k: v for k, v in kwargs.items() if k in layer_names}
        own = {k: v for k, v in kwargs.items() if k not in layer_names}
        return own, layer

    @classmethod
    def from_kwargs(cls: type[_Spec], **kwargs: Any) -> _Spec:
        own, layer = cls._split(kwargs)
        return cls(**own, layer=LayerSpec(**layer))  # type: ignore[call-arg]

    def replace(self: _Spec, **kwargs: Any) -> _Spec:
        own, layer = self._split(kwargs)
        return dataclasses.replace(self, **own, layer=dataclasses.replace(self.layer, **layer))  # type: ignore[type-var]


@dataclass(frozen=True)
class HierarchicalSpec(_FlatKwargs):
    """A hierarchical NAT / DiNAT / DiNAT_s trunk: 4 levels, width ``embed_dim * 2**i``, stride ``4 * 2**i``.

    ``dilations`` (per stage, per layer) is checked and stored as tuples; None means every dilation is 1 (NAT).
    """

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    dilations: tuple[tuple[int, ...], ...] | None = None
    drop_path_rate: float = 0.2
    use_checkpoint: bool = False  # activation checkpointing of every layer while training
    layer: LayerSpec = field(default_factory=LayerSpec)

    def __post_init__(self) -> None:
        if len(self.num_heads) != len(self.depths):
            raise ValueError(
                f"NUM_HEADS {list(self.num_heads)} must have one entry per stage of DEPTHS {list(self.depths)}"
            )
        dilations = check_dilations(self.dilations, self.depths)
        # Frozen: normalise through object.__setattr__ (tuples, so that a spec is hashable and cannot be mutated).
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        object.__setattr__(self, "dilations", tuple(tuple(d) for d in dilations))

    def stages(self) -> tuple[StageSpec, ...]:
        """The levels, with stochastic-depth rates rising linearly over all layers; the last has no downsampler."""
        rates = stochastic_depth_rates(self.drop_path_rate, self.depths)
        return tuple(
            StageSpec(
                dim=self.embed_dim * 2**i,
                num_heads=self.num_heads[i],
                dilations=self.dilations[i],
                drop_path=tuple(rates[i]),
                downsample=i < len(self.depths) - 1,
            )
            for i in range(len(self.depths))
        )

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclass(frozen=True)
class IsotropicSpec(_FlatKwargs):
    """An isotropic NAT / DiNAT: ``depth`` layers on the 1/16 map, dilation 1 on even layers, ``dilation`` on odd."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 12
    dilation: int = 2
    drop_path_rate: float = 0.1
    layer: LayerSpec = field(default_factory=LayerSpec)

    def dilations(self) -> tuple[int, ...]:
        return tuple(1 if i % 2 == 0 else self.dilation for i in range(self.depth))
