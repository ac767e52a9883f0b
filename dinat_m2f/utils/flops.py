"""fvcore FLOP counting for the neighborhood-attention ops, counted the way the NAT/DiNAT papers count them.

fvcore counts one multiply-add as one FLOP. For a query map of ``B*heads*H*W`` positions with head dim ``D`` and
``K = k*k`` neighbours (``K = k`` in 1D), as NATTEN 0.14's fvcore handles did:
- QK (+ RPB): ``B*heads*H*W*(D*K + K)`` (the ``+ K`` only when a bias is given)
- AV:         ``B*heads*H*W*D*K``
- fused na2d: the sum of both.

Usage::

    flops = dinat_flop_count_analysis(model, (images,))
    flops.total()   # FLOPs (MACs) of one forward
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

__all__ = [
    "NA_FLOP_HANDLES",
    "baddbmm_flop",
    "dinat_flop_count_analysis",
    "na_av_flop",
    "na_fused_flop",
    "na_qk_flop",
    "variant_flops",
    "zero_model_for_counting",
]


def _is_none(value: Any) -> bool:
    return isinstance(value.type(), torch._C.NoneType)


def _positions_and_dim(shape: Sequence[int]) -> tuple[int, int]:
    """[B, heads, *spatial, D] -> (B*heads*prod(spatial), D)."""
    return math.prod(shape[:-1]), shape[-1]


def na_qk_flop(inputs: list[Any], outputs: list[Any]) -> int:
    """``na{1,2}d_qk(q, k, rpb, kernel_size, dilation)`` -> [..., K]."""
    positions, head_dim = _positions_and_dim(get_shape(inputs[0]))
    neighbours = get_shape(outputs[0])[-1]
    bias = 0 if _is_none(inputs[2]) else neighbours
    return positions * (head_dim * neighbours + bias)


def na_av_flop(inputs: list[Any], outputs: list[Any]) -> int:
    """``na{1,2}d_av(attn, v, kernel_size, dilation)`` -> [..., D]."""
    neighbours = get_shape(inputs[0])[-1]
    positions, head_dim = _positions_and_dim(get_shape(outputs[0]))
    return positions * head_dim * neighbours


def _fused_handle(spatial_dims: int) -> Callable[[list[Any], list[Any]], int]:
    def na_fused_flop(inputs: list[Any], outputs: list[Any]) -> int:
        """``na{n}d_fused_forward(q, k, v, rpb, kernel_size, dilation, scale)``: QK (+RPB) and AV."""
        positions, head_dim = _positions_and_dim(get_shape(inputs[0]))
        neighbours = inputs[4].toIValue() ** spatial_dims
        bias = 0 if _is_none(inputs[3]) else neighbours
        return positions * (2 * head_dim * neighbours + bias)

    return na_fused_flop


na_fused_flop = _fused_handle(2)


def _packed_fused_handle(spatial_dims: int) -> Callable[[list[Any], list[Any]], int]:
    def na_qkv_fused_flop(inputs: list[Any], outputs: list[Any]) -> int:
        """``na{n}d_qkv_fused_forward(qkv [B, *spatial, 3, heads, D], rpb, kernel_size, dilation, scale)``: as the
        fused op on q, k, v = qkv[..., i, :, :]."""
        shape = get_shape(inputs[0])
        positions, head_dim = math.prod(shape[:-1]) // 3, shape[-1]
        neighbours = inputs[2].toIValue() ** spatial_dims
        bias = 0 if _is_none(inputs[1]) else neighbours
        return positions * (2 * head_dim * neighbours + bias)

    return na_qkv_fused_flop


def baddbmm_flop(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::baddbmm(input, batch1 [b, n, c], batch2 [b, c, m])``: b*n*c*m, as fvcore counts ``bmm``.

    Recent ``nn.MultiheadAttention`` computes its scores with baddbmm (PyTorch 1.9, used by the papers, used bmm).
    """
    b, n, c = get_shape(inputs[1])
    return b * n * c * get_shape(inputs[2])[-1]


NA_FLOP_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "dinat_m2f::na1d_qk": na_qk_flop,
    "dinat_m2f::na2d_qk": na_qk_flop,
    "dinat_m2f::na1d_av": na_av_flop,
    "dinat_m2f::na2d_av": na_av_flop,
    "dinat_m2f::na1d_fused_forward": _fused_handle(1),
    "dinat_m2f::na2d_fused_forward": na_fused_flop,
    "dinat_m2f::na1d_qkv_fused_forward": _packed_fused_handle(1),
    "dinat_m2f::na2d_qkv_fused_forward": _packed_fused_handle(2),
    "dinat_m2f::na1d_fused_forward_with_attn": _fused_handle(1),  # same arguments, also returns the weights
    "dinat_m2f::na2d_fused_forward_with_attn": na_fused_flop,
    "dinat_m2f::na1d_qkv_fused_forward_with_attn": _packed_fused_handle(1),  # training on the CPU
    "dinat_m2f::na2d_qkv_fused_forward_with_attn": _packed_fused_handle(2),
    "dinat_m2f::na1d_triton_forward": _fused_handle(1),  # same arguments as the native fused op
    "dinat_m2f::na2d_triton_forward": na_fused_flop,
    "aten::baddbmm": baddbmm_flop,
}


def dinat_flop_count_analysis(model: torch.nn.Module, inputs: Any) -> FlopCountAnalysis:
    """An fvcore ``FlopCountAnalysis`` that also counts our neighborhood-attention ops."""
    return FlopCountAnalysis(model, inputs).set_op_handle(**NA_FLOP_HANDLES)


def zero_model_for_counting(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model on the meta device (no init cost) and materialize it on CPU filled with zeros, in eval mode.

    FLOPs depend only on shapes; this skips the (slow, for 200M-parameter models) random init. Zeros rather than
    uninitialized memory, so that no NaN / denormal slows the trace down.
    """
    with torch.device("meta"):
        model = build()
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    return model


def variant_flops(name: str, input_size: tuple[int, int] | None = None) -> tuple[int, int, tuple[int, int]]:
    """(parameters, FLOPs of one image, input size) of a classification variant (at its own size by default)."""
    from dinat_m2f.modeling.backbone.variants import VARIANTS, build_variant

    model = zero_model_for_counting(lambda: build_variant(name))  # build_variant rejects an unknown name
    size = tuple(input_size) if input_size else (VARIANTS[name].input_size,) * 2
    flops = dinat_flop_count_analysis(model, (torch.zeros(1, 3, *size),))
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        total = flops.total()
    return sum(p.numel() for p in model.parameters()), total, size
