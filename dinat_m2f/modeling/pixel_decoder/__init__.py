"""Filled in by the owner of this subpackage."""
