"""Python front end of the native multi-scale deformable attention op (torch.ops.dinat_m2f.ms_deform_attn_*).

The C++/CUDA kernels (native/msda/) are registered per device and validate their inputs. This module adds what
torch.compile and autograd need: fake (meta) kernels and the backward formula, both registered through torch.library,
so a module using the op compiles with fullgraph=True. Backends: CPU (float32/float64) and CUDA
(float32/float64/float16/bfloat16). ``dinat_m2f.ops.ms_deform_attn_reference`` is the grid_sample formulation the op
is tested against.
"""

from __future__ import annotations

import torch

from dinat_m2f._ext import load_extension
from dinat_m2f.ops._checks import c10_dtype, require, shape_text

__all__ = ["ms_deform_attn"]

load_extension()  # registers torch.ops.dinat_m2f.* (raises a clear error when the build is missing)
_OPS = torch.ops.dinat_m2f
if not hasattr(_OPS, "ms_deform_attn_forward"):
    raise ImportError(
        "dinat_m2f._C has no multi-scale deformable attention op (torch.ops.dinat_m2f.ms_deform_attn_forward): "
        "it predates native/msda/. Rebuild it with `make build`."
    )


# ----------------------------------------------------------------------------------------------- fake kernels
# The fake (meta) kernels refuse what the native entry points refuse (native/msda/ms_deform_attn_ops.cpp), with the
# same messages, as far as tensor metadata tells: the level sizes inside spatial_shapes are data, checked only by the
# real kernels.

_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
_DTYPES["meta"] = _DTYPES["cuda"]  # plain meta tensors (shape inference): whatever some device supports
_DTYPE_TEXT = {
    "cpu": "the CPU kernel supports float32 and float64, got {} (under autocast, run the deformable attention in "
    "float32)",
    "cuda": "the CUDA kernel supports float32, float64, float16 and bfloat16, got {}",
}


def _check_inputs(
    op: str,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor | None = None,
) -> None:
    require(value.dim() == 4, op, f"value must be [N, S, heads, channels], got shape {shape_text(value)}")
    require(
        spatial_shapes.dim() == 2 and spatial_shapes.shape[1] == 2,
        op,
        f"spatial_shapes must be [levels, 2] (H, W per level), got shape {shape_text(spatial_shapes)}",
    )
    levels = spatial_shapes.shape[0]
    require(
        level_start_index.dim() == 1 and level_start_index.shape[0] == levels,
        op,
        f"level_start_index must be [levels] with levels = {levels}, got shape {shape_text(level_start_index)}",
    )
    require(
        sampling_locations.dim() == 6 and sampling_locations.shape[5] == 2,
        op,
        f"sampling_locations must be [N, queries, heads, levels, points, 2], got shape {shape_text(sampling_locations)}",
    )
    require(
        attention_weights.dim() == 5,
        op,
        f"attention_weights must be [N, queries, heads, levels, points], got shape {shape_text(attention_weights)}",
    )
    require(value.dtype.is_floating_point, op, f"value must be a floating tensor, got {c10_dtype(value.dtype)}")
    device = value.device.type
    require(device in _DTYPES, op, f"value must be a CPU or CUDA tensor, got device {value.device}")
    if device != "meta":
        require(value.dtype in _DTYPES[device], op, _DTYPE_TEXT[device].format(c10_dtype(value.dtype)))
    require(levels > 0, op, "spatial_shapes must name at least one level")

    n, _, heads, channels = value.shape
    queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    expected_loc = (n, queries, heads, levels, points, 2)
    require(
        sampling_locations.shape == expected_loc,
        op,
        f"sampling_locations has shape {shape_text(sampling_locations)} but value (N={n}, heads={heads}) and "
        f"spatial_shapes (levels={levels}) require {list(expected_loc)}",
    )
    require(
        attention_weights.shape == expected_loc[:-1],
        op,
        f"attention_weights has shape {shape_text(attention_weights)} but sampling_locations requires "
        f"{list(expected_loc[:-1])}",
    )
    floats = [("sampling_locations", sampling_locations), ("attention_weights", attention_weights)]
    for name, t in floats:
        _check_float_tensor(op, name, t, value)
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        require(t.dtype == torch.int64, op, f"{name} must be int64, got {c10_dtype(t.dtype)}")
        require(
            t.device == value.device or t.device.type == "cpu",
            op,
            f"{name} is on {t.device} but value is on {value.device}; all inputs must be on one device ({name} may "
            "also be on the CPU)",
        )
    if grad_output is not None:
        expected_grad = (n, queries, heads * channels)
        require(
            grad_output.shape == expected_grad,
            op,
            f"grad_output has shape {shape_text(grad_output)}, expected {list(expected_grad)}",
        )
        _check_float_tensor(op, "grad_output", grad_output, value)


def _check_float_tensor(op: str, name: str, t: torch.Tensor, value: torch.Tensor) -> None:
    require(
        t.dtype == value.dtype,
        op,
        f"{name} has dtype {c10_dtype(t.dtype)} but value has dtype {c10_dtype(value.dtype)}; all floating inputs must share one dtype",
    )
    require(
        t.device == value.device,
        op,
        f"{name} is on {t.device} but value is on {value.device}; all inputs must be on one device",
    )


@torch.library.register_fake("dinat_m2f::ms_deform_attn_forward")
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check_inputs(
        "ms_deform_attn_forward", value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    n, _, heads, channels = value.shape
    return value.new_empty((n, sampling_locations.shape[1], heads * channels))


@torch.library.register_fake("dinat_m2f::ms_deform_attn_backward")
def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    _check_inputs(
        "ms_deform_attn_backward",
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        grad_output,
    )
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


# ----------------------------------------------------------------------------------------------- autograd


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


def _double_backward(ctx, *grads):
    raise NotImplementedError(
        "double backward of ms_deform_attn is not supported; use ms_deform_attn_reference for higher-order gradients"
    )


def _backward_setup_context(ctx, inputs, output):
    pass


torch.library.register_autograd("dinat_m2f::ms_deform_attn_forward", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "dinat_m2f::ms_deform_attn_backward", _double_backward, setup_context=_backward_setup_context
)


# ----------------------------------------------------------------------------------------------- public API


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
    attention_weights [N, Lq, M, L, P] -> [N, Lq, M * D]. Floats of one dtype on one device. spatial_shapes and
    level_start_index may stay on the CPU when value is on CUDA: the op checks them on the host, and CUDA copies of
    them would make every call wait for the device to read them back.
    """
    return _OPS.ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
