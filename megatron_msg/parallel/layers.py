"""Tensor-parallel linear and embedding layers (Megatron layout).

Weights are stored as this rank's contiguous shard of the canonical tensor.
Sharded parameters carry Megatron's attributes (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``), which DeepSpeed reads to count each
shard once in gradient norms. ``tp_split_dims`` maps parameter names to the
canonical split dim (None = replicated) for canonical import/export.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from megatron_msg.config import ConfigError
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.mappings import (
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    scatter_to_tp,
)
from megatron_msg.parallel.random import InitMethod, init_shard, normal_init

Device = torch.device | str | None


def _divide(total: int, what: str, groups: ProcessGroups) -> int:
    if total % groups.tp_size:
        raise ConfigError(
            f"{what} ({total}) must be divisible by tensor parallel size ({groups.tp_size})"
        )
    return total // groups.tp_size


def _param(shape: tuple[int, ...], split_dim: int | None, dtype: torch.dtype, device: Device):
    p = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
    p.tensor_model_parallel = split_dim is not None  # type: ignore[attr-defined]
    p.partition_dim = -1 if split_dim is None else split_dim  # type: ignore[attr-defined]
    p.partition_stride = 1  # type: ignore[attr-defined]
    return p


class _TPModule(nn.Module):
    tp_split_dims: ClassVar[dict[str, int | None]]
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, groups: ProcessGroups, canonical_weight_shape: tuple[int, int]) -> None:
        super().__init__()
        self.groups = groups
        self.canonical_weight_shape = canonical_weight_shape

    def reset_parameters(self, *, seed: int, init_method: InitMethod | None = None) -> None:
        """TP-invariant init: the canonical weight from ``seed`` (default N(0, 0.02)), sliced;
        the bias is zero."""
        shard = init_shard(
            self.canonical_weight_shape,
            dim=self.tp_split_dims["weight"],
            seed=seed,
            groups=self.groups,
            init_method=init_method or normal_init(0.02),
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            self.weight.copy_(shard)
            if self.bias is not None:
                self.bias.zero_()


class ColumnParallelLinear(_TPModule):
    """``y = x A^T + b`` with A split by output rows: ``weight [out/tp, in]``, ``bias [out/tp]``.

    The input is replicated; the output is this rank's slice of the output
    features unless ``gather_output``. ``seed=None`` initialises from seed 0.
    """

    tp_split_dims: ClassVar[dict[str, int | None]] = {"weight": 0, "bias": 0}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        groups: ProcessGroups,
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod | None = None,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
    ) -> None:
        super().__init__(groups, (out_features, in_features))
        local_out = _divide(out_features, "out_features", groups)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        self.weight = _param((local_out, in_features), 0, dtype, device)
        self.bias = _param((local_out,), 0, dtype, device) if bias else None
        self.reset_parameters(seed=0 if seed is None else seed, init_method=init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.groups), self.weight, self.bias)
        return gather_from_tp(y, self.groups) if self.gather_output else y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}"
        )


class RowParallelLinear(_TPModule):
    """``y = x A^T + b`` with A split by input columns: ``weight [out, in/tp]``, ``bias [out]``.

    The partial products are all-reduced, then the (replicated) bias is added
    once. With ``input_is_parallel=False`` a full input is split here first.
    """

    tp_split_dims: ClassVar[dict[str, int | None]] = {"weight": 1, "bias": None}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        groups: ProcessGroups,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_method: InitMethod | None = None,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
    ) -> None:
        super().__init__(groups, (out_features, in_features))
        local_in = _divide(in_features, "in_features", groups)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.weight = _param((out_features, local_in), 1, dtype, device)
        self.bias = _param((out_features,), None, dtype, device) if bias else None
        self.reset_parameters(seed=0 if seed is None else seed, init_method=init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.groups, dim=-1)
        y = reduce_from_tp(F.linear(x, self.weight), self.groups)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}"
        )


class VocabParallelEmbedding(_TPModule):
    """Embedding with rows split by vocabulary: ``weight [V/tp, h]``; output full ``[..., h]``.

    ``num_embeddings`` is the padded vocabulary (``config.pad_vocab_size``).
    Each rank looks up the ids it owns, writes zeros for the others, and the
    partial results are all-reduced (exact: one non-zero term per entry).
    """

    tp_split_dims: ClassVar[dict[str, int | None]] = {"weight": 0}

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        groups: ProcessGroups,
        init_method: InitMethod | None = None,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
    ) -> None:
        super().__init__(groups, (num_embeddings, embedding_dim))
        local = _divide(num_embeddings, "num_embeddings", groups)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start = groups.tp_rank * local
        self.vocab_end = self.vocab_start + local
        self.weight = _param((local, embedding_dim), 0, dtype, device)
        self.bias = None
        self.reset_parameters(seed=0 if seed is None else seed, init_method=init_method)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.groups.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, "
            f"local rows [{self.vocab_start}, {self.vocab_end})"
        )
