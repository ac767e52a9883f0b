"""Keep freed CPU memory for reuse instead of handing it back to the kernel after every operator.

PyTorch allocates each CPU tensor with the C library's malloc. glibc serves a large block (above its mmap threshold,
at most 32 MB when adjusted dynamically) with a fresh ``mmap`` and returns it with ``munmap`` when the tensor dies,
and gives back the top of its heap above a trim threshold. A model that allocates the same large activations on every
forward then page-faults on every first write: one DiNAT-Tiny-Mask2Former inference at 512x512 takes ~90,000 minor
page faults, each zeroing a fresh 4 KiB page. Raising both thresholds keeps the freed blocks in the heap, where the
next allocation of that size finds them. This is what the field's CPU setups do with jemalloc or tcmalloc
(``LD_PRELOAD``); glibc can be told the same at run time with ``mallopt``.

The setting is process-wide and only affects later allocations. The cost is memory: the process keeps its peak heap
instead of returning it between forwards. ``DINAT_M2F_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["keep_freed_cpu_memory"]

logger = logging.getLogger(__name__)

# mallopt parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap, not from mmap. glibc accepts up to 32 MB everywhere (HEAP_MAX_SIZE / 2);
# recent versions accept more, which keeps e.g. a [150, 512, 512] float32 score map (157 MB) too.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
# Free memory at the top of the heap kept before it is given back (the largest value mallopt's int takes).
_TRIM_THRESHOLD = (1 << 31) - 1
_ENV = "DINAT_M2F_KEEP_FREED_MEMORY"

_applied: int | None = None  # the mmap threshold set by this process, once applied


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 1 GiB (32 MB on old glibc) for reuse. Returns whether the
    setting is in effect: False with ``DINAT_M2F_KEEP_FREED_MEMORY=0`` or where the C library is not glibc (there use
    ``LD_PRELOAD`` jemalloc or tcmalloc for the same effect). Calling it again does nothing."""
    global _applied
    if _applied is not None:
        return True
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        logger.info(f"{_ENV}=0: CPU memory freed by torch goes back to the kernel (glibc's default)")
        return False
    libc = _glibc()
    if libc is None:
        logger.info("not glibc: keep_freed_cpu_memory does nothing (LD_PRELOAD jemalloc or tcmalloc instead)")
        return False
    for threshold in _MMAP_THRESHOLDS:
        if libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1:
            break
    else:
        logger.warning("glibc refused every mmap threshold: freed CPU memory goes back to the kernel")
        return False
    if libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_TRIM_THRESHOLD)) != 1:
        logger.warning("glibc refused the trim threshold: the top of the heap still goes back to the kernel")
    _applied = threshold
    logger.info(f"glibc keeps freed CPU memory for reuse (blocks up to {threshold >> 20} MB; {_ENV}=0 turns it off)")
    return True
