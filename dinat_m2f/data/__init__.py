"""Data: dataset registrations (run on import) and the Mask2Former training mappers."""

from dinat_m2f.data import datasets  # noqa: F401  (registers the datasets)
