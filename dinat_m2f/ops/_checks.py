"""Input checks shared by the fake (meta) kernels of the native ops: they refuse what the C++ entry points refuse
(native/na/na_ops.cpp, native/msda/ms_deform_attn_ops.cpp) and word it the same way."""

from __future__ import annotations

import torch

# How c10 prints a dtype in the C++ messages (torch.float32 -> Float).
_C10_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
}


def c10_dtype(dtype: torch.dtype) -> str:
    return _C10_DTYPE_NAMES.get(dtype, str(dtype))


def shape_text(t: torch.Tensor) -> str:
    """A shape as the C++ messages print it: [2, 3, 7]."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def require(condition, op: str, message: str) -> None:
    """Raise RuntimeError('{op}: {message}') unless condition holds (a SymBool is fine: sizes may be symbolic)."""
    torch._check(condition, lambda: f"{op}: {message}")
