"""Which input sizes one exported graph covers.

NA pads a feature map whose side is below ``kernel_size * dilation`` (the paper-era behaviour). Whether it pads is
decided in Python, so a graph traced at a size without padding serves every size without padding, and only those:
the dynamic range of an export starts at ``min_unpadded_size``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dinat_m2f.modeling.backbone.na_attention import NeighborhoodAttention2D

__all__ = ["dynamic_image_shapes", "min_unpadded_size"]


def min_unpadded_size(model: nn.Module, probe: int = 256) -> int:
    """The smallest image side (a multiple of the model's size divisibility) at which no NA layer pads."""
    divisibility = max(int(model.size_divisibility), 1)
    probe = math.ceil(probe / divisibility) * divisibility
    needed: list[int] = []

    def record(module: NeighborhoodAttention2D, args):
        stride = probe // args[0].shape[1]  # NA sees [B, H, W, C] at this stride of the image
        needed.append(module.kernel_size * module.dilation * stride)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, NeighborhoodAttention2D)]
    try:
        with torch.no_grad():
            model.backbone(torch.zeros(1, 3, probe, probe, device=model.pixel_mean.device))
    finally:
        for hook in hooks:
            hook.remove()
    size = max(needed, default=divisibility)
    return math.ceil(size / divisibility) * divisibility


def dynamic_image_shapes(model: nn.Module, min_size: int, max_size: int) -> dict:
    """``dynamic_shapes`` for ``MaskFormerCore``: H and W are any multiple of the divisibility in [min, max]."""
    divisibility = max(int(model.size_divisibility), 1)
    if min_size % divisibility or max_size % divisibility or min_size > max_size:
        raise ValueError(
            f"min_size {min_size} and max_size {max_size} must be multiples of the size divisibility {divisibility} "
            "with min_size <= max_size"
        )
    lowest = min_unpadded_size(model)
    if min_size < lowest:
        raise ValueError(
            f"min_size {min_size} is below {lowest}, where NA starts padding feature maps: one graph cannot cover "
            f"both; export with min_size >= {lowest} (or a fixed size below it)"
        )
    h = torch.export.Dim("h", min=min_size // divisibility, max=max_size // divisibility)
    w = torch.export.Dim("w", min=min_size // divisibility, max=max_size // divisibility)
    return {"image": {2: divisibility * h, 3: divisibility * w}}
