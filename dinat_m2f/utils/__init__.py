"""Utilities: atomic file writes (``file_io``), the detectron2 internals this project relies on (``d2_compat``),
fvcore FLOP counting of the neighborhood-attention ops (``flops``), glibc told to keep freed CPU memory for reuse
(``cpu_memory``)."""
