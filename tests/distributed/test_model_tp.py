"""TP=2 and TP=4 equal TP=1 from the same canonical weights: logits and every
parameter gradient (gathered to canonical), with all four mask kinds unfolded
at fractional values.

Tolerances: variant A runs in fp64 and must match to 1e-10 absolute (the only
difference is the order of partial sums in the TP all-reduces, ~1e-16 relative).
Variant B runs in fp32 and must match to 1e-5 absolute on logits and 1e-5
absolute + 1e-4 relative on gradients (summation order, fp32 rounding).
"""

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.growth.masks import fold_masks, get_masks, present_masks, set_masks
from megatron_msg.model import GPTModel, canonical_init, gather_canonical
from megatron_msg.parallel.groups import ProcessGroups
from tests.dist_utils import run_distributed

BASE = dict(
    vocab_size=100, hidden_size=32, ffn_hidden_size=64, num_heads=4, head_dim=8,
    num_layers=2, max_seq_len=16,
)  # fmt: skip
VARIANTS = [
    (ModelConfig(**BASE), torch.float64, 1e-10, 0.0),
    (
        ModelConfig(
            **BASE, norm="rmsnorm", activation="swiglu", position_embedding="rope",
            tie_embeddings=False, use_bias=False,
        ),
        torch.float32, 1e-5, 1e-4,
    ),
]  # fmt: skip


def fractional_masks(config: ModelConfig) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)

    def rand(*shape: int) -> torch.Tensor:
        return 0.2 + 0.8 * torch.rand(shape, generator=gen)

    return {
        "masks.hidden": rand(config.hidden_size),
        "layers.0.masks.heads": rand(config.num_heads),
        "layers.1.masks.ffn": rand(config.ffn_hidden_size),
        "layers.1.masks.depth": torch.tensor(0.3),
    }


def _run(config: ModelConfig, dtype: torch.dtype, groups: ProcessGroups) -> tuple:
    state = canonical_init(config, seed=21) | fractional_masks(config)
    tokens = torch.randint(
        0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    labels = torch.roll(tokens, -1, dims=1)
    model = GPTModel.from_canonical(state, config, groups=groups, dtype=dtype)
    logits = model(tokens)
    loss = model.loss(tokens, labels)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return model, logits.detach(), loss.detach(), gather_canonical(grads, config, groups=groups)


def _body(rank: int, world_size: int) -> None:
    groups = ProcessGroups.from_grid(tp=world_size, pp=1, dp=1)
    for config, dtype, atol, rtol in VARIANTS:
        ref_model, ref_logits, ref_loss, ref_grads = _run(config, dtype, ProcessGroups.single())
        model, logits, loss, grads = _run(config, dtype, groups)
        vocab = ref_logits.shape[-1] // world_size
        want = ref_logits[..., rank * vocab : (rank + 1) * vocab]
        torch.testing.assert_close(logits, want, rtol=0, atol=atol)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=atol)
        assert list(grads) == list(ref_grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=rtol, atol=atol, msg=name)
        # Masks are sharded like what they mask and gather back to canonical.
        heads = model.layers[0].masks.get("heads")
        assert heads is not None and heads.shape == (config.num_heads // world_size,)
        canonical = model.to_canonical()
        ref_state = ref_model.to_canonical()
        assert list(canonical) == list(ref_state)
        assert all(torch.equal(canonical[n], ref_state[n]) for n in canonical)
    # Folding is collective: a mask all ones on some shards only stays unfolded.
    ffn = torch.ones(64)
    ffn[-1] = 0.5
    set_masks(model, {"layers.0.masks.ffn": ffn, "layers.0.masks.depth": 1.0})
    assert fold_masks(model) == ["layers.0.masks.depth"]
    assert "layers.0.masks.ffn" in present_masks(model)
    assert torch.equal(get_masks(model)["layers.0.masks.ffn"], ffn)


def test_tp2_matches_tp1():
    run_distributed(_body, world_size=2)


def test_tp4_matches_tp1():
    run_distributed(_body, world_size=4)
