"""The rank grid matches DeepSpeed's PipeModelDataParallelTopology; bad sizes are rejected."""

import os

import pytest

from megatron_msg.config import ConfigError
from megatron_msg.parallel.groups import (
    ProcessGroups,
    axis_comm_lists,
    grid_coords,
    grid_rank,
)

os.environ.setdefault("DS_ACCELERATOR", "cpu")

GRIDS = [(2, 2, 2), (1, 2, 4), (4, 1, 2), (2, 4, 1), (1, 1, 1), (8, 1, 1), (1, 8, 1), (3, 2, 5)]


@pytest.mark.parametrize(("tp", "pp", "dp"), GRIDS)
def test_grid_equals_deepspeed_topology(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for ours, theirs in (("tp", "model"), ("pp", "pipe"), ("dp", "data")):
        assert axis_comm_lists(ours, tp=tp, pp=pp, dp=dp) == topo.get_axis_comm_lists(theirs)
    # DeepSpeed's model-parallel group (PipelineParallelGrid): same data coordinate.
    want_mp = [sorted(topo.get_axis_list(axis="data", idx=d)) for d in range(dp)]
    assert axis_comm_lists("mp", tp=tp, pp=pp, dp=dp) == want_mp
    for rank in range(tp * pp * dp):
        coord = topo.get_coord(rank)
        assert grid_coords(rank, tp=tp, pp=pp, dp=dp) == (coord.model, coord.pipe, coord.data)
        t, p, d = grid_coords(rank, tp=tp, pp=pp, dp=dp)
        assert grid_rank(tp_rank=t, pp_rank=p, dp_rank=d, tp=tp, dp=dp) == rank


@pytest.mark.parametrize(("tp", "pp", "dp"), GRIDS)
def test_groups_partition_the_world(tp, pp, dp):
    world = tp * pp * dp
    for axis, size in (("tp", tp), ("pp", pp), ("dp", dp), ("mp", tp * pp)):
        lists = axis_comm_lists(axis, tp=tp, pp=pp, dp=dp)
        assert all(len(g) == size for g in lists)
        assert sorted(r for g in lists for r in g) == list(range(world))


def test_deepspeed_topology_of_groups():
    groups = ProcessGroups(tp_size=2, pp_size=2, dp_size=3)
    topo = groups.deepspeed_topology()
    assert topo.get_axis_comm_lists("model") == axis_comm_lists("tp", tp=2, pp=2, dp=3)
    assert topo.world_size() == 12


def test_single():
    g = ProcessGroups.single()
    assert (g.tp_size, g.pp_size, g.dp_size, g.world_size) == (1, 1, 1, 1)
    assert (g.tp_rank, g.pp_rank, g.dp_rank) == (0, 0, 0)
    assert g.tp_group is None and g.pp_group is None and g.dp_group is None
    assert g.tp_ranks == (0,) and g.is_first_stage and g.is_last_stage
    with pytest.raises(ConfigError, match="mpu=None"):
        g.deepspeed_mpu()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_sizes(bad):
    with pytest.raises(ConfigError, match="positive integer"):
        axis_comm_lists("tp", tp=bad, pp=1, dp=1)


def test_from_grid_needs_distributed():
    with pytest.raises(ConfigError, match=r"torch\.distributed initialised"):
        ProcessGroups.from_grid(tp=1, pp=1, dp=1)


def test_rank_outside_grid():
    with pytest.raises(ConfigError, match=r"rank \(8\) outside the grid tp\*pp\*dp = 8"):
        grid_coords(8, tp=2, pp=2, dp=2)
