"""Every variant of the GPT model runs forward and backward, and its module tree
*is* the canonical name table (state_dict keys == canonical names)."""

import itertools

import pytest
import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model import GPTModel, canonical_init, parameter_specs
from megatron_msg.model.attention import apply_rope, rope_tables
from megatron_msg.parallel.groups import ProcessGroups

VARIANTS = list(
    itertools.product(
        ["layernorm", "rmsnorm"], ["gelu", "swiglu"], ["learned", "rope"], [True, False]
    )
)


def tiny(**changes) -> ModelConfig:
    base = dict(
        vocab_size=100,
        hidden_size=32,
        ffn_hidden_size=64,
        num_heads=4,
        head_dim=8,
        num_layers=2,
        max_seq_len=16,
    )
    return ModelConfig(**(base | changes))


@pytest.mark.parametrize(("norm", "act", "pos", "tied"), VARIANTS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_variant_forward_backward(norm, act, pos, tied, use_bias):
    config = tiny(
        norm=norm, activation=act, position_embedding=pos, tie_embeddings=tied, use_bias=use_bias
    )
    model = GPTModel(config, groups=ProcessGroups.single())
    model.init_weights(seed=3)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, config.padded_vocab_size())
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    # Near-uniform predictions at init: loss close to log(V_pad).
    assert abs(loss.item() - torch.log(torch.tensor(128.0)).item()) < 0.5
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.endswith("pos.weight"):  # positions >= 15 see no tokens
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    # The module tree mirrors the canonical table; init is the canonical init.
    state = model.state_dict()
    want = canonical_init(config, seed=3)
    assert list(state) == list(parameter_specs(config))
    for name, tensor in want.items():
        assert torch.equal(state[name], tensor), name
    assert ("lm_head.weight" in state) == (not tied)
    assert any(n.endswith(".bias") for n in state) == use_bias
    assert ("layers.0.mlp.gate.weight" in state) == (act == "swiglu")


def test_causal_prefix_is_unchanged_by_later_tokens():
    torch.manual_seed(1)
    tokens = torch.randint(0, 100, (1, 12))
    for pos in ("rope", "learned"):
        model = GPTModel(tiny(position_embedding=pos), groups=ProcessGroups.single(), init_seed=5)
        full = model(tokens)
        prefix = model(tokens[:, :6])
        torch.testing.assert_close(full[:, :6], prefix, rtol=0, atol=1e-5)


def test_rope_scores_depend_only_on_offsets():
    cos, sin = rope_tables(32, 8, base=10000.0)
    q, k = (
        torch.randn(1, 1, 1, 8, dtype=torch.float64),
        torch.randn(1, 1, 1, 8, dtype=torch.float64),
    )

    def score(i: int, j: int) -> float:
        qi = apply_rope(q, cos[i : i + 1].double(), sin[i : i + 1].double())
        kj = apply_rope(k, cos[j : j + 1].double(), sin[j : j + 1].double())
        return float((qi * kj).sum())

    assert abs(score(5, 2) - score(25, 22)) < 1e-5
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # it does rotate
    assert abs(score(3, 3) - float((q * k).sum())) < 1e-5


def test_dropout_uses_model_rng_and_is_off_in_eval():
    model = GPTModel(tiny(dropout=0.1), groups=ProcessGroups.single(), init_seed=1)
    tokens = torch.randint(0, 100, (2, 16))
    model.train()
    a, b = model(tokens), model(tokens)
    assert not torch.equal(a, b)
    model.init_weights(seed=1)  # reseeds the dropout streams
    c = model(tokens)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    global_state = torch.get_rng_state()
    model(tokens)
    assert torch.equal(global_state, torch.get_rng_state()), "dropout touched the global RNG"
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens), rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="norm must be one of"):
        tiny(norm="batchnorm")
    with pytest.raises(ConfigError, match="activation must be one of"):
        tiny(activation="relu")
    with pytest.raises(ConfigError, match=r"unknown model option\(s\) \['n_layer'\]"):
        ModelConfig.from_dict(tiny().to_dict() | {"n_layer": 3})
    with pytest.raises(
        ConfigError, match=r"num_heads \(4\) must be divisible by tensor parallel size \(3\)"
    ):
        tiny().validate(tp_size=3)
    with pytest.raises(ConfigError, match=r"ffn_hidden_size \(66\)"):
        tiny(ffn_hidden_size=66).validate(tp_size=4)
    model = GPTModel(tiny(), groups=ProcessGroups.single(), init_seed=0)
    with pytest.raises(ValueError, match=r"sequence length \(17\) exceeds max_seq_len \(16\)"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\]"):
        model(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        model.loss(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_loss_mask_weights_tokens():
    model = GPTModel(tiny(), groups=ProcessGroups.single(), init_seed=2)
    tokens = torch.randint(0, 100, (2, 8))
    labels = torch.randint(0, 100, (2, 8))
    mask = torch.zeros(2, 8)
    mask[0, :3] = 1
    want = torch.nn.functional.cross_entropy(model(tokens)[0, :3], labels[0, :3])
    torch.testing.assert_close(model.loss(tokens, labels, loss_mask=mask), want, rtol=0, atol=1e-6)
