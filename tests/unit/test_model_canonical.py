"""Canonical state: round trip, validation, TP-invariant per-tensor init."""

import pytest
import torch

from megatron_msg.config import ModelConfig
from megatron_msg.growth.masks import set_masks
from megatron_msg.model import (
    CanonicalStateError,
    GPTModel,
    canonical_init,
    canonical_specs,
    init_canonical_tensor,
    init_method_for,
)
from megatron_msg.parallel.groups import ProcessGroups

SINGLE = ProcessGroups.single()


def tiny(**changes) -> ModelConfig:
    base = dict(
        vocab_size=100, hidden_size=32, ffn_hidden_size=64, num_heads=4, head_dim=8,
        num_layers=2, max_seq_len=16,
    )  # fmt: skip
    return ModelConfig(**(base | changes))


@pytest.mark.parametrize(
    "changes",
    [{}, {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
          "tie_embeddings": False, "use_bias": False}],
)  # fmt: skip
def test_round_trip_gives_identical_logits(changes):
    config = tiny(**changes)
    model = GPTModel(config, groups=SINGLE, init_seed=11)
    set_masks(model, {"masks.hidden": torch.rand(32), "layers.1.masks.heads": 0.25,
                      "layers.0.masks.ffn": torch.rand(64), "layers.1.masks.depth": 0.5})  # fmt: skip
    state = model.to_canonical()
    assert {"masks.hidden", "layers.1.masks.heads", "layers.0.masks.ffn",
            "layers.1.masks.depth"} <= set(state)  # fmt: skip
    assert "layers.0.masks.heads" not in state  # folded masks are absent
    for name, tensor in state.items():
        assert tuple(tensor.shape) == canonical_specs(config)[name].shape, name
    clone = GPTModel.from_canonical(state, config, groups=SINGLE)
    tokens = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(clone(tokens), model(tokens), rtol=0, atol=0)
    again = clone.to_canonical()
    assert list(again) == list(state)
    for name in state:
        assert torch.equal(again[name], state[name]), name


def test_load_canonical_folds_masks_absent_from_state():
    config = tiny()
    model = GPTModel(config, groups=SINGLE, init_seed=1)
    plain = model.to_canonical()
    set_masks(model, {"layers.0.masks.depth": 0.0})
    model.load_canonical(plain)
    assert "layers.0.masks.depth" not in model.state_dict()


def test_canonical_validation_names_the_problem():
    config = tiny()
    state = canonical_init(config, seed=0)
    missing = dict(state)
    del missing["layers.1.attn.qkv.weight"]
    with pytest.raises(CanonicalStateError, match=r"missing: layers\.1\.attn\.qkv\.weight"):
        GPTModel.from_canonical(missing, config, groups=SINGLE)
    extra = state | {"layers.2.norm1.weight": torch.ones(32)}
    with pytest.raises(CanonicalStateError, match=r"unexpected: layers\.2\.norm1\.weight"):
        GPTModel.from_canonical(extra, config, groups=SINGLE)
    bad = state | {"layers.0.mlp.fc1.weight": torch.zeros(48, 32)}
    with pytest.raises(
        CanonicalStateError,
        match=r"wrong shape: layers\.0\.mlp\.fc1\.weight \(48, 32\) \(expected \(64, 32\)\)",
    ):
        GPTModel.from_canonical(bad, config, groups=SINGLE)
    bad_mask = state | {"layers.0.masks.heads": torch.ones(5)}
    with pytest.raises(CanonicalStateError, match=r"layers\.0\.masks\.heads \(5,\)"):
        GPTModel.from_canonical(bad_mask, config, groups=SINGLE)
    # Nothing changed on a failed load.
    model = GPTModel(config, groups=SINGLE, init_seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CanonicalStateError):
        model.load_canonical(bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_per_tensor_init_is_independent_of_config_and_order():
    """A tensor's init depends only on (seed, name, shape): growth can reuse it for new weights."""
    small, big = tiny(), tiny(num_layers=3, vocab_size=90)
    a = init_canonical_tensor("layers.1.attn.qkv.weight", small, seed=7)
    b = canonical_init(big, seed=7)["layers.1.attn.qkv.weight"]
    assert torch.equal(a, b)
    assert not torch.equal(a, init_canonical_tensor("layers.0.attn.qkv.weight", small, seed=7))
    assert torch.equal(init_canonical_tensor("final_norm.weight", small, seed=7), torch.ones(32))
    assert torch.equal(
        init_canonical_tensor("layers.0.mlp.fc2.bias", small, seed=7), torch.zeros(32)
    )
    std = init_canonical_tensor("layers.0.attn.qkv.weight", tiny(hidden_size=256), seed=0).std()
    assert abs(std.item() - 0.02) < 0.002
    proj = init_canonical_tensor("layers.0.mlp.fc2.weight", tiny(hidden_size=256), seed=0).std()
    assert abs(proj.item() - 0.02 / 2.0) < 0.002  # scaled by 1/sqrt(2 * num_layers)
    with pytest.raises(CanonicalStateError, match="not a parameter"):
        init_method_for("layers.5.attn.qkv.weight", small)
