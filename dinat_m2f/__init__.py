"""dinat-m2f: DiNAT + Mask2Former on Detectron2, on native neighborhood-attention kernels.

``dinat_m2f.ops`` (neighborhood attention, its reference and its backends) needs only torch. When detectron2 is
importable, importing the package also registers, in detectron2's registries, the backbones (D2DiNAT, D2DiNATs),
the MaskFormer meta-architecture with its heads, and every dataset (COCO, ADE20K, Cityscapes, COCO-Stuff-10k,
Mapillary Vistas, the synthetic demo set); without it, ``get_cfg`` and the detection stack raise an error saying
detectron2 is needed. Nothing here loads the compiled extension: it is loaded on first use of a native op.
"""

from __future__ import annotations

from dinat_m2f._ext import build_info

__version__ = "0.1.0"
__all__ = [
    "DETECTRON2_IMPORT_ERROR",
    "Predictor",
    "__version__",
    "add_dinat_config",
    "add_maskformer2_config",
    "build_info",
    "get_cfg",
]

try:
    import detectron2  # noqa: F401
except ImportError as exc:
    DETECTRON2_IMPORT_ERROR: ImportError | None = exc
else:
    DETECTRON2_IMPORT_ERROR = None


def _needs_detectron2(name: str):
    """Stands in for dinat_m2f.config.<name> where detectron2 is missing: says so when called."""

    def stand_in(*args, **kwargs):
        raise ImportError(
            f"detectron2 is needed for dinat_m2f.{name} (configs, models, datasets, training) but it does not "
            f"import: {DETECTRON2_IMPORT_ERROR}. Install it with `python tools/install_detectron2.py` (or `make "
            "setup`); dinat_m2f.ops works without it."
        ) from DETECTRON2_IMPORT_ERROR

    stand_in.__name__ = name
    return stand_in


if DETECTRON2_IMPORT_ERROR is None:
    from dinat_m2f import data, modeling  # noqa: F401  (registrations)
    from dinat_m2f.config import add_dinat_config, add_maskformer2_config, get_cfg
    from dinat_m2f.predictor import Predictor
else:
    get_cfg = _needs_detectron2("get_cfg")
    add_dinat_config = _needs_detectron2("add_dinat_config")
    add_maskformer2_config = _needs_detectron2("add_maskformer2_config")
    Predictor = _needs_detectron2("Predictor")
