"""Standard-op formulations of the two custom ops, swapped in for export (ONNX has no dinat_m2f ops).

- Neighborhood attention: the gather formulation of ``dinat_m2f.ops.reference.na2d`` (index the k*k neighbours,
  einsum, softmax, einsum). Exact semantics of the native kernels (shifted windows, dilation groups, rpb).
- Multi-scale deformable attention: ``F.grid_sample`` per level (bilinear, zero padding, align_corners=False), the
  reference's ``ms_deform_attn_grid_sample`` on the encoder's symbolic level shapes instead of a tensor of shapes
  (reading shapes out of a tensor is data-dependent, which exporters cannot trace with dynamic sizes).

Both are slower than the native kernels and are meant for export only: ``lowered_ops(model)`` is a context manager
that patches the model's modules and restores them on exit.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dinat_m2f.modeling.backbone.na_attention import NeighborhoodAttention2D
from dinat_m2f.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn
from dinat_m2f.modeling.pixel_decoder.msdeformattn import MSDeformAttnTransformerEncoder
from dinat_m2f.ops import reference
from dinat_m2f.ops.ms_deform_attn_reference import ms_deform_attn_grid_sample

__all__ = ["lowered_ops", "ms_deform_attn_grid_sample"]


def _na_attention_gather(self: NeighborhoodAttention2D, qkv):
    """NeighborhoodAttention2D._attention: qkv [B, H, W, 3, heads, D] (the projection output) -> [B, heads, H, W, D]."""
    if self.training and self.attn_drop.p > 0:
        raise RuntimeError("lowered_ops: export a model in eval() mode (attention dropout is active)")
    q, k, v = (t.movedim(3, 1) for t in qkv.unbind(3))
    return reference.na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb.to(q.dtype), scale=self.scale)


def _msda_forward_grid_sample(
    self: MSDeformAttn,
    query,
    reference_points,
    input_flatten,
    input_spatial_shapes,
    input_level_start_index,
    input_padding_mask=None,
):
    shapes = self._lowered_shapes
    if shapes is None:
        raise RuntimeError("lowered_ops: MSDeformAttn called outside its encoder (the level shapes are unknown)")
    n, len_q, _ = query.shape
    _, len_in, _ = input_flatten.shape
    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
        value = value.masked_fill(input_padding_mask[..., None], 0.0)
    value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
    offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
    weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
    weights = F.softmax(weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
    if reference_points.shape[-1] != 2:
        raise RuntimeError("lowered_ops: only the pixel decoder's point references (x, y) are supported")
    # offsets are in pixels of each level: divide by (W, H), built from the symbolic shapes
    normalizer = torch.stack(
        [
            torch.stack([torch.scalar_tensor(w, dtype=offsets.dtype), torch.scalar_tensor(h, dtype=offsets.dtype)])
            for h, w in shapes
        ]
    ).to(offsets.device)
    locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    return self.output_proj(ms_deform_attn_grid_sample(value, shapes, locations, weights))


def _remember_shapes(encoder: MSDeformAttnTransformerEncoder, args, kwargs):
    shapes = kwargs["shapes_list"] if "shapes_list" in kwargs else args[2]
    for module in encoder.modules():
        if isinstance(module, MSDeformAttn):
            module._lowered_shapes = list(shapes)


@contextlib.contextmanager
def lowered_ops(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs NA and deformable attention on standard ops only."""
    patched: list[tuple[nn.Module, str]] = []
    hooks = []
    try:
        for module in model.modules():
            if isinstance(module, NeighborhoodAttention2D):
                module._attention = types.MethodType(_na_attention_gather, module)
                patched.append((module, "_attention"))
            elif isinstance(module, MSDeformAttn):
                module.forward = types.MethodType(_msda_forward_grid_sample, module)
                module._lowered_shapes = None
                patched.append((module, "forward"))
                patched.append((module, "_lowered_shapes"))
            elif isinstance(module, MSDeformAttnTransformerEncoder):
                hooks.append(module.register_forward_pre_hook(_remember_shapes, with_kwargs=True))
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for module, name in patched:
            if name in module.__dict__:
                delattr(module, name)
