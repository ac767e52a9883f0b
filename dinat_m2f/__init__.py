"""dinat-m2f: DiNAT + Mask2Former on Detectron2, on native neighborhood-attention kernels.

Importing the package registers, in detectron2's registries, the backbones (D2DiNAT, D2DiNATs), the MaskFormer
meta-architecture with its heads, and every dataset (COCO, ADE20K, Cityscapes, COCO-Stuff-10k, Mapillary Vistas,
the synthetic demo set). The compiled extension is loaded on first use of an op.
"""

from dinat_m2f import data, modeling  # noqa: F401  (registrations)
from dinat_m2f._ext import build_info
from dinat_m2f.config import get_cfg
from dinat_m2f.predictor import Predictor

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__", "build_info", "get_cfg"]
