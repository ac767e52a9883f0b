"""Linear layers that add their bias after the matrix product on Intel CPUs.

``F.linear`` with a bias runs ``addmm`` for 2-D and contiguous inputs: it first copies the bias into every row of
the output, then accumulates the product onto it (beta = 1). On an Intel CPU in float32 the product into a fresh
output followed by an in-place bias add is faster (the formula ``torch.nn.functional.linear`` itself uses for other
inputs): DiNAT-Tiny-Mask2Former at 512x512 ran inference 1.01-1.04x and a training step 1.02x faster with it
(Intel Xeon, AVX-512, 2 threads), and the bias copies, most of the inference's ``aten::copy_`` time (8.5% of its
operator time), are gone (1.4% left). On an AMD CPU it is the other way round: MKL's code path for non-Intel CPUs
zeroes the output in a pass of its own before a beta = 0 product (``mkl_blas_def_sgemm_mscale`` in perf), so the
product then the add is three passes over the output against ``addmm``'s two (AMD EPYC Zen 3, AVX2, 2 threads:
``addmm`` 1.22x faster at DiNAT-T's [25088, 64] x [64, 192], 0.98-1.11x at its other shapes; DiNAT-T inference at
batch 8 1.02-1.05x, DiNAT-T-Mask2Former at 512x512 inference 1.03x and a training step 1.04x). Elsewhere it is
``F.linear``: on CUDA cuBLAS adds the bias in the product's epilogue, and autocast, tracing and export keep the
standard op. The two differ only in float32 rounding (where the product's partial sums meet the bias).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dinat_m2f.utils.cpu_info import cpu_vendor


@functools.cache
def bias_after_product_pays_off() -> bool:
    """Whether the CPU's float32 products run faster with the bias added afterwards: MKL on an Intel CPU, where it was
    measured (see the module docstring; on AMD CPUs MKL's own path makes ``addmm`` the faster form)."""
    return torch.backends.mkl.is_available() and cpu_vendor() == "GenuineIntel"


def adds_bias_after_product(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the product-then-bias form: float32 on an Intel CPU with MKL
    (bias_after_product_pays_off), outside autocast, tracing and compilation."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and bias_after_product_pays_off()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on an Intel CPU in float32, the product then an in-place bias add."""
    if bias is None or not adds_bias_after_product(x, weight):
        return F.linear(x, weight, bias)
    return torch.matmul(x, weight.t()).add_(bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
