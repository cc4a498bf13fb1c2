"""Megatron-compatible indexed datasets, tokenisers and preprocessing."""
