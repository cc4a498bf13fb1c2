"""The Net2Net/bert2BERT copy operator: exact for FFN, heads and layers; hidden moves the norms.

Uses test_growth_preservation's small models (init_std 0.2, logits O(1)), so a
leak of any copied unit would show far above the tolerance.
"""

from __future__ import annotations

import pytest
import torch

from megatron_msg.config import ConfigError
from megatron_msg.growth.net2net import UnitCopies, net2net_grow
from megatron_msg.growth.operators import grow, is_mask_name
from megatron_msg.growth.verify import TOLERANCES, measure_preservation
from megatron_msg.model.canonical import parameter_specs

from .test_growth_preservation import GROWTHS, VARIANTS, initial_state, make_config, tokens

EXACT = ("ffn", "heads", "layers")


@pytest.mark.parametrize(
    ("norm", "activation", "position", "tied"),
    VARIANTS,
    ids=["-".join(map(str, v)) for v in VARIANTS],
)
def test_ffn_heads_and_layers_are_exact_in_every_variant(norm, activation, position, tied):
    small = make_config(
        norm=norm, activation=activation, position_embedding=position, tie_embeddings=tied
    )
    state = initial_state(small, torch.float64)
    for label in EXACT:
        big = small.replace(**GROWTHS[label])
        grown = net2net_grow(state, small, big, seed=4).state
        report = measure_preservation(
            state, small, grown, big, tokens=tokens(), dtype=torch.float64
        )
        assert report.ok, f"{label}: {report}"
    big = small.replace(ffn_hidden_size=72, num_heads=3, num_layers=4)
    grown = net2net_grow(state, small, big, seed=4).state
    report = measure_preservation(state, small, grown, big, tokens=tokens(), dtype=torch.float32)
    assert report.max_abs_logits <= TOLERANCES[torch.float32], report


@pytest.mark.parametrize(
    ("norm", "activation", "position", "tied"),
    VARIANTS,
    ids=["-".join(map(str, v)) for v in VARIANTS],
)
def test_doubling_the_width_is_exact_even_through_the_norms(norm, activation, position, tied):
    """Balanced copies: every channel once more, so the norms' statistics stay put; the
    split final norm keeps tied logits exact."""
    small = make_config(
        norm=norm, activation=activation, position_embedding=position, tie_embeddings=tied
    )
    big = small.replace(hidden_size=48, ffn_hidden_size=80, num_heads=4, num_layers=4)
    state = initial_state(small, torch.float64)
    grown = net2net_grow(state, small, big, seed=4).state
    report = measure_preservation(state, small, grown, big, tokens=tokens(), dtype=torch.float64)
    assert report.ok, report


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("tied", [True, False])
def test_uneven_hidden_growth_changes_the_function_through_the_norms(norm, tied):
    """24 -> 40 channels: some copied, some not, so the norms' statistics move; far less
    than MSG's new units would move the output with their masks switched on."""
    small = make_config(norm=norm, tie_embeddings=tied)
    big = small.replace(**GROWTHS["hidden"])
    state = initial_state(small, torch.float64)
    copied = net2net_grow(state, small, big, seed=4).state
    moved = measure_preservation(state, small, copied, big, tokens=tokens(), dtype=torch.float64)
    assert not moved.ok and moved.max_abs_logits > 1e-3
    unmasked = {
        n: t for n, t in grow(state, small, big, seed=4).state.items() if not is_mask_name(n)
    }
    random_on = measure_preservation(
        state, small, unmasked, big, tokens=tokens(), dtype=torch.float64
    )
    assert moved.max_abs_logits < random_on.max_abs_logits


def test_result_is_canonical_without_masks_and_new_layers_are_identity_blocks():
    small = make_config(activation="swiglu", use_bias=True)
    big = small.replace(**GROWTHS["all"])
    state = initial_state(small, torch.float32)
    result = net2net_grow(state, small, big, depth_strategy="interleave", seed=1)
    assert set(result.state) == set(parameter_specs(big))
    for name, spec in parameter_specs(big).items():
        assert tuple(result.state[name].shape) == spec.shape, name
    for index, layer in enumerate(result.maps.layers):
        for local in ("attn.proj", "mlp.fc2"):
            weight_zero = bool(result.state[f"layers.{index}.{local}.weight"].eq(0).all())
            assert weight_zero == layer.is_new, (index, local)
            if layer.is_new:  # biases start at 0 anyway; a new layer's must stay 0
                assert bool(result.state[f"layers.{index}.{local}.bias"].eq(0).all())


def test_copies_repeat_their_source_and_split_shares_sum_to_the_old_weight():
    small = make_config(use_bias=False)
    big = small.replace(ffn_hidden_size=72, num_heads=3)
    state = initial_state(small, torch.float64)
    grown = net2net_grow(state, small, big, seed=9).state
    fc1, fc2 = grown["layers.1.mlp.fc1.weight"], grown["layers.1.mlp.fc2.weight"]
    copies = UnitCopies.draw(40, 72, seed=9, name="layers.1.ffn")
    for j in range(40, 72):
        assert torch.equal(fc1[j], fc1[int(copies.source[j])])
    old_fc2 = state["layers.1.mlp.fc2.weight"]
    summed = torch.zeros_like(old_fc2).index_add_(1, copies.source, fc2)
    torch.testing.assert_close(summed, old_fc2, rtol=0, atol=1e-12)
    # Unequal shares break the copies' symmetry: their outgoing columns differ.
    j = 40
    k = int(copies.source[j])
    assert not torch.allclose(fc2[:, j], fc2[:, k])
    qkv = grown["layers.0.attn.qkv.weight"]
    heads = UnitCopies.draw(2, 3, seed=9, name="layers.0.heads")
    src = int(heads.source[2])
    assert torch.equal(qkv[2 * 24 : 3 * 24], qkv[src * 24 : (src + 1) * 24])  # 3 * head_dim rows


def test_unit_copies_are_balanced_and_shares_sum_to_one():
    copies = UnitCopies.draw(5, 13, seed=0, name="x")
    assert copies.source[:5].tolist() == list(range(5))
    counts = torch.bincount(copies.source, minlength=5)
    assert int(counts.max()) - int(counts.min()) <= 1  # 13 units over 5: 2 or 3 each
    assert int(copies.source.max()) < 5 and bool((copies.share > 0).all())
    totals = torch.zeros(5, dtype=torch.float64).index_add_(0, copies.source, copies.share)
    torch.testing.assert_close(totals, torch.ones(5, dtype=torch.float64))
    again = UnitCopies.draw(5, 13, seed=0, name="x")
    assert torch.equal(again.source, copies.source) and torch.equal(again.share, copies.share)


def test_deterministic_and_never_aliases_the_input():
    small = make_config()
    big = small.replace(**GROWTHS["all"])
    state = initial_state(small, torch.float32)
    before = {n: t.clone() for n, t in state.items()}
    a = net2net_grow(state, small, big, seed=3).state
    b = net2net_grow(dict(reversed(state.items())), small, big, seed=3).state
    for name in a:
        assert torch.equal(a[name], b[name]), name
    a["layers.0.norm1.weight"].add_(1)
    for name, t in state.items():
        assert torch.equal(t, before[name]), name


def test_a_model_with_ramping_masks_is_refused():
    small = make_config()
    middle = small.replace(ffn_hidden_size=56)
    ramping = grow(initial_state(small, torch.float32), small, middle, seed=1).state
    assert any(is_mask_name(n) for n in ramping)
    with pytest.raises(ConfigError, match=r"masks below 1: .*masks\.ffn"):
        net2net_grow(ramping, middle, middle.replace(num_heads=3), seed=1)
    folded = {n: torch.ones_like(t) if is_mask_name(n) else t for n, t in ramping.items()}
    net2net_grow(folded, middle, middle.replace(num_heads=3), seed=1)
