"""Python front end of the native neighborhood-attention ops (torch.ops.dinat_m2f.na*).

The C++/CUDA kernels (native/na/) are registered per device (native/cpu_registration.cpp,
native/cuda_registration.cpp) under the schemas of native/include/dinat_m2f/op_schemas.h, and validate their inputs.
This module adds what torch.compile and autograd need: fake (meta) kernels, which refuse what the kernels refuse, and
backward formulas, both registered through torch.library, so a module using these ops compiles with fullgraph=True.

Backward of the unfused ops reuses NATTEN's three primitives (spec 1.4):
- QK (pointwise-neighborhood): grad_q = AV(grad_attn, k), grad_k = inverse(grad_attn, q), grad_rpb = rpb_grad(grad_attn)
- AV (neighborhood-neighborhood): grad_attn = QK(grad_out, v), grad_v = inverse(attn, grad_out)
The fused ops store the row logsumexp and recompute the weights in their own backward kernel. In training on the CPU
the fused forward instead saves the normalized weights (``na*d_fused_forward_with_attn``, what the unfused pair stores
too) and its backward reads them (``na*d_fused_backward_with_attn``): one window product fewer than recomputing.

Layouts: the CPU kernels read q, k, v (and weights, grad_out, out) with any strides whose last dim is unit-stride,
and allocate token-shaped outputs in the memory order of their token input (_empty_in_order_of, the rule of the C++
entry points), so heads-last views stay heads-last. na{1,2}d_qkv_fused_forward / _backward take the packed qkv
projection output itself ([B, *spatial, 3, heads, D]) and return the gradient of qkv as one buffer: the backbone's
attention then makes no layout copies (ops.na2d_qkv).

The public functions at the end dispatch on ``backend=`` (dinat_m2f.ops.backends): the native ops here, the Triton
kernels (dinat_m2f.ops.na_triton) or the pure-PyTorch reference. The registrations above run when the extension is
loaded (_register_native), so this module imports without it.
"""

from __future__ import annotations

import functools
import math

import torch

from dinat_m2f.ops import reference
from dinat_m2f.ops._checks import c10_dtype, require, shape_text
from dinat_m2f.ops.backends import resolve_backend

__all__ = ["na1d", "na1d_av", "na1d_qk", "na1d_qkv", "na2d", "na2d_av", "na2d_qk", "na2d_qkv"]

# Importing this module needs no compiled extension: resolving the native backend loads it (dinat_m2f.ops.backends
# calls load_extension, which raises the clear rebuild error when _C is missing and runs _register_native).
_OPS = torch.ops.dinat_m2f


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rpb_width(kernel_size: int) -> int:
    return 2 * kernel_size - 1


# ----------------------------------------------------------------------------------------------- fake kernels
# The fake (meta) kernels refuse what the native entry points refuse (native/na/na_ops.cpp), with the same messages:
# otherwise a mixed-device call that lands on the Meta key, or a traced call, would return uninitialised memory for
# inputs the real kernels reject. Sizes may be symbolic, so size conditions go through torch._check.

_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
_DTYPES["meta"] = _DTYPES["cuda"]  # plain meta tensors (shape inference): whatever some device supports
_DTYPE_TEXT = {
    "cpu": "CPU kernels support float32, float64 and bfloat16",
    "cuda": "CUDA kernels support float32, float64, float16 and bfloat16",
}


def _check_kernel_and_dilation(op: str, kernel_size: int, dilation: int) -> None:
    require(
        kernel_size > 1 and kernel_size % 2 == 1,
        op,
        f"kernel_size must be an odd integer greater than 1, got {kernel_size}.",
    )
    require(dilation >= 1, op, f"dilation must be an integer >= 1, got {dilation}.")


def _check_device_and_dtype(op: str, t: torch.Tensor, name: str) -> None:
    device = t.device.type
    require(device in _DTYPES, op, f"{name} must be a CPU or CUDA tensor, got device {t.device}.")
    require(t.layout == torch.strided, op, f"{name} must be a dense (strided) tensor.")
    if device != "meta":
        require(t.dtype in _DTYPES[device], op, f"{_DTYPE_TEXT[device]}, but {name} has dtype {c10_dtype(t.dtype)}.")


def _check_same(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    require(
        t.device == ref.device,
        op,
        f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on the same device.",
    )
    require(
        t.dtype == ref.dtype,
        op,
        f"{name} has dtype {c10_dtype(t.dtype)} but {ref_name} has dtype {c10_dtype(ref.dtype)}; "
        "all inputs must have the same dtype.",
    )


def _check_tokens(op: str, dims: int, t: torch.Tensor, name: str, kernel_size: int, dilation: int) -> None:
    _check_kernel_and_dilation(op, kernel_size, dilation)
    _check_device_and_dtype(op, t, name)
    layout = "[B, heads, H, W, D]" if dims == 2 else "[B, heads, L, D]"
    require(t.dim() == dims + 3, op, f"{name} must be a {dims + 3}-D tensor {layout}, got shape {shape_text(t)}.")
    for axis, axis_name in zip(range(dims), ("H", "W") if dims == 2 else ("L",)):
        size = t.shape[2 + axis]
        require(
            size >= kernel_size * dilation,
            op,
            f"the {axis_name} axis of {name} has size {size}, smaller than kernel_size * dilation = {kernel_size} "
            f"* {dilation} = {kernel_size * dilation}. Each spatial axis must be at least kernel_size * dilation.",
        )


def _check_sameshape_text(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    _check_same(op, t, name, ref, ref_name)
    require(
        t.shape == ref.shape, op, f"{name} must have the shape of {ref_name} {shape_text(ref)}, got {shape_text(t)}."
    )


def _check_weights(
    op: str, dims: int, w: torch.Tensor, name: str, tokens: torch.Tensor, tokens_name: str, kernel_size: int
) -> None:
    _check_same(op, w, name, tokens, tokens_name)
    window = kernel_size**dims
    require(w.dim() == tokens.dim(), op, f"{name} must be a {tokens.dim()}-D tensor, got shape {shape_text(w)}.")
    what = "kernel_size**2" if dims == 2 else "kernel_size"
    require(
        w.shape[-1] == window,
        op,
        f"the last dimension of {name} must be the window size {what} = {window}, got {w.shape[-1]}.",
    )
    require(
        w.shape[:-1] == tokens.shape[:-1],
        op,
        f"{name} has shape {shape_text(w)} but {tokens_name} has shape {shape_text(tokens)}; they must agree in every "
        "dimension but the last.",
    )


def _check_rpb(op: str, dims: int, rpb: torch.Tensor | None, q: torch.Tensor, kernel_size: int) -> None:
    if rpb is None:
        return
    _check_same(op, rpb, "rpb", q, "q")
    want = (q.shape[1],) + (_rpb_width(kernel_size),) * dims
    require(
        rpb.shape == want,
        op,
        f"rpb must have shape [heads, {', '.join(['2k-1'] * dims)}] = [{', '.join(str(s) for s in want)}], "
        f"got {shape_text(rpb)}.",
    )


def _memory_order(t: torch.Tensor) -> list[int]:
    """t's dims from the outermost in memory to the innermost: the outer ones by decreasing stride (stable), then the
    last dim."""
    outer = sorted(range(t.dim() - 1), key=lambda d: -t.stride(d))  # sorted() is stable
    return [*outer, t.dim() - 1]


def _empty_in_order_of(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """New tensor of ``shape`` laid out like the native entry points' outputs (empty_in_order_of in
    native/na/na_ops.cpp): outer dims in the memory order of ``like``'s strides, largest first (stable), the last dim
    innermost. A heads-last q gives a heads-last output; a contiguous one a contiguous output."""
    order = _memory_order(like)
    physical = like.new_empty([shape[d] for d in order], dtype=dtype)
    return physical.permute([order.index(d) for d in range(like.dim())])


def _unpack_qkv(op: str, dims: int, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v views [B, heads, *spatial, D] of a packed qkv [B, *spatial, 3, heads, D] (unpack_qkv in na_ops.cpp)."""
    layout = "[B, H, W, 3, heads, D]" if dims == 2 else "[B, L, 3, heads, D]"
    packed = dims + 1
    # A plain branch, the message built only on failure: this runs under torch.compile (symbolic sizes; a
    # torch._check message closure over qkv would break the graph). Under torch.jit.trace (fvcore) sizes are traced
    # tensors: the native op checks the size there.
    if qkv.dim() != dims + 4 or not (torch.jit.is_tracing() or qkv.shape[packed] == 3):
        raise RuntimeError(
            f"{op}: qkv must be a {dims + 4}-D tensor {layout} (the qkv projection output viewed per head), got shape "
            f"{shape_text(qkv)}."
        )
    # One unbind, not three selects: its backward (where autograd goes through these views: other backends, the dense
    # path) is one stack into a qkv-sized gradient instead of three zero-filled ones summed.
    q, k, v = (t.movedim(packed, 1) for t in qkv.unbind(packed))
    return q, k, v


def _check_qkv(op: str, dims: int, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device_and_dtype(op, qkv, "qkv")
    return _unpack_qkv(op, dims, qkv)


def _register_fakes(dim: int) -> None:
    p = f"dinat_m2f::na{dim}d"
    name = f"na{dim}d"

    @torch.library.register_fake(f"{p}_qk")
    def _qk(q, k, rpb, kernel_size, dilation):
        op = f"{name}_qk"
        _check_tokens(op, dim, q, "q", kernel_size, dilation)
        _check_sameshape_text(op, k, "k", q, "q")
        _check_rpb(op, dim, rpb, q, kernel_size)
        return _empty_in_order_of((*q.shape[:-1], kernel_size**dim), q)

    @torch.library.register_fake(f"{p}_av")
    def _av(attn, v, kernel_size, dilation):
        op = f"{name}_av"
        _check_tokens(op, dim, v, "v", kernel_size, dilation)
        _check_weights(op, dim, attn, "attn", v, "v", kernel_size)
        return _empty_in_order_of(v.shape, v)

    @torch.library.register_fake(f"{p}_inverse")
    def _inverse(weights, x, kernel_size, dilation):
        op = f"{name}_inverse"
        _check_tokens(op, dim, x, "x", kernel_size, dilation)
        _check_weights(op, dim, weights, "weights", x, "x", kernel_size)
        return _empty_in_order_of(x.shape, x)

    @torch.library.register_fake(f"{p}_rpb_grad")
    def _rpb_grad(grad_attn, kernel_size, dilation):
        op = f"{name}_rpb_grad"
        _check_kernel_and_dilation(op, kernel_size, dilation)
        _check_device_and_dtype(op, grad_attn, "grad_attn")
        require(
            grad_attn.dim() == dim + 3,
            op,
            f"grad_attn must be a {dim + 3}-D tensor, got shape {shape_text(grad_attn)}.",
        )
        _check_tokens(op, dim, grad_attn[..., :1], "grad_attn", kernel_size, dilation)
        require(
            grad_attn.shape[-1] == kernel_size**dim,
            op,
            f"the last dimension of grad_attn must be the window size {kernel_size**dim}, got {grad_attn.shape[-1]}.",
        )
        return grad_attn.new_empty((grad_attn.shape[1],) + (_rpb_width(kernel_size),) * dim)

    def fused_forward(op, q, k, v, rpb, kernel_size, dilation):
        _check_tokens(op, dim, q, "q", kernel_size, dilation)
        _check_sameshape_text(op, k, "k", q, "q")
        _check_sameshape_text(op, v, "v", q, "q")
        _check_rpb(op, dim, rpb, q, kernel_size)
        return _empty_in_order_of(q.shape, q), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake(f"{p}_fused_forward")
    def _fused_forward(q, k, v, rpb, kernel_size, dilation, scale):
        return fused_forward(name, q, k, v, rpb, kernel_size, dilation)

    @torch.library.register_fake(f"{p}_qkv_fused_forward")
    def _qkv_fused_forward(qkv, rpb, kernel_size, dilation, scale):
        op = f"{name}_qkv"
        return fused_forward(op, *_check_qkv(op, dim, qkv), rpb, kernel_size, dilation)

    def check_fused_backward(op, grad_out, q, k, v, rpb, out, lse, kernel_size, dilation):
        _check_tokens(op, dim, q, "q", kernel_size, dilation)
        for t, t_name in ((k, "k"), (v, "v"), (out, "out"), (grad_out, "grad_out")):
            _check_sameshape_text(op, t, t_name, q, "q")
        _check_rpb(op, dim, rpb, q, kernel_size)
        lse_dtype = _lse_dtype(q.dtype)
        require(
            lse.dtype == lse_dtype and lse.device == q.device and lse.shape == q.shape[:-1],
            op,
            f"lse must be a {c10_dtype(lse_dtype)} tensor of shape q.shape[:-1] on q's device, got "
            f"{c10_dtype(lse.dtype)} {shape_text(lse)} on {lse.device}.",
        )
        return rpb.new_empty(rpb.shape) if rpb is not None else q.new_empty((0,))

    @torch.library.register_fake(f"{p}_fused_backward")
    def _fused_backward(grad_out, q, k, v, rpb, out, lse, kernel_size, dilation, scale):
        op = f"{name}_fused_backward"
        grad_rpb = check_fused_backward(op, grad_out, q, k, v, rpb, out, lse, kernel_size, dilation)
        grads = (_empty_in_order_of(t.shape, t) for t in (q, k, v))
        return *grads, grad_rpb

    @torch.library.register_fake(f"{p}_qkv_fused_backward")
    def _qkv_fused_backward(grad_out, qkv, rpb, out, lse, kernel_size, dilation, scale):
        op = f"{name}_qkv_fused_backward"
        q, k, v = _check_qkv(op, dim, qkv)
        grad_rpb = check_fused_backward(op, grad_out, q, k, v, rpb, out, lse, kernel_size, dilation)
        return qkv.new_empty(qkv.shape), grad_rpb

    @torch.library.register_fake(f"{p}_fused_forward_with_attn")
    def _fused_forward_with_attn(q, k, v, rpb, kernel_size, dilation, scale):
        out, _ = _fused_forward(q, k, v, rpb, kernel_size, dilation, scale)
        return out, q.new_empty((*q.shape[:-1], kernel_size**dim), dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake(f"{p}_fused_backward_with_attn")
    def _fused_backward_with_attn(grad_out, q, k, v, rpb, out, attn, kernel_size, dilation, scale):
        op = f"{name}_fused_backward_with_attn"
        grad_rpb = check_backward_with_attn(op, grad_out, q, k, v, rpb, out, attn, kernel_size, dilation)
        return _empty_in_order_of(q.shape, q), _empty_in_order_of(k.shape, k), _empty_in_order_of(v.shape, v), grad_rpb

    @torch.library.register_fake(f"{p}_qkv_fused_forward_with_attn")
    def _qkv_fused_forward_with_attn(qkv, rpb, kernel_size, dilation, scale):
        op = f"{name}_qkv"
        q, k, v = _check_qkv(op, dim, qkv)
        out, _ = fused_forward(op, q, k, v, rpb, kernel_size, dilation)
        return out, q.new_empty((*q.shape[:-1], kernel_size**dim), dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake(f"{p}_qkv_fused_backward_with_attn")
    def _qkv_fused_backward_with_attn(grad_out, qkv, rpb, out, attn, kernel_size, dilation, scale):
        op = f"{name}_qkv_fused_backward_with_attn"
        q, k, v = _check_qkv(op, dim, qkv)
        grad_rpb = check_backward_with_attn(op, grad_out, q, k, v, rpb, out, attn, kernel_size, dilation)
        return qkv.new_empty(qkv.shape), grad_rpb

    def check_backward_with_attn(op, grad_out, q, k, v, rpb, out, attn, kernel_size, dilation):
        _check_tokens(op, dim, q, "q", kernel_size, dilation)
        for t, t_name in ((k, "k"), (v, "v"), (out, "out"), (grad_out, "grad_out")):
            _check_sameshape_text(op, t, t_name, q, "q")
        _check_rpb(op, dim, rpb, q, kernel_size)
        attn_dtype = _lse_dtype(q.dtype)
        require(
            attn.dtype == attn_dtype and attn.device == q.device and attn.shape == (*q.shape[:-1], kernel_size**dim),
            op,
            f"attn must be a {c10_dtype(attn_dtype)} tensor of shape [*q.shape[:-1], window] on q's device (the "
            f"weights the forward saved), got {c10_dtype(attn.dtype)} {shape_text(attn)} on {attn.device}.",
        )
        return rpb.new_empty(rpb.shape) if rpb is not None else q.new_empty((0,))


# ----------------------------------------------------------------------------------------------- autograd


def _register_autograd(dim: int) -> None:
    qk_op = getattr(_OPS, f"na{dim}d_qk")
    av_op = getattr(_OPS, f"na{dim}d_av")
    inverse_op = getattr(_OPS, f"na{dim}d_inverse")
    rpb_grad_op = getattr(_OPS, f"na{dim}d_rpb_grad")
    fused_backward_op = getattr(_OPS, f"na{dim}d_fused_backward")
    qkv_fused_backward_op = getattr(_OPS, f"na{dim}d_qkv_fused_backward")
    fused_backward_with_attn_op = getattr(_OPS, f"na{dim}d_fused_backward_with_attn")
    qkv_fused_backward_with_attn_op = getattr(_OPS, f"na{dim}d_qkv_fused_backward_with_attn")
    p = f"dinat_m2f::na{dim}d"

    def qk_setup(ctx, inputs, output):
        q, k, rpb, kernel_size, dilation = inputs
        ctx.save_for_backward(q, k)
        ctx.kernel_size, ctx.dilation = kernel_size, dilation
        ctx.has_rpb = rpb is not None

    def qk_backward(ctx, grad_attn):
        q, k = ctx.saved_tensors
        ks, dil = ctx.kernel_size, ctx.dilation
        grad_q = av_op(grad_attn, k, ks, dil) if ctx.needs_input_grad[0] else None
        grad_k = inverse_op(grad_attn, q, ks, dil) if ctx.needs_input_grad[1] else None
        grad_rpb = rpb_grad_op(grad_attn, ks, dil) if ctx.has_rpb and ctx.needs_input_grad[2] else None
        return grad_q, grad_k, grad_rpb, None, None

    def pair_setup(ctx, inputs, output):
        # av(attn, v) and inverse(weights, x): two tensors and the window parameters.
        first, second, kernel_size, dilation = inputs
        ctx.save_for_backward(first, second)
        ctx.kernel_size, ctx.dilation = kernel_size, dilation

    def av_backward(ctx, grad_out):
        attn, v = ctx.saved_tensors
        ks, dil = ctx.kernel_size, ctx.dilation
        grad_attn = qk_op(grad_out, v, None, ks, dil) if ctx.needs_input_grad[0] else None
        grad_v = inverse_op(attn, grad_out, ks, dil) if ctx.needs_input_grad[1] else None
        return grad_attn, grad_v, None, None

    def fused_autograd(backward_op):
        """setup_context and backward of a fused forward op whose inputs are (*tokens, rpb, kernel_size, dilation,
        scale) -- tokens: q, k, v or the packed qkv -- and whose outputs are (out, what its backward reads: the row
        logsumexp or the saved weights); ``backward_op(grad_out, *tokens, rpb, out, saved, ...)`` returns the tokens'
        gradients (a packed qkv gets one buffer of its shape: no stack of three) and the bias gradient."""

        def setup(ctx, inputs, output):
            *tokens, rpb, kernel_size, dilation, scale = inputs
            ctx.save_for_backward(*tokens, rpb, *output)
            ctx.kernel_size, ctx.dilation, ctx.scale = kernel_size, dilation, scale
            ctx.num_inputs = len(inputs)
            # The saved output (logsumexp or weights) is the backward's state, not differentiable (it requires no
            # grad), and its gradient is never materialised as zeros of its shape: for the saved weights'
            # [B, heads, H, W, window] that fill was 13% of the backward at 1x4x56x56 k7 d8.
            ctx.mark_non_differentiable(output[1])
            ctx.set_materialize_grads(False)

        def backward(ctx, grad_out, _grad_saved):
            if grad_out is None:  # nothing used the output
                return (None,) * ctx.num_inputs
            *tokens, rpb, out, saved = ctx.saved_tensors
            *token_grads, grad_rpb = backward_op(
                grad_out, *tokens, rpb, out, saved, ctx.kernel_size, ctx.dilation, ctx.scale
            )
            return *token_grads, (grad_rpb if rpb is not None else None), None, None, None

        return setup, backward

    # inverse(w, x) is bilinear and rpb_grad linear: their gradients are again NA primitives, so the unfused ops
    # support double backward.
    def inverse_backward(ctx, grad_out):
        weights, x = ctx.saved_tensors
        ks, dil = ctx.kernel_size, ctx.dilation
        grad_w = qk_op(x, grad_out, None, ks, dil) if ctx.needs_input_grad[0] else None
        grad_x = av_op(weights, grad_out, ks, dil) if ctx.needs_input_grad[1] else None
        return grad_w, grad_x, None, None

    def rpb_grad_setup(ctx, inputs, output):
        grad_attn, kernel_size, dilation = inputs
        ctx.token_shape = (*grad_attn.shape[:-1], 1)
        ctx.kernel_size, ctx.dilation = kernel_size, dilation

    def rpb_grad_backward(ctx, grad_rpb):
        # The adjoint of summing per bias index is broadcasting the bias: QK of zero tokens plus the bias.
        zeros = grad_rpb.new_zeros(ctx.token_shape)
        return qk_op(zeros, zeros, grad_rpb, ctx.kernel_size, ctx.dilation), None, None

    def fused_double_backward(ctx, *grads):
        raise NotImplementedError(
            f"double backward of the fused na{dim}d is not supported; compose na{dim}d_qk, softmax and na{dim}d_av "
            "for higher-order gradients"
        )

    def fused_backward_setup(ctx, inputs, output):
        pass

    torch.library.register_autograd(f"{p}_inverse", inverse_backward, setup_context=pair_setup)
    torch.library.register_autograd(f"{p}_rpb_grad", rpb_grad_backward, setup_context=rpb_grad_setup)
    torch.library.register_autograd(f"{p}_fused_backward", fused_double_backward, setup_context=fused_backward_setup)
    torch.library.register_autograd(
        f"{p}_qkv_fused_backward", fused_double_backward, setup_context=fused_backward_setup
    )
    torch.library.register_autograd(f"{p}_qk", qk_backward, setup_context=qk_setup)
    torch.library.register_autograd(f"{p}_av", av_backward, setup_context=pair_setup)
    setup, backward = fused_autograd(fused_backward_op)
    torch.library.register_autograd(f"{p}_fused_forward", backward, setup_context=setup)
    setup, backward = fused_autograd(qkv_fused_backward_op)
    torch.library.register_autograd(f"{p}_qkv_fused_forward", backward, setup_context=setup)
    torch.library.register_autograd(
        f"{p}_fused_backward_with_attn", fused_double_backward, setup_context=fused_backward_setup
    )
    setup, backward = fused_autograd(fused_backward_with_attn_op)
    torch.library.register_autograd(f"{p}_fused_forward_with_attn", backward, setup_context=setup)
    torch.library.register_autograd(
        f"{p}_qkv_fused_backward_with_attn", fused_double_backward, setup_context=fused_backward_setup
    )
    setup, backward = fused_autograd(qkv_fused_backward_with_attn_op)
    torch.library.register_autograd(f"{p}_qkv_fused_forward_with_attn", backward, setup_context=setup)


@functools.cache
def _register_native() -> None:
    """Fake kernels and autograd of torch.ops.dinat_m2f.na*; called by load_extension once _C is loaded."""
    if not hasattr(_OPS, "na2d_fused_forward"):
        raise ImportError(
            "dinat_m2f._C has no neighborhood-attention ops (torch.ops.dinat_m2f.na2d_*): it predates native/na/. "
            "Rebuild it with `make build`."
        )
    for dim in (1, 2):
        _register_fakes(dim)
        _register_autograd(dim)


# ----------------------------------------------------------------------------------------------- public API
# backend: "native" | "triton" (fused na1d/na2d only) | "reference" | None (DINAT_M2F_NA_BACKEND, else the default
# for the device and dtype); see dinat_m2f.ops.backends.


def _scale(name: str, q: torch.Tensor, scale: float | None) -> float:
    if scale is not None:
        return float(scale)
    head_dim = q.shape[-1]
    if head_dim == 0:
        raise ValueError(
            f"{name}: q has head_dim 0 (shape {tuple(q.shape)}), so the default scale head_dim**-0.5 is undefined; "
            "give q a non-empty last dimension or pass scale= explicitly."
        )
    return head_dim**-0.5


@torch.compiler.assume_constant_result
def _resolve(backend: str | None, op: str, device: torch.device, dtype: torch.dtype, fused: bool) -> str:
    # A trace-time decision under torch.compile (the result is baked into the graph, as the kernel choice is).
    return resolve_backend(backend, op, device, dtype, fused)


def _backend(backend: str | None, op: str, x: torch.Tensor, fused: bool) -> str:
    return _resolve(backend, op, x.device, x.dtype, fused)


def _window_covers_group(dims: int, q, k, v, kernel_size: int, dilation: int, rpb) -> bool:
    """True when every query's window is its whole dilation group (each spatial size == kernel_size * dilation, so
    every group along every axis holds exactly kernel_size positions) and the inputs are well-formed; malformed inputs
    go to the op, whose checks name the problem."""
    spatial = tuple(q.shape[2:-1]) if q.dim() == dims + 3 else ()
    if not all(isinstance(size, int) for size in spatial):
        return False  # symbolic sizes (torch.export, dynamic shapes): comparing them would specialise the graph
    return (
        isinstance(dilation, int)
        and dilation >= 1
        and len(spatial) == dims
        and all(size == kernel_size * dilation for size in spatial)
        and all(t.shape == q.shape and t.dtype == q.dtype and t.device == q.device for t in (k, v))
        and q.dtype in _DTYPES.get(q.device.type, ())
        and q.shape[-1] > 0
        and (rpb is None or (rpb.shape == (q.shape[1],) + (_rpb_width(kernel_size),) * dims and rpb.dtype == q.dtype))
        and (rpb is None or rpb.device == q.device)
    )


def _records_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Below this many query tokens (batch * heads * map) the dense path's fixed cost (regrouping, bias gather, a dozen
# small ops) loses to the fused CPU kernel's forward (float64 on the CPU; float32 and bf16 always take the fused one:
# _dense_pays_off).
_DENSE_MIN_TOKENS_CPU = 2048


def _dense_pays_off(q: torch.Tensor, dilation: int, *others) -> bool:
    """Whether a problem whose windows are whole dilation groups runs faster as dense attention per group."""
    if q.device.type != "cpu":
        return dilation == 1  # the whole-map case only: the dilated one was measured on the CPU
    if not all(isinstance(size, int) for size in q.shape):
        # A symbolic batch (torch.export with a dynamic batch): a size test would specialise the graph on it.
        return dilation == 1
    if math.prod(q.shape[:-1]) < _DENSE_MIN_TOKENS_CPU:
        return False
    if q.dtype != torch.float64:
        # The float32 and bf16 fused kernels' whole-group tiles beat the dense products at every whole-map shape
        # measured (tools/benchmark_ops.py shapes, forward, 2 threads, Intel Xeon AVX-512, dense / fused ms: float32
        # 8x16x7x7 0.77 / 0.43, 32x16x7x7 2.52 / 1.67, 8x48x7x7 2.37 / 1.36, 8x16x13x13 k13 6.9 / 3.6; the AVX2 path
        # 0.77 / 0.69, 2.57 / 2.30, 2.28 / 1.80, 5.92 / 5.90. bf16, EPYC Zen4: 8x16x7x7 0.74 / 0.32, 64x16x7x7
        # 15.5 / 2.3). float64's fused kernel is about 3x slower than its dense products (8x16x7x7 5.75 / 1.77).
        return False
    # Inference: the whole map only (with dilation the fused forward is faster: no regrouping copies). Training: the
    # fused kernel's backward from the saved weights beats the dense products' at DiNAT's whole-group stages (one
    # thread, CPU time, fused / dense forward + backward: 8x16x7x7 d=1 3.3 / 4.2 ms, 1x4x28x28 d=4 1.9 / 2.4 ms,
    # 8x8x14x14 d=2 7.7 / 10.1 ms, 8x2x56x56 d=8 38 / 40 ms).
    return dilation == 1 and not _records_grad(q, *others)


def _dense_bias(rpb: torch.Tensor, kernel_size: int, dims: int) -> torch.Tensor:
    """[heads, N, N] bias of the dense problem (N = kernel_size**dims): query i, key x -> rpb[x - i + k - 1] per axis
    (window start 0 on every axis, so slot x of query i is key x)."""
    pos = torch.arange(kernel_size, device=rpb.device)
    index = pos[None, :] - pos[:, None] + kernel_size - 1  # [query, key] along one axis
    if dims == 1:
        return rpb[:, index]
    bias = rpb[:, index[:, None, :, None], index[None, :, None, :]]  # [heads, qi, qj, ki, kj]
    return bias.reshape(rpb.shape[0], kernel_size**2, kernel_size**2)


def _dense_attention(q, k, v, kernel_size: int, dilation: int, dims: int, rpb, scale: float) -> torch.Tensor:
    """Exact neighborhood attention when every window is its whole dilation group: per group, dense
    softmax(scale q k^T + bias) v as matrix products, in float32 at least (as the fused kernels accumulate).

    Position a * dilation + g of an axis (a < kernel_size) is slot a of group g, and the window of every position of
    the group starts at slot 0, so each group is the whole-map problem of a kernel_size-wide map with dilation 1."""
    acc = torch.promote_types(q.dtype, torch.float32)
    batch, heads, dim = q.shape[0], q.shape[1], q.shape[-1]
    # [B, heads, (k, dil) per axis, D] -> [B, heads, dil per axis, k per axis, D]
    split = (batch, heads, *(kernel_size, dilation) * dims, dim)
    groups_first = (0, 1, *(3 + 2 * a for a in range(dims)), *(2 + 2 * a for a in range(dims)), 2 + 2 * dims)
    back = [0] * len(groups_first)
    for position, axis in enumerate(groups_first):
        back[axis] = position

    def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, heads, dil per axis, N, D] in the accumulation dtype
        return t.to(acc).reshape(split).permute(groups_first).flatten(2 + dims, 1 + 2 * dims)

    logits = torch.matmul(tokens(q) * scale, tokens(k).transpose(-1, -2))
    if rpb is not None:
        bias = _dense_bias(rpb.to(acc), kernel_size, dims)
        logits = logits + bias.view(heads, *(1,) * dims, *bias.shape[1:])
    out = torch.matmul(logits.softmax(-1), tokens(v))
    out = out.unflatten(2 + dims, (kernel_size,) * dims).permute(back)  # [B, heads, (k, dil) per axis, D]
    # One copy into q's memory order (as the fused kernels' output, _empty_in_order_of): heads-last for a packed qkv,
    # so the caller's reshape to [B, *spatial, C] is free; contiguous for contiguous q.
    order = _memory_order(q)
    grouped = [[0], [1], *([2 + 2 * a, 3 + 2 * a] for a in range(dims)), [2 + 2 * dims]]  # q's dims in `out`
    # (reshape alone may return a view: with dilation 1 the grouped axes are singletons)
    physical = out.permute([g for d in order for g in grouped[d]]).reshape([q.shape[d] for d in order]).contiguous()
    return physical.permute([order.index(d) for d in range(q.dim())]).to(q.dtype)


def _saves_attn(q, *others) -> bool:
    """Whether the fused forward saves the weights for its backward: in training on the CPU. The backward then reads
    them instead of recomputing the logits, which makes forward + backward faster than the unfused pair's; the cost
    is the memory the unfused pair spends too, B * heads * tokens * kernel_size**dims weights (float32 for float32
    and bfloat16 inputs) held until the backward. Inference, and CUDA (no kernels for these ops), keep the
    recomputing backward."""
    return q.device.type == "cpu" and _records_grad(q, *others)


def _native_fused(dims: int, q, k, v, kernel_size: int, dilation: int, rpb, scale: float) -> torch.Tensor:
    if _window_covers_group(dims, q, k, v, kernel_size, dilation, rpb) and _dense_pays_off(q, dilation, k, v, rpb):
        # e.g. k = 7 on the 7x7 last stage in inference: NA is dense attention with a bias, and BLAS does it faster.
        # When this pays off: _dense_pays_off.
        return _dense_attention(q, k, v, kernel_size, dilation, dims, rpb, scale)
    if _saves_attn(q, k, v, rpb):
        op = _OPS.na1d_fused_forward_with_attn if dims == 1 else _OPS.na2d_fused_forward_with_attn
    else:
        op = _OPS.na1d_fused_forward if dims == 1 else _OPS.na2d_fused_forward
    # The fused forward also returns what its backward reads (the row logsumexp or the weights); callers want only
    # the output.
    return op(q, k, v, rpb, kernel_size, dilation, scale)[0]


def na1d_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """q, k: [B, heads, L, D] -> logits [B, heads, L, kernel_size] (+ rpb [heads, 2k-1]); no scaling."""
    if _backend(backend, "na1d_qk", q, fused=False) == "reference":
        return reference.na1d_qk(q, k, kernel_size, dilation, rpb)
    return _OPS.na1d_qk(q, k, rpb, kernel_size, dilation)


def na1d_av(
    attn: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int = 1, backend: str | None = None
) -> torch.Tensor:
    """attn: [B, heads, L, kernel_size], v: [B, heads, L, D] -> [B, heads, L, D]."""
    if _backend(backend, "na1d_av", v, fused=False) == "reference":
        return reference.na1d_av(attn, v, kernel_size, dilation)
    return _OPS.na1d_av(attn, v, kernel_size, dilation)


def na2d_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """q, k: [B, heads, H, W, D] -> logits [B, heads, H, W, k*k] (+ rpb [heads, 2k-1, 2k-1]); no scaling."""
    if _backend(backend, "na2d_qk", q, fused=False) == "reference":
        return reference.na2d_qk(q, k, kernel_size, dilation, rpb)
    return _OPS.na2d_qk(q, k, rpb, kernel_size, dilation)


def na2d_av(
    attn: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int = 1, backend: str | None = None
) -> torch.Tensor:
    """attn: [B, heads, H, W, k*k], v: [B, heads, H, W, D] -> [B, heads, H, W, D]."""
    if _backend(backend, "na2d_av", v, fused=False) == "reference":
        return reference.na2d_av(attn, v, kernel_size, dilation)
    return _OPS.na2d_av(attn, v, kernel_size, dilation)


def _fused_na(name: str, dims: int, q, k, v, kernel_size: int, dilation: int, rpb, scale, backend) -> torch.Tensor:
    """na1d / na2d on the chosen backend (``name`` is the public op: the reference's and Triton's function)."""
    scale = _scale(name, q, scale)
    chosen = _backend(backend, name, q, fused=True)
    if chosen == "reference":
        return getattr(reference, name)(q, k, v, kernel_size, dilation, rpb, scale)
    if chosen == "triton":
        from dinat_m2f.ops import na_triton

        return getattr(na_triton, name)(q, k, v, kernel_size, dilation, rpb, scale)
    return _native_fused(dims, q, k, v, kernel_size, dilation, rpb, scale)


def _fused_na_qkv(name: str, dims: int, qkv, kernel_size: int, dilation: int, rpb, scale, backend) -> torch.Tensor:
    """na1d_qkv / na2d_qkv: the fused op on q, k, v read in place from the packed qkv (native backend), else na1d /
    na2d on views of it (other backends and the dense path, which regroup the tokens anyway)."""
    q, k, v = _unpack_qkv(name, dims, qkv)
    scale = _scale(name, q, scale)
    base = name.removesuffix("_qkv")
    if _backend(backend, name, q, fused=True) != "native" or (
        _window_covers_group(dims, q, k, v, kernel_size, dilation, rpb) and _dense_pays_off(q, dilation, qkv, rpb)
    ):
        return _fused_na(base, dims, q, k, v, kernel_size, dilation, rpb, scale, backend)
    if _saves_attn(qkv, rpb):  # training on the CPU: the backward reads the saved weights (see _saves_attn)
        op = _OPS.na1d_qkv_fused_forward_with_attn if dims == 1 else _OPS.na2d_qkv_fused_forward_with_attn
    else:
        op = _OPS.na1d_qkv_fused_forward if dims == 1 else _OPS.na2d_qkv_fused_forward
    return op(qkv, rpb, kernel_size, dilation, scale)[0]


def na1d_qkv(
    qkv: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """na1d on the packed qkv projection output ``qkv`` [B, L, 3, heads, D] (q, k, v = qkv[:, :, i] per head).

    Returns [B, heads, L, D] like na1d. With the native backend q, k, v are read in place, the output is stored
    [B, L, heads, D] (so ``out.transpose(1, 2).reshape(B, L, C)`` is free) and the backward writes the gradients of
    q, k, v into one buffer of qkv's shape: no layout copies around the attention.
    """
    return _fused_na_qkv("na1d_qkv", 1, qkv, kernel_size, dilation, rpb, scale, backend)


def na2d_qkv(
    qkv: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """na2d on the packed qkv projection output ``qkv`` [B, H, W, 3, heads, D] (q, k, v = qkv[..., i, :, :]).

    Returns [B, heads, H, W, D] like na2d. With the native backend q, k, v are read in place, the output is stored
    [B, H, W, heads, D] (so ``out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)`` is free) and the backward writes the
    gradients of q, k, v into one buffer of qkv's shape (the gradient of the projection): no layout copies.
    """
    return _fused_na_qkv("na2d_qkv", 2, qkv, kernel_size, dilation, rpb, scale, backend)


def na1d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused softmax(scale * q.k + rpb) v over 1D neighborhoods; scale defaults to D**-0.5.

    When the window is the whole sequence (L == kernel_size), the native backend computes it as the dense attention
    with a bias that it then is (on CUDA; on the CPU only float64, in inference and for problems of 2048+ query tokens:
    the float32 and bf16 CPU kernels are faster there). In training on the CPU the fused forward saves the attention weights for its backward.
    """
    return _fused_na("na1d", 1, q, k, v, kernel_size, dilation, rpb, scale, backend)


def na2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused softmax(scale * q.k + rpb) v over 2D neighborhoods; scale defaults to D**-0.5.

    When the window is the whole map (H == W == kernel_size), the native backend computes it as the dense attention
    with a bias that it then is (on CUDA; on the CPU only float64, in inference and for problems of 2048+ query tokens:
    the float32 and bf16 CPU kernels are faster there). In training on the CPU the fused forward saves the attention weights for its backward.
    """
    return _fused_na("na2d", 2, q, k, v, kernel_size, dilation, rpb, scale, backend)
