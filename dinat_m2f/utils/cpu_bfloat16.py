"""Whether bfloat16 is fast on this CPU: the choice between bfloat16 and float32 for AMP training and inference."""

from __future__ import annotations

import torch

__all__ = ["cpu_has_fast_bfloat16"]


def cpu_has_fast_bfloat16() -> bool:
    """Whether torch runs on the CPU's AVX-512 code path and the CPU has AVX512_BF16: the bfloat16 matrix products
    and convolutions (oneDNN) are fast there; on the AVX2 path they were 2-17x slower than float32, and a whole
    DiNAT-T-Mask2Former training step under bfloat16 autocast 12x slower (tools/speed_report.py, avx2 path)."""
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and has_bf16
