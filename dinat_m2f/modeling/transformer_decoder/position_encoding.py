"""Sine position encoding of DETR, used by the pixel decoder and the transformer decoder of Mask2Former."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """2D sine/cosine position encoding (DETR): ``num_pos_feats`` channels for y, then as many for x.

    With ``normalize`` the cumulative coordinates are scaled to [0, scale]. The output has no parameters and is
    computed in float32 on the input's device: [B, 2 * num_pos_feats, H, W].
    """

    def __init__(
        self, num_pos_feats: int = 64, temperature: int = 10000, normalize: bool = False, scale: float | None = None
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: normalize must be True when a scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            return self.forward_masked(x, mask)
        # Without a padding mask the encoding of a pixel depends on its row (first half) or its column (second
        # half) only: the sines of the H rows and W columns, broadcast into the map. The same float32 operations on
        # the same values as forward_masked on an all-False mask (the cumulative sum of ones is arange(1, n + 1)),
        # so bit-identical, with H + W instead of H * W sines per channel.
        b, h, w = x.size(0), x.size(2), x.size(3)
        y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=x.device)
        x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=x.device)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[-1:] + eps) * self.scale
            x_embed = x_embed / (x_embed[-1:] + eps) * self.scale
        pos_y = self._sines(y_embed)[:, None, :].expand(h, w, -1)
        pos_x = self._sines(x_embed)[None, :, :].expand(h, w, -1)
        pos = torch.cat((pos_y, pos_x), dim=2)  # [H, W, C]
        return pos.unsqueeze(0).expand(b, -1, -1, -1).contiguous().permute(0, 3, 1, 2)

    def _dim_t(self, device: torch.device) -> torch.Tensor:
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        return self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

    def _sines(self, embed: torch.Tensor) -> torch.Tensor:
        """[..., num_pos_feats]: sin of the even and cos of the odd ``embed / dim_t``, interleaved."""
        pos = embed[..., None] / self._dim_t(embed.device)
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """DETR's formulation: cumulative coordinates of the pixels that ``mask`` [B, H, W] (True = padding)
        leaves."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = self._dim_t(x.device)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
