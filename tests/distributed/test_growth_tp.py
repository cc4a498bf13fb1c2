"""Growth at TP=2 and TP=4 (gloo): to_canonical -> grow -> from_canonical at that TP.

The grown, sharded model's gathered logits must match an unsharded small
reference built from the same canonical weights (max |delta| <= 1e-5 in fp32:
the sharded matmuls and the all-reduce sum in a different order).
"""

from __future__ import annotations

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.growth import grow, measure_preservation
from megatron_msg.model.gpt import GPTModel
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.random import gather_tensor
from tests.dist_utils import run_distributed


def _config(tp: int, **variant: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=100,
        hidden_size=24,
        ffn_hidden_size=8 * tp,
        num_heads=tp,
        num_layers=2,
        head_dim=8,
        max_seq_len=16,
        init_std=0.2,
        **variant,  # type: ignore[arg-type]
    )


def _body(rank: int, world_size: int) -> None:
    tp = world_size
    groups = ProcessGroups.from_grid(tp=tp, pp=1, dp=1)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    variants = [
        {},
        {
            "norm": "rmsnorm",
            "activation": "swiglu",
            "position_embedding": "rope",
            "tie_embeddings": False,
        },
    ]
    for variant in variants:
        small = _config(tp, **variant)
        # Non-multiple hidden (24 -> 40); heads and ffn grow by amounts TP can hold.
        big = small.replace(hidden_size=40, ffn_hidden_size=12 * tp, num_heads=2 * tp, num_layers=3)
        sharded_small = GPTModel(small, groups=groups, init_seed=3)
        state = sharded_small.to_canonical()
        grown = grow(state, small, big, tp_size=tp, seed=4).state
        model = GPTModel.from_canonical(grown, big, groups=groups).eval()
        reference = GPTModel.from_canonical(state, small, groups=ProcessGroups.single()).eval()
        with torch.no_grad():
            shard = model(tokens)
            assert shard.shape[-1] == 128 // tp
            logits = gather_tensor(shard, dim=2, groups=groups)[..., :100]
            expected = reference(tokens)[..., :100]
            loss, expected_loss = model.loss(tokens, tokens), reference.loss(tokens, tokens)
        delta = (logits - expected).abs().max().item()
        assert delta <= 1e-5, f"tp={tp} {variant}: max |dlogits| {delta}"
        assert abs(loss.item() - expected_loss.item()) <= 1e-5
        # The same check through verify.py, both models sharded.
        report = measure_preservation(state, small, grown, big, tokens=tokens, groups=groups)
        assert report.ok, f"tp={tp} {variant}: {report}"
        # And the grown model gathers back to exactly the grown canonical state.
        back = model.to_canonical()
        assert set(back) == set(grown)
        assert all(torch.equal(back[n], grown[n].to(back[n].dtype)) for n in grown)


def test_growth_tp2():
    run_distributed(_body, world_size=2)


def test_growth_tp4():
    run_distributed(_body, world_size=4)
