"""grow() on canonical states: layout of the result, growth maps, carry_over, bad input."""

from __future__ import annotations

import pytest
import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.operators import LayerMap, carry_over, grow, is_mask_name
from megatron_msg.model.canonical import canonical_specs, parameter_specs
from megatron_msg.model.gpt import GPTModel
from megatron_msg.parallel.groups import ProcessGroups


def make_config(**overrides: object) -> ModelConfig:
    values: dict[str, object] = {
        "vocab_size": 100,
        "hidden_size": 24,
        "ffn_hidden_size": 40,
        "num_heads": 2,
        "num_layers": 2,
        "head_dim": 8,
        "max_seq_len": 16,
        "activation": "swiglu",
        "tie_embeddings": False,
    }
    values.update(overrides)
    return ModelConfig.from_dict(values)


SMALL = make_config()
BIG = SMALL.replace(hidden_size=40, ffn_hidden_size=72, num_heads=3, num_layers=5)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    model = GPTModel(SMALL, groups=ProcessGroups.single(), init_seed=1)
    return model.to_canonical()


def snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in state.items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_result_is_canonical_for_the_new_config(state):
    grown = grow(state, SMALL, BIG).state
    specs = canonical_specs(BIG)
    assert set(parameter_specs(BIG)) <= set(grown) <= set(specs)
    for name, tensor in grown.items():
        assert tuple(tensor.shape) == specs[name].shape, name
    # New units start hidden, old ones fully on (they were folded).
    hidden = grown["masks.hidden"]
    assert hidden[:24].eq(1).all() and hidden[24:].eq(0).all()
    heads = grown["layers.1.masks.heads"]
    assert heads.tolist() == [1.0, 1.0, 0.0]
    assert grown["layers.0.masks.ffn"][40:].eq(0).all()
    assert "layers.0.masks.depth" not in grown  # old layers stay folded
    assert [float(grown[f"layers.{i}.masks.depth"]) for i in (2, 3, 4)] == [0.0, 0.0, 0.0]


def test_qkv_new_heads_are_whole_row_blocks_at_the_end(state):
    grown = grow(state, SMALL, SMALL.replace(num_heads=3)).state
    old, new = state["layers.0.attn.qkv.weight"], grown["layers.0.attn.qkv.weight"]
    rows = 3 * 8 * 2  # 3 * head_dim * old heads, head-major q,k,v blocks
    assert torch.equal(new[:rows], old)
    assert new[rows:].shape == (3 * 8, 24) and new[rows:].std() > 0.01  # random, not zero
    assert torch.equal(
        grown["layers.0.attn.proj.weight"][:, : 8 * 2], state["layers.0.attn.proj.weight"]
    )


def test_new_entries_use_the_model_init_rules(state):
    grown = grow(state, SMALL, SMALL.replace(hidden_size=40)).state
    assert grown["final_norm.weight"][24:].eq(1).all()
    assert grown["final_norm.bias"][24:].eq(0).all()
    assert grown["layers.0.mlp.fc2.bias"][24:].eq(0).all()
    new_cols = grown["embed.word.weight"][:, 24:]
    assert abs(new_cols.std().item() - SMALL.init_std) < 0.005


def test_maps_locate_every_old_entry(state):
    result = grow(state, SMALL, BIG, depth_strategy="interleave")
    assert set(result.maps.tensors) == set(result.state)
    for name, tmap in result.maps.tensors.items():
        assert tmap.new_shape == tuple(result.state[name].shape)
        if tmap.source is None:
            assert tmap.ranges == ()
            continue
        assert tuple(state[tmap.source].shape) == tmap.old_shape
        assert torch.equal(result.state[name][tmap.index], state[tmap.source]), name
    # interleave 2 -> 5: layer 0, two copies of it, layer 1, one copy.
    assert [m.source for m in result.maps.layers] == [0, 0, 0, 1, 1]
    assert [m.is_new for m in result.maps.layers] == [False, True, True, False, True]
    assert result.maps.tensors["layers.4.mlp.gate.weight"].source == "layers.1.mlp.gate.weight"
    assert result.maps.tensors["layers.3.masks.heads"].source is None  # was folded


@pytest.mark.parametrize(
    ("strategy", "sources"),
    [
        ("stack", [0, 1, 0, 1, 0]),
        ("interleave", [0, 0, 0, 1, 1]),
        ("random", [0, 1, None, None, None]),
    ],
)
def test_depth_strategy_layer_order(state, strategy, sources):
    result = grow(state, SMALL, SMALL.replace(num_layers=5), depth_strategy=strategy)
    assert [m.source for m in result.maps.layers] == sources
    for index, layer in enumerate(result.maps.layers):
        qkv = result.state[f"layers.{index}.attn.qkv.weight"]
        if layer.source is None:
            assert not any(torch.equal(qkv, state[f"layers.{i}.attn.qkv.weight"]) for i in range(2))
            assert f"layers.{index}.masks.heads" not in result.state  # fresh layers run fully
        else:
            assert torch.equal(qkv, state[f"layers.{layer.source}.attn.qkv.weight"])
        assert (f"layers.{index}.masks.depth" in result.state) == layer.is_new
    assert result.maps.layers[2] == LayerMap(source=sources[2], is_new=True)


def test_copied_layers_draw_their_own_new_entries(state):
    grown = grow(state, SMALL, SMALL.replace(num_layers=3, ffn_hidden_size=48)).state
    old_part = grown["layers.2.mlp.fc1.weight"][:40]
    assert torch.equal(old_part, grown["layers.0.mlp.fc1.weight"][:40])
    assert not torch.equal(
        grown["layers.2.mlp.fc1.weight"][40:], grown["layers.0.mlp.fc1.weight"][40:]
    )


def test_deterministic_per_seed_and_never_aliases_the_input(state):
    before = snapshot(state)
    a = grow(state, SMALL, BIG, seed=3).state
    b = grow(state, SMALL, BIG, seed=3).state
    c = grow(state, SMALL, BIG, seed=4).state
    assert_same(a, b)
    assert not torch.equal(a["layers.0.attn.qkv.weight"], c["layers.0.attn.qkv.weight"])
    same_shape = grow(state, SMALL, SMALL).state
    for name, tensor in same_shape.items():
        assert torch.equal(tensor, state[name])
        tensor.add_(1.0)
    assert_same(state, before)


def test_growing_with_a_different_state_order_gives_the_same_result(state):
    reordered = dict(reversed(list(state.items())))
    a, b = grow(state, SMALL, BIG).state, grow(reordered, SMALL, BIG).state
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_carry_over_moments(state):
    result = grow(state, SMALL, BIG, depth_strategy="random")
    exp_avg = {n: torch.randn_like(t) for n, t in state.items() if not is_mask_name(n)}
    carried = carry_over(exp_avg, result.maps, fill=0.0)
    assert set(carried) == {n for n in result.state if not is_mask_name(n)}
    for name, tensor in carried.items():
        tmap = result.maps.tensors[name]
        assert tuple(tensor.shape) == tmap.new_shape
        if tmap.source is None:
            assert tensor.eq(0).all(), name
            continue
        assert torch.equal(tensor[tmap.index], exp_avg[tmap.source])
        assert tensor.sum().item() == pytest.approx(exp_avg[tmap.source].sum().item(), abs=1e-4)

    def mean_of_old(name, tmap, old):
        value = 0.5 if old is None else float(old.abs().mean())
        return torch.full(tmap.new_shape, value)

    carried = carry_over(exp_avg, result.maps, fill=mean_of_old)
    fc1 = carried["layers.0.mlp.fc1.weight"]
    assert fc1[40:].eq(float(exp_avg["layers.0.mlp.fc1.weight"].abs().mean())).all()
    assert carried["layers.4.mlp.fc1.weight"].eq(0.5).all()


def test_carry_over_rejects_missing_or_misshaped_sources(state):
    maps = grow(state, SMALL, BIG).maps
    moments = {n: torch.zeros_like(t) for n, t in state.items() if not is_mask_name(n)}
    partial = {n: t for n, t in moments.items() if n != "layers.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.fc2\.weight"):
        carry_over(partial, maps)
    wrong = {**moments, "layers.0.mlp.fc1.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        carry_over(wrong, maps)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": 16}, r"hidden_size 24 -> 16"),
        ({"ffn_hidden_size": 32}, r"ffn_hidden_size 40 -> 32"),
        ({"num_heads": 1}, r"num_heads 2 -> 1"),
        ({"num_layers": 1}, r"num_layers 2 -> 1"),
        ({"vocab_size": 200}, r"vocab_size: 100 -> 200"),
        ({"head_dim": 16}, r"head_dim: 8 -> 16"),
        ({"norm": "rmsnorm"}, r"norm: 'layernorm' -> 'rmsnorm'"),
        ({"tie_embeddings": True}, r"tie_embeddings: False -> True"),
        ({"max_seq_len": 32}, r"max_seq_len .* 16 -> 32"),
    ],
)
def test_bad_target_config_is_refused_and_input_untouched(state, change, message):
    before = snapshot(state)
    with pytest.raises(ConfigError, match=message):
        grow(state, SMALL, SMALL.replace(**change))
    assert_same(state, before)


@pytest.mark.parametrize(
    ("change", "tp", "message"),
    [
        ({"num_heads": 5}, 2, r"num_heads \(5\) must be divisible by tensor parallel size \(2\)"),
        ({"ffn_hidden_size": 42, "num_heads": 4}, 4, r"ffn_hidden_size \(42\) .* \(4\)"),
    ],
)
def test_sizes_the_tp_layout_cannot_hold(state, change, tp, message):
    before = snapshot(state)
    with pytest.raises(ConfigError, match=message):
        grow(state, SMALL, SMALL.replace(**change), tp_size=tp)
    assert_same(state, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init": "xavier"}, r"init must be one of \('normal',\) or a callable, got 'xavier'"),
        ({"depth_strategy": "middle"}, r"depth_strategy must be one of .*'middle'"),
        ({"tp_size": 0}, r"tp_size must be a positive integer, got 0"),
        ({"seed": 1.5}, r"seed must be an integer, got 1.5"),
    ],
)
def test_bad_options_are_refused(state, kwargs, message):
    before = snapshot(state)
    with pytest.raises(ConfigError, match=message):
        grow(state, SMALL, BIG, **kwargs)
    assert_same(state, before)


def test_state_not_matching_the_old_config_is_refused(state):
    with pytest.raises(ConfigError, match=r"hidden=40"):
        grow(state, BIG, BIG.replace(num_layers=6))
    missing = {n: t for n, t in state.items() if n != "layers.1.attn.proj.weight"}
    with pytest.raises(ConfigError, match=r"missing: layers\.1\.attn\.proj\.weight"):
        grow(missing, SMALL, BIG)


def test_init_callable_returning_a_wrong_shape_is_refused(state):
    before = snapshot(state)
    with pytest.raises(ValueError, match=r"init returned \(2,\) for .* shape"):
        grow(state, SMALL, BIG, init=lambda name, shape, gen: torch.zeros(2))
    assert_same(state, before)
