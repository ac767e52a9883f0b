"""Dataset registrations, run on import under ``$DETECTRON2_DATASETS`` (default ``datasets``).

Every ``register_all_*`` takes a ``root`` argument and may be called again to re-point the names elsewhere.
"""

from dinat_m2f.data.datasets import ade20k
from dinat_m2f.data.datasets.ade20k import register_all_ade20k, register_all_ade20k_full


def register_all(root: str | None = None) -> None:
    """(Re-)register every dataset of this project under ``root`` (default: ``$DETECTRON2_DATASETS``)."""
    register_all_ade20k(root)
    register_all_ade20k_full(root)


register_all()

__all__ = ["ade20k", "register_all", "register_all_ade20k", "register_all_ade20k_full"]
