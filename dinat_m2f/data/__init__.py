"""Data: dataset registrations (run on import) and the Mask2Former training mappers."""

from dinat_m2f.data import datasets, synthetic  # noqa: F401  (registers the datasets and the demo set)
from dinat_m2f.data.dataset_mappers import (
    MAPPERS,
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    CorruptSampleError,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    build_train_mapper,
)

__all__ = [
    "MAPPERS",
    "COCOInstanceNewBaselineDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "CorruptSampleError",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "build_train_mapper",
]
