"""GPT model with MSG masks on every growth dimension."""

from megatron_msg.model.canonical import (
    CanonicalStateError,
    TensorSpec,
    canonical_specs,
    canonical_vocab_size,
    gather_canonical,
    mask_specs,
    parameter_specs,
    shard_canonical,
    validate_canonical,
)
from megatron_msg.model.gpt import GPTModel
from megatron_msg.model.init import (
    canonical_init,
    init_canonical_tensor,
    init_method_for,
    iter_canonical_init,
)

__all__ = [
    "CanonicalStateError",
    "GPTModel",
    "TensorSpec",
    "canonical_init",
    "canonical_specs",
    "canonical_vocab_size",
    "gather_canonical",
    "init_canonical_tensor",
    "init_method_for",
    "iter_canonical_init",
    "mask_specs",
    "parameter_specs",
    "shard_canonical",
    "validate_canonical",
]
