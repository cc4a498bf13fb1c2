"""Tensor parallelism on gloo against unsharded single-process references.

One spawned run per world size (spawning costs seconds) runs every check:
grid/groups, the four mappings, Column/Row/Embedding parity, TP-invariant
init and vocab-parallel cross entropy. World 2 covers TP=2; world 4 covers
TP=4 and TP=2 x DP=2 (each DP replica gets different data, so a collective
over the wrong group would show).

Tolerances (fp32): ``rtol=1e-5, atol=1e-6`` wherever a result crosses ranks
through an all-reduce (Row output, Column input gradient, the CE sums), whose
summation order differs from the reference, and for every matmul or reduction
over a shard: the shard has a different shape from the reference tensor and
CPU kernels pick their blocking/vectorisation by shape (observed: a few ulp).
Bitwise equal where there is neither: the embedding (the all-reduce adds exact
zeros), the replicated Row bias gradient, init. The mapping checks use integer-valued floats, so every sum is exact.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_msg.config import ConfigError, pad_vocab_size
from megatron_msg.parallel import (
    ColumnParallelLinear,
    ProcessGroups,
    RowParallelLinear,
    VocabParallelEmbedding,
    axis_comm_lists,
    copy_to_tp,
    gather_from_tp,
    gather_tensor,
    reduce_from_tp,
    scatter_to_tp,
    shard_tensor,
    vocab_parallel_cross_entropy,
)
from megatron_msg.parallel.groups import grid_coords
from tests.dist_utils import run_distributed

REDUCED = {"rtol": 1e-5, "atol": 1e-6}


def _randn(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen)


def _ints(seed: int, *shape: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, shape, generator=gen).float()


def _chunk(t: torch.Tensor, groups: ProcessGroups, dim: int) -> torch.Tensor:
    return t.chunk(groups.tp_size, dim=dim)[groups.tp_rank]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, **REDUCED)


def _exact(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert torch.equal(got, want), f"{what}: not bitwise equal, max |diff| {diff:.3g}"


# --------------------------------------------------------------------- groups


def _check_groups(rank: int, world: int, grids: list[tuple[int, int, int]]) -> list[ProcessGroups]:
    """Build each grid (collective) and check it; returns the groups for the TP checks."""
    built = []
    for tp, pp, dp in grids:
        g = ProcessGroups.from_grid(tp=tp, pp=pp, dp=dp)
        built.append(g)
        assert (g.tp_rank, g.pp_rank, g.dp_rank) == grid_coords(rank, tp=tp, pp=pp, dp=dp)
        assert (g.tp_size, g.pp_size, g.dp_size, g.world_size, g.rank) == (tp, pp, dp, world, rank)
        for axis, size in (("tp", tp), ("pp", pp), ("dp", dp), ("mp", tp * pp)):
            ranks = getattr(g, f"{axis}_ranks")
            assert list(ranks) in axis_comm_lists(axis, tp=tp, pp=pp, dp=dp) and rank in ranks
            group = getattr(g, f"{axis}_group")
            assert (group is None) == (size == 1), (axis, size)
            if group is not None:  # the group really spans exactly these ranks
                t = torch.tensor([float(rank)])
                dist.all_reduce(t, group=group)
                assert t.item() == sum(ranks), (axis, ranks, t.item())
        assert copy.deepcopy(g) is g
        mpu = g.deepspeed_mpu()
        t = torch.tensor([1.0])
        dist.all_reduce(t, group=mpu.get_data_parallel_group())
        assert t.item() == dp == mpu.get_data_parallel_world_size()
        dist.all_reduce(t, group=mpu.get_model_parallel_group())
        assert t.item() == dp * tp * pp
        assert mpu.get_model_parallel_rank() == g.pp_rank * tp + g.tp_rank
    with pytest.raises(
        ConfigError, match=rf"tp \(2\) \* pp \(2\) \* dp \(3\) = 12 != world size \({world}\)"
    ):
        ProcessGroups.from_grid(tp=2, pp=2, dp=3)
    return built


# ------------------------------------------------------------------- mappings


def _check_mappings(groups: ProcessGroups) -> None:
    tp, r, base = groups.tp_size, groups.tp_rank, 1000 * groups.dp_rank
    # copy: identity forward, gradients summed over TP.
    x = _ints(base + 1, 3, 8).requires_grad_(True)
    y = copy_to_tp(x, groups)
    _exact(y, x, "copy fwd")
    y.backward(_ints(base + 10 + r, 3, 8))
    _exact(x.grad, sum(_ints(base + 10 + i, 3, 8) for i in range(tp)), "copy bwd")
    # reduce: sum forward, identity backward.
    x = _ints(base + 20 + r, 3, 8).requires_grad_(True)
    y = reduce_from_tp(x, groups)
    _exact(y, sum(_ints(base + 20 + i, 3, 8) for i in range(tp)), "reduce fwd")
    y.backward(_ints(base + 30, 3, 8))
    _exact(x.grad, _ints(base + 30, 3, 8), "reduce bwd")
    for dim in (-1, 0):
        full_shape = (4 * tp, 3) if dim == 0 else (3, 4 * tp)
        part_shape = (4, 3) if dim == 0 else (3, 4)
        # scatter: keep own slice forward, gather gradients backward.
        x = _ints(base + 40, *full_shape).requires_grad_(True)
        y = scatter_to_tp(x, groups, dim=dim)
        _exact(y, _chunk(x.detach(), groups, dim), f"scatter fwd dim {dim}")
        y.backward(_ints(base + 50 + r, *part_shape))
        want = torch.cat([_ints(base + 50 + i, *part_shape) for i in range(tp)], dim=dim)
        _exact(x.grad, want, f"scatter bwd dim {dim}")
        # gather: concatenate forward, keep own slice of the gradient backward.
        x = _ints(base + 60 + r, *part_shape).requires_grad_(True)
        y = gather_from_tp(x, groups, dim=dim)
        want = torch.cat([_ints(base + 60 + i, *part_shape) for i in range(tp)], dim=dim)
        _exact(y, want, f"gather fwd dim {dim}")
        y.backward(_ints(base + 70, *full_shape))
        _exact(x.grad, _chunk(_ints(base + 70, *full_shape), groups, dim), f"gather bwd dim {dim}")


# --------------------------------------------------------------------- layers


def _load(layer: nn.Module, full: dict[str, torch.Tensor], groups: ProcessGroups) -> None:
    with torch.no_grad():
        for name, tensor in full.items():
            dim = layer.tp_split_dims[name]
            getattr(layer, name).copy_(shard_tensor(tensor, dim=dim, groups=groups))


def _grad(layer: nn.Module, name: str, groups: ProcessGroups) -> torch.Tensor:
    return gather_tensor(getattr(layer, name).grad, dim=layer.tp_split_dims[name], groups=groups)


def _reference_linear(seed: int, d_in: int, d_out: int):
    ref = nn.Linear(d_in, d_out)
    with torch.no_grad():
        ref.weight.copy_(_randn(seed, d_out, d_in))
        ref.bias.copy_(_randn(seed + 1, d_out))
    x = _randn(seed + 2, 2, 3, d_in).requires_grad_(True)
    g = _randn(seed + 3, 2, 3, d_out)
    y = ref(x)
    y.backward(g)
    full = {"weight": ref.weight.detach(), "bias": ref.bias.detach()}
    return full, x.detach(), g, y.detach(), x.grad, ref


def _check_column(groups: ProcessGroups, seed: int) -> None:
    full, x0, g, y_ref, dx_ref, ref = _reference_linear(seed, 8, 12)
    for gather_output in (False, True):
        layer = ColumnParallelLinear(8, 12, groups=groups, gather_output=gather_output)
        _load(layer, full, groups)
        x = x0.clone().requires_grad_(True)
        y = layer(x)
        if gather_output:
            _close(y, y_ref)
            y.backward(g)
        else:
            _close(y, _chunk(y_ref, groups, -1))
            y.backward(_chunk(g, groups, -1))
        torch.testing.assert_close(x.grad, dx_ref, **REDUCED)
        _close(_grad(layer, "weight", groups), ref.weight.grad)
        _close(_grad(layer, "bias", groups), ref.bias.grad)


def _check_row(groups: ProcessGroups, seed: int) -> None:
    full, x0, g, y_ref, dx_ref, ref = _reference_linear(seed, 12, 8)
    for input_is_parallel in (True, False):
        layer = RowParallelLinear(12, 8, groups=groups, input_is_parallel=input_is_parallel)
        _load(layer, full, groups)
        x = (_chunk(x0, groups, -1) if input_is_parallel else x0).clone().requires_grad_(True)
        y = layer(x)
        torch.testing.assert_close(y, y_ref, **REDUCED)
        y.backward(g)
        _close(x.grad, _chunk(dx_ref, groups, -1) if input_is_parallel else dx_ref)
        _close(_grad(layer, "weight", groups), ref.weight.grad)
        _exact(_grad(layer, "bias", groups), ref.bias.grad, "row db")


def _check_embedding(groups: ProcessGroups, seed: int) -> None:
    vocab = pad_vocab_size(50, tp_size=groups.tp_size, multiple=8)
    weight = _randn(seed, vocab, 6)
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(seed + 1))
    ids[0, : groups.tp_size] = torch.arange(groups.tp_size) * (
        vocab // groups.tp_size
    )  # shard starts
    ids[1, 0] = vocab - 1
    ref_w = weight.clone().requires_grad_(True)
    g = _randn(seed + 2, 3, 9, 6)
    y_ref = F.embedding(ids, ref_w)
    y_ref.backward(g)
    layer = VocabParallelEmbedding(vocab, 6, groups=groups)
    _load(layer, {"weight": weight}, groups)
    y = layer(ids)
    _exact(y, y_ref, "embedding fwd")
    y.backward(g)
    _exact(_grad(layer, "weight", groups), ref_w.grad, "embedding dW")


def _check_init_invariance(groups: ProcessGroups) -> None:
    """Canonical (gathered) weights at TP=N equal TP=1 from the same seed, bitwise."""
    single = ProcessGroups.single()
    for make in (
        lambda g: ColumnParallelLinear(8, 16, groups=g, seed=21),
        lambda g: RowParallelLinear(16, 8, groups=g, seed=22),
        lambda g: VocabParallelEmbedding(32, 8, groups=g, seed=23),
    ):
        sharded, whole = make(groups), make(single)
        for name, param in whole.named_parameters():
            _exact(
                gather_tensor(
                    getattr(sharded, name), dim=sharded.tp_split_dims[name], groups=groups
                ),
                param,
                f"init {type(whole).__name__}.{name}",
            )


# ---------------------------------------------------------------- cross entropy


def _check_cross_entropy(groups: ProcessGroups, seed: int) -> None:
    real_vocab = 50
    vocab = pad_vocab_size(real_vocab, tp_size=groups.tp_size, multiple=8)
    logits = _randn(seed, 3, 7, vocab, scale=3.0)
    target = torch.randint(0, real_vocab, (3, 7), generator=torch.Generator().manual_seed(seed + 1))
    target[0, :3] = -100
    target[1, : groups.tp_size] = torch.arange(groups.tp_size) * (vocab // groups.tp_size)
    target[2, 0] = vocab - 1  # a padded id is still a valid class
    weight = torch.rand(3, 7, generator=torch.Generator().manual_seed(seed + 2))  # loss mask
    ref_logits = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.view(-1, vocab), target.view(-1), reduction="none").view(3, 7)
    (ref * weight).sum().backward()

    shard = _chunk(logits, groups, -1).clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(shard, target, groups)
    torch.testing.assert_close(loss, ref, **REDUCED)
    assert torch.all(loss[0, :3] == 0)
    (loss * weight).sum().backward()
    torch.testing.assert_close(shard.grad, _chunk(ref_logits.grad, groups, -1), **REDUCED)
    assert torch.all(shard.grad[0, :3] == 0)
    # Validation happens before any collective, so every rank raises alike.
    with pytest.raises(
        ConfigError, match=rf"target id {vocab} outside the vocabulary \[0, {vocab}\)"
    ):
        vocab_parallel_cross_entropy(shard, torch.full((3, 7), vocab), groups)


# ----------------------------------------------------------------------- runs


def _tp_checks(groups: ProcessGroups) -> None:
    seed = 100 * groups.tp_size + 10_000 * groups.dp_rank  # DP replicas see different data
    _check_mappings(groups)
    _check_column(groups, seed + 1)
    _check_row(groups, seed + 2)
    _check_embedding(groups, seed + 3)
    _check_init_invariance(groups)
    _check_cross_entropy(groups, seed + 4)


# Group creation and teardown cost seconds on gloo: build few grids, reuse them.
GRIDS = {
    2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
    4: [(4, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 1)],
}


def _body(rank: int, world: int) -> None:
    built = _check_groups(rank, world, GRIDS[world])
    for groups in built:
        if groups.pp_size == 1 and groups.tp_size > 1:
            _tp_checks(groups)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel(world):
    run_distributed(_body, world_size=world)
