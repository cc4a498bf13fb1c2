"""Tensor-parallel process groups, layers and mappings."""
