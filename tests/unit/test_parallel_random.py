"""TP-invariant init, slicing and RNG streams, checked in one process.

Shards are built with a ProcessGroups whose tp_rank is set by hand: slicing
and initialisation need no communication, so every rank of a TP=N layout can
be emulated here and the pieces concatenated.
"""

import pytest
import torch

from megatron_msg.config import ConfigError
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron_msg.parallel.random import (
    ParallelRNG,
    derive_seed,
    init_full,
    init_shard,
    normal_init,
    scaled_normal_init,
    shard_tensor,
)


def _rank(tp: int, r: int, pp_rank: int = 0) -> ProcessGroups:
    return ProcessGroups(tp_size=tp, tp_rank=r, pp_size=max(pp_rank + 1, 1), pp_rank=pp_rank)


def test_init_full_is_seeded_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a = init_full((6, 5), seed=7, init_method=normal_init(0.02))
    b = init_full((6, 5), seed=7, init_method=normal_init(0.02))
    c = init_full((6, 5), seed=8, init_method=normal_init(0.02))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)
    big = init_full((256, 256), seed=0, init_method=normal_init(0.02))
    assert abs(big.std().item() - 0.02) < 1e-3 and abs(big.mean().item()) < 1e-3
    scaled = init_full((256, 256), seed=0, init_method=scaled_normal_init(0.02, num_layers=8))
    torch.testing.assert_close(scaled, big / 4.0, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_shards_concatenate_to_full(tp, dim):
    full = init_full((8, 12), seed=3, init_method=normal_init(1.0))
    shards = [
        init_shard((8, 12), dim=dim, seed=3, groups=_rank(tp, r), init_method=normal_init(1.0))
        for r in range(tp)
    ]
    assert torch.equal(torch.cat(shards, dim=dim), full)
    assert all(s.is_contiguous() for s in shards)
    assert torch.equal(shard_tensor(full, dim=None, groups=_rank(tp, 1)), full)


def test_shard_not_divisible():
    with pytest.raises(
        ConfigError, match=r"dimension 0 of size 6 is not divisible by tensor parallel size \(4\)"
    ):
        shard_tensor(torch.zeros(6, 3), dim=0, groups=_rank(4, 0))


@pytest.mark.parametrize("tp", [2, 4])
def test_layer_init_is_tp_invariant(tp):
    """Concatenated shards of TP=N layers equal the TP=1 layer bitwise, default N(0, 0.02)."""
    single = ProcessGroups.single()
    col1 = ColumnParallelLinear(16, 32, groups=single, seed=11)
    row1 = RowParallelLinear(32, 16, groups=single, seed=12)
    emb1 = VocabParallelEmbedding(64, 16, groups=single, seed=13)
    cols = [ColumnParallelLinear(16, 32, groups=_rank(tp, r), seed=11) for r in range(tp)]
    rows = [RowParallelLinear(32, 16, groups=_rank(tp, r), seed=12) for r in range(tp)]
    embs = [VocabParallelEmbedding(64, 16, groups=_rank(tp, r), seed=13) for r in range(tp)]
    assert torch.equal(torch.cat([m.weight for m in cols], 0), col1.weight)
    assert torch.equal(torch.cat([m.weight for m in rows], 1), row1.weight)
    assert torch.equal(torch.cat([m.weight for m in embs], 0), emb1.weight)
    assert all(torch.all(m.bias == 0) for m in [*cols, *rows, col1, row1])
    assert cols[0].weight.shape == (32 // tp, 16) and cols[0].bias.shape == (32 // tp,)
    assert rows[0].weight.shape == (16, 32 // tp) and rows[0].bias.shape == (16,)
    assert embs[0].weight.shape == (64 // tp, 16)
    assert cols[0].weight.tensor_model_parallel and not rows[0].bias.tensor_model_parallel


def test_layer_reset_parameters_and_init_method():
    lin = ColumnParallelLinear(8, 8, groups=ProcessGroups.single(), seed=1)
    first = lin.weight.detach().clone()
    lin.reset_parameters(seed=2)
    assert not torch.equal(lin.weight, first)
    lin.reset_parameters(seed=1)
    assert torch.equal(lin.weight, first)
    lin.reset_parameters(seed=1, init_method=scaled_normal_init(0.02, num_layers=2))
    torch.testing.assert_close(lin.weight, first / 2.0, rtol=1e-6, atol=0)


def test_layer_size_errors():
    with pytest.raises(
        ConfigError, match=r"out_features \(30\) must be divisible by tensor parallel size \(4\)"
    ):
        ColumnParallelLinear(8, 30, groups=_rank(4, 0))
    with pytest.raises(ConfigError, match=r"in_features \(30\) must be divisible"):
        RowParallelLinear(30, 8, groups=_rank(4, 0))
    with pytest.raises(ConfigError, match=r"num_embeddings \(50\) must be divisible"):
        VocabParallelEmbedding(50, 8, groups=_rank(4, 0))


def test_derive_seed_stable_and_distinct():
    assert derive_seed(1, "layers.0.attn.qkv.weight") == derive_seed(1, "layers.0.attn.qkv.weight")
    seeds = {derive_seed(s, n) for s in (0, 1) for n in ("a", "b", "c")}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


def test_parallel_rng_streams():
    """The default stream is shared by TP ranks, the tp stream is not; pipeline stages differ."""
    before = torch.get_rng_state()
    rngs = [ParallelRNG(seed=5, groups=_rank(2, r)) for r in range(2)]
    x = torch.ones(1000)
    d = [r.dropout(x, 0.5, stream="default", training=True) for r in rngs]
    t = [r.dropout(x, 0.5, stream="tp", training=True) for r in rngs]
    assert torch.equal(d[0], d[1]) and not torch.equal(t[0], t[1])
    assert set(d[0].unique().tolist()) == {0.0, 2.0}
    assert 400 < int((d[0] == 0).sum()) < 600
    stage1 = ParallelRNG(seed=5, groups=_rank(2, 0, pp_rank=1))
    assert not torch.equal(stage1.dropout(x, 0.5, stream="default", training=True), d[0])
    assert torch.equal(torch.get_rng_state(), before)
    assert rngs[0].dropout(x, 0.5, stream="tp", training=False) is x


def test_parallel_rng_state_and_replay():
    rng = ParallelRNG(seed=9, groups=ProcessGroups.single())
    x = torch.ones(64)
    saved = rng.state_dict()
    first = rng.dropout(x, 0.3, stream="tp", training=True)
    after_first = rng.state_dict()
    with rng.replaying(saved):
        again = rng.dropout(x, 0.3, stream="tp", training=True)
    assert torch.equal(first, again)
    assert all(torch.equal(rng.state_dict()[k], after_first[k]) for k in after_first)
    second = rng.dropout(x, 0.3, stream="tp", training=True)
    rng.load_state_dict(after_first)
    assert torch.equal(rng.dropout(x, 0.3, stream="tp", training=True), second)
    with pytest.raises(ConfigError, match="unknown RNG stream 'mlp'"):
        rng.generator("mlp")
    with pytest.raises(ConfigError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        rng.dropout(x, 1.0, stream="tp", training=True)
