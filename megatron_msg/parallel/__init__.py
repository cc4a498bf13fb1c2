"""Tensor-parallel process groups, layers and mappings.

Nothing here holds global state: a :class:`ProcessGroups` built once from the
rank grid is passed to every layer and function that communicates.
"""

from megatron_msg.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_msg.parallel.groups import ProcessGroups, axis_comm_lists
from megatron_msg.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron_msg.parallel.mappings import (
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    scatter_to_tp,
)
from megatron_msg.parallel.random import (
    ParallelRNG,
    derive_seed,
    gather_tensor,
    init_full,
    init_shard,
    normal_init,
    scaled_normal_init,
    shard_tensor,
)

__all__ = [
    "ColumnParallelLinear",
    "ParallelRNG",
    "ProcessGroups",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "axis_comm_lists",
    "copy_to_tp",
    "derive_seed",
    "gather_from_tp",
    "gather_tensor",
    "init_full",
    "init_shard",
    "normal_init",
    "reduce_from_tp",
    "scaled_normal_init",
    "scatter_to_tp",
    "shard_tensor",
    "vocab_parallel_cross_entropy",
]
