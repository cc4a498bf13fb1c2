"""The rank grid and its process groups, built once and passed explicitly.

Rank order is DeepSpeed's ``PipeModelDataParallelTopology(num_pp, num_mp,
num_dp)``: axes (pipe, data, model), the model (tensor) axis varying fastest::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

so a tensor-parallel group is a run of consecutive ranks (one node, fast links)
and our groups coincide with the ones DeepSpeed's pipeline engine builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch.distributed as dist

from megatron_msg.config import ConfigError

Axis = Literal["tp", "pp", "dp", "mp"]
AXES: tuple[Axis, ...] = ("tp", "pp", "dp", "mp")


def _check_sizes(tp: int, pp: int, dp: int) -> None:
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"parallel size {name} must be a positive integer, got {value!r}")


def grid_coords(rank: int, *, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """``(tp_rank, pp_rank, dp_rank)`` of a global rank."""
    _check_sizes(tp, pp, dp)
    if not 0 <= rank < tp * pp * dp:
        raise ConfigError(f"rank ({rank}) outside the grid tp*pp*dp = {tp * pp * dp}")
    return rank % tp, rank // (tp * dp), (rank // tp) % dp


def grid_rank(*, tp_rank: int, pp_rank: int, dp_rank: int, tp: int, dp: int) -> int:
    """Global rank of grid coordinates (inverse of :func:`grid_coords`)."""
    return (pp_rank * dp + dp_rank) * tp + tp_rank


def axis_comm_lists(axis: Axis, *, tp: int, pp: int, dp: int) -> list[list[int]]:
    """All groups along ``axis`` as sorted global-rank lists, in creation order.

    ``mp`` is the model-parallel group (tp x pp: every rank holding a different
    part of one model replica), used for global gradient norms.
    """
    _check_sizes(tp, pp, dp)
    if axis not in AXES:
        raise ConfigError(f"axis must be one of {AXES}, got {axis!r}")

    def rank(t: int, p: int, d: int) -> int:
        return grid_rank(tp_rank=t, pp_rank=p, dp_rank=d, tp=tp, dp=dp)

    if axis == "tp":
        return [[rank(t, p, d) for t in range(tp)] for p in range(pp) for d in range(dp)]
    if axis == "dp":
        return [[rank(t, p, d) for d in range(dp)] for p in range(pp) for t in range(tp)]
    if axis == "pp":
        return [[rank(t, p, d) for p in range(pp)] for d in range(dp) for t in range(tp)]
    return [sorted(rank(t, p, d) for p in range(pp) for t in range(tp)) for d in range(dp)]


@dataclass(frozen=True)
class ProcessGroups:
    """Sizes, ranks and groups of this rank along each parallel axis.

    ``*_group`` is None when that axis has size 1 (nothing to communicate);
    ``*_ranks`` are the global ranks of this rank's group along the axis.
    """

    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    mp_group: Any = None
    tp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    mp_ranks: tuple[int, ...] = (0,)
    rank: int = 0
    # Handles of every axis group including size-1 ones: DeepSpeed's mpu API
    # treats group=None as "the world", so it must get real singleton groups.
    _handles: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> ProcessGroups:
        # Process-group handles cannot be copied; the object is immutable, so a
        # deep copy of a module (EMA, reference model) shares it.
        return self

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size

    @property
    def mp_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @classmethod
    def single(cls) -> ProcessGroups:
        """One process, no torch.distributed needed."""
        return cls()

    @classmethod
    def from_grid(cls, *, tp: int, pp: int, dp: int) -> ProcessGroups:
        """Build every group of the grid; collective over the whole world.

        Every rank creates all groups in the same order (``new_group`` is
        collective) and keeps the ones it belongs to.
        """
        _check_sizes(tp, pp, dp)
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                "ProcessGroups.from_grid needs torch.distributed initialised; "
                "use ProcessGroups.single() for one process"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp * pp * dp != world:
            raise ConfigError(
                f"tp ({tp}) * pp ({pp}) * dp ({dp}) = {tp * pp * dp} != world size ({world})"
            )
        mine: dict[str, tuple[int, ...]] = {}
        handles: dict[str, Any] = {}
        for axis in AXES:
            for ranks in axis_comm_lists(axis, tp=tp, pp=pp, dp=dp):
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    mine[axis], handles[axis] = tuple(ranks), group
        tp_rank, pp_rank, dp_rank = grid_coords(rank, tp=tp, pp=pp, dp=dp)
        sizes = {"tp": tp, "pp": pp, "dp": dp, "mp": tp * pp}

        def public(axis: str) -> Any:
            return handles[axis] if sizes[axis] > 1 else None

        return cls(
            tp_size=tp,
            pp_size=pp,
            dp_size=dp,
            tp_rank=tp_rank,
            pp_rank=pp_rank,
            dp_rank=dp_rank,
            tp_group=public("tp"),
            pp_group=public("pp"),
            dp_group=public("dp"),
            mp_group=public("mp"),
            tp_ranks=mine["tp"],
            pp_ranks=mine["pp"],
            dp_ranks=mine["dp"],
            mp_ranks=mine["mp"],
            rank=rank,
            _handles=handles,
        )

    def deepspeed_topology(self) -> Any:
        """DeepSpeed's topology of this grid (e.g. for ``PipelineModule(topology=...)``)."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(
            num_pp=self.pp_size, num_mp=self.tp_size, num_dp=self.dp_size
        )

    def deepspeed_mpu(self) -> DeepSpeedMPU:
        """The ``mpu`` object ``deepspeed.initialize(mpu=...)`` expects (non-pipeline engine)."""
        if not self._handles:
            raise ConfigError(
                "ProcessGroups.single() has no process groups; pass mpu=None to DeepSpeed"
            )
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """Megatron-style ``mpu`` accessors over a :class:`ProcessGroups`.

    DeepSpeed reduces gradients over the data-parallel group and computes norms
    over the model-parallel group; "model parallel" here is tp x pp.
    """

    def __init__(self, groups: ProcessGroups) -> None:
        self._g = groups

    def get_model_parallel_rank(self) -> int:
        return self._g.mp_ranks.index(self._g.rank)

    def get_model_parallel_world_size(self) -> int:
        return self._g.mp_size

    def get_model_parallel_group(self) -> Any:
        return self._g._handles["mp"]

    def get_tensor_model_parallel_rank(self) -> int:
        return self._g.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._g.tp_size

    def get_tensor_model_parallel_group(self) -> Any:
        return self._g._handles["tp"]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._g.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._g.pp_size

    def get_pipeline_model_parallel_group(self) -> Any:
        return self._g._handles["pp"]

    def get_data_parallel_rank(self) -> int:
        return self._g.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._g.dp_size

    def get_data_parallel_group(self) -> Any:
        return self._g._handles["dp"]

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._g.dp_ranks)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._g.tp_ranks[0]

    # DeepSpeed's PipelineParallelGrid names: "slice" is tensor, "pipe" is pipeline.
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group
