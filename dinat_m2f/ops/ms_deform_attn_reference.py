"""Multi-scale deformable attention in pure PyTorch (grid_sample): the slow, obviously-right reference.

Each level's value map is sampled with ``F.grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)`` at the normalised locations, and the samples are summed with the attention weights. The
native op (``dinat_m2f.ops.ms_deform_attn``) is tested against this function; the pixel decoder can also run on
it (``MSDeformAttn(impl="pytorch")``), e.g. for FLOP counting or latency comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value [N, S, M, D], spatial_shapes [L, 2] (H, W), sampling_locations [N, Lq, M, L, P, 2] (x, y in [0, 1]),
    attention_weights [N, Lq, M, L, P] -> [N, Lq, M * D]."""
    shapes = [
        (int(h), int(w)) for h, w in (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes)
    ]
    return ms_deform_attn_grid_sample(value, shapes, sampling_locations, attention_weights)


def ms_deform_attn_grid_sample(
    value: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """``ms_deform_attn_reference`` on level shapes given as (H, W) pairs of ints or SymInts, used as they are (the
    export lowering passes the encoder's symbolic shapes: reading them out of a tensor is data-dependent)."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> [N*M, D, Lq, P]
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()
