"""Autograd-aware communication at the boundaries of tensor-parallel regions.

Megatron's four mappings; each is the identity when ``tp_size == 1``:

============  ==========================  ==========================
function      forward                     backward
============  ==========================  ==========================
copy_to_tp    identity                    all-reduce
reduce_from   all-reduce                  identity
scatter_to    keep this rank's slice      all-gather
gather_from   all-gather                  keep this rank's slice
============  ==========================  ==========================

Slices are contiguous chunks of ``dim`` in tp-rank order, the same layout as
the canonical-tensor shards (DESIGN.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_msg.config import ConfigError
from megatron_msg.parallel.groups import ProcessGroups


def _all_reduce(x: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    # A fresh buffer: the caller's tensor (or an incoming gradient that autograd
    # may share with another consumer) must not change under it.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=groups.tp_group)
    return out


def _split(x: torch.Tensor, dim: int, groups: ProcessGroups) -> torch.Tensor:
    size = x.shape[dim]
    if size % groups.tp_size:
        raise ConfigError(
            f"dimension {dim} of size {size} is not divisible by "
            f"tensor parallel size ({groups.tp_size})"
        )
    return x.chunk(groups.tp_size, dim=dim)[groups.tp_rank].contiguous()


def _gather(x: torch.Tensor, dim: int, groups: ProcessGroups) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(groups.tp_size)]
    dist.all_gather(parts, x, group=groups.tp_group)
    return torch.cat(parts, dim=dim)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
        ctx.groups = groups
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.groups), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
        return _all_reduce(x, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: ProcessGroups, dim: int) -> torch.Tensor:
        ctx.groups, ctx.dim = groups, dim
        return _split(x, dim, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _gather(grad, ctx.dim, ctx.groups), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: ProcessGroups, dim: int) -> torch.Tensor:
        ctx.groups, ctx.dim = groups, dim
        return _gather(x, dim, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _split(grad, ctx.dim, ctx.groups), None, None


def _normalise_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ConfigError(f"dim ({dim}) out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def copy_to_tp(x: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """Enter a TP region: identity forward, all-reduce of the gradient."""
    if groups.tp_size == 1:
        return x
    return _CopyToTP.apply(x, groups)


def reduce_from_tp(x: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    if groups.tp_size == 1:
        return x
    return _ReduceFromTP.apply(x, groups)


def scatter_to_tp(x: torch.Tensor, groups: ProcessGroups, dim: int = -1) -> torch.Tensor:
    """Keep this rank's contiguous slice of ``dim``; the gradient is all-gathered."""
    if groups.tp_size == 1:
        return x
    return _ScatterToTP.apply(x, groups, _normalise_dim(x, dim))


def gather_from_tp(x: torch.Tensor, groups: ProcessGroups, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's slice along ``dim``; the gradient is split back."""
    if groups.tp_size == 1:
        return x
    return _GatherFromTP.apply(x, groups, _normalise_dim(x, dim))
