"""dinat-m2f: DiNAT + Mask2Former on Detectron2, on native neighborhood-attention kernels."""

from dinat_m2f._ext import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "__version__"]
