"""Python front end of the native multi-scale deformable attention op (torch.ops.dinat_m2f.ms_deform_attn_*).

The C++/CUDA kernels (native/msda/) validate their inputs and compute forward and backward; this module registers
the fake (meta) kernels and the autograd formula through torch.library, so the op works under autograd and
``torch.compile(fullgraph=True)``. Backends: CPU (float32/float64) and CUDA (float32/float64/float16/bfloat16).
``dinat_m2f.ops.ms_deform_attn_reference`` is the grid_sample formulation the op is tested against.
"""

from __future__ import annotations

import torch

from dinat_m2f._ext import load_extension

__all__ = ["ms_deform_attn"]

load_extension()  # registers torch.ops.dinat_m2f.* (raises a clear error when the build is missing)
_OPS = torch.ops.dinat_m2f
if not hasattr(_OPS, "ms_deform_attn_forward"):
    raise ImportError(
        "dinat_m2f._C has no multi-scale deformable attention op (torch.ops.dinat_m2f.ms_deform_attn_forward): "
        "it predates native/msda/. Rebuild it with `make build`."
    )


@torch.library.register_fake("dinat_m2f::ms_deform_attn_forward")
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    torch._check(value.dim() == 4, lambda: f"value must be [N, S, heads, channels], got {tuple(value.shape)}")
    torch._check(
        sampling_locations.dim() == 6,
        lambda: f"sampling_locations must be [N, Lq, heads, levels, points, 2], got {tuple(sampling_locations.shape)}",
    )
    for name, t in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        torch._check(
            t.device == value.device,
            lambda name=name, t=t: (
                f"ms_deform_attn_forward: {name} is on {t.device} but value is on {value.device}; "
                "all inputs must be on one device"
            ),
        )
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.register_fake("dinat_m2f::ms_deform_attn_backward")
def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _OPS.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_loc if needs[3] else None,
        grad_attn if needs[4] else None,
    )


torch.library.register_autograd("dinat_m2f::ms_deform_attn_forward", _backward, setup_context=_setup_context)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention.

    value [N, S, M, D] (S = sum of H*W over levels), spatial_shapes [L, 2] int64 (H, W), level_start_index [L]
    int64, sampling_locations [N, Lq, M, L, P, 2] ((x, y) in [0, 1]; outside points read zeros),
    attention_weights [N, Lq, M, L, P] -> [N, Lq, M * D]. All tensors on one device; floats of one dtype.
    """
    return _OPS.ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
