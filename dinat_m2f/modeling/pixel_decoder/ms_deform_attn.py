"""The multi-scale deformable attention module (Deformable DETR) of the pixel decoder.

It runs on the native op ``torch.ops.dinat_m2f.ms_deform_attn_forward`` (CPU and CUDA kernels) by default; the
grid_sample formulation (``impl="pytorch"``) is there for latency comparisons and FLOP counting. There is no
silent fallback from one to the other.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dinat_m2f.modeling.linear import Linear, linear
from dinat_m2f.ops.ms_deform_attn_reference import ms_deform_attn_reference

IMPLS = ("native", "pytorch")


class MSDeformAttn(nn.Module):
    # run with autocast off (the sampling is float32 at any precision): their weights stay float32
    float32_submodules = ("sampling_offsets", "attention_weights")

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, impl: str = "native"
    ):
        """
        Args:
            d_model: hidden dimension.
            n_levels: number of feature levels.
            n_heads: number of attention heads.
            n_points: sampling points per head and level.
            impl: "native" (the compiled op) or "pytorch" (grid_sample).
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(
                f"MSDeformAttn: d_model / n_heads = {head_dim} is not a power of 2, which is less efficient",
                stacklevel=2,
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl

        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)
        self._reset_parameters()

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"MSDeformAttn: impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # initial offsets: head h looks in direction 2*pi*h/heads, point i at distance i+1
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid_init = grid_init.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, C].
            reference_points: [N, Lq, levels, 2] normalised (x, y), or [N, Lq, levels, 4] boxes (cx, cy, w, h).
            input_flatten: [N, S, C], the levels flattened and concatenated.
            input_spatial_shapes: [levels, 2] int64 (H, W), on the CPU (no device sync) or the features' device.
            input_level_start_index: [levels] int64, on the same device as input_spatial_shapes.
            input_padding_mask: [N, S] bool, True at padding (zeroed in the values).
        Returns: [N, Lq, C].
        """
        N, Len_q, _ = query.shape
        _, Len_in, _ = input_flatten.shape
        # Under autocast (bfloat16 inference) the projections run in its dtype; the sampling (offsets, weights,
        # locations and the op) in float32. Without autocast .float() returns the float32 tensors themselves.
        value = self.value_proj(input_flatten).float()
        with torch.autocast(query.device.type, enabled=False):
            output = self._sample(
                query.float(),
                reference_points,
                value,
                input_spatial_shapes,
                input_level_start_index,
                input_padding_mask,
            )
        return self.output_proj(output)

    def _attention_weights(self, query: torch.Tensor) -> torch.Tensor:
        """Each head's softmax over its levels x points logits: [N, Lq, heads, levels, points].

        The projection's rows are taken in (level, point, head) order, so the softmax runs over a dimension that is
        not the last (ATen's kernel then vectorizes across the heads; on the last dimension, only levels x points = 12
        long, it is 3-4x slower). The probabilities equal the official ``softmax(logits, -1)`` to float32 rounding
        (tested); the view handed back has the official shape and the parameters keep the official layout."""
        N, Len_q, _ = query.shape
        heads, samples = self.n_heads, self.n_levels * self.n_points
        layer = self.attention_weights
        weight = layer.weight.view(heads, samples, -1).transpose(0, 1).reshape(heads * samples, -1)
        bias = layer.bias.view(heads, samples).t().reshape(-1)
        logits = linear(query, weight, bias).view(N, Len_q, samples, heads)
        probs = F.softmax(logits, -2).transpose(-1, -2)
        return probs.view(N, Len_q, heads, self.n_levels, self.n_points)

    @staticmethod
    def _locations_from_points(
        reference_points: torch.Tensor, sampling_offsets: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """The official ``reference + offset / (W, H) of the level`` ([N, Lq, 1, L, 1, 2] + [N, Lq, M, L, P, 2] /
        [L, 2]), the same float32 operations bit for bit, on rows of L * P * 2 numbers: TensorIterator is slow on the
        official broadcast (innermost length 2, the int64 sizes converted per element), 6 ms at 512x512 (2 threads).
        Without autograd one ``addcdiv`` pass computes ``r + o / n`` per element; with it, the division keeps
        autograd's division backward (``grad / n``), so training is unchanged to the bit."""
        N, Len_q, heads, levels, points, _ = sampling_offsets.shape
        # (W, H) of each level in the offsets' dtype: the official type promotion's conversion (exact). The level
        # sizes may live on the CPU (the op reads them there): a host-to-device copy, no device sync.
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        normalizer = normalizer.to(sampling_offsets.device, sampling_offsets.dtype, non_blocking=True)
        normalizer = normalizer[:, None, :].expand(levels, points, 2).reshape(levels * points * 2)
        reference = reference_points[:, :, None, :, None, :].expand(N, Len_q, 1, levels, points, 2)
        reference = reference.reshape(N, Len_q, 1, levels * points * 2)
        offsets = sampling_offsets.view(N, Len_q, heads, levels * points * 2)
        records_grad = torch.is_grad_enabled() and (offsets.requires_grad or reference.requires_grad)
        # A reference of another dtype: the official formula divides in the offsets' dtype and promotes in the sum,
        # which addcdiv (one dtype throughout) would not.
        if records_grad or reference.dtype != offsets.dtype:
            locations = reference + offsets / normalizer
        else:
            locations = torch.addcdiv(reference, offsets, normalizer)
        return locations.view(N, Len_q, heads, levels, points, 2)

    def _sample(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The attention-weighted sum of the projected values ``value`` [N, S, C] at the sampling locations the
        query predicts: [N, Lq, C]."""
        N, Len_q, _ = query.shape
        _, Len_in, _ = value.shape
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(N, Len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self._attention_weights(query)
        if reference_points.shape[-1] == 2:
            sampling_locations = self._locations_from_points(reference_points, sampling_offsets, input_spatial_shapes)
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, got shape {tuple(reference_points.shape)}"
            )
        if self.impl == "native":
            # Imported here: the native op loads dinat_m2f._C, which building the model must not need.
            from dinat_m2f.ops.ms_deform_attn import ms_deform_attn

            output = ms_deform_attn(
                value, input_spatial_shapes, input_level_start_index, sampling_locations, attention_weights
            )
        else:
            output = ms_deform_attn_reference(value, input_spatial_shapes, sampling_locations, attention_weights)
        return output
