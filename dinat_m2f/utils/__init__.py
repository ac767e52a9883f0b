"""Utilities: fvcore FLOP counting of the neighborhood-attention ops (dinat_m2f.utils.flops)."""
