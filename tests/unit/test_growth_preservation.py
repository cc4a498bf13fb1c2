"""Function preservation of growth: every variant, every dimension, fp32 and fp64.

Tolerances (DESIGN.md): max |delta logits| <= 1e-5 in fp32 (the grown model
reduces over longer axes, in a different order), <= 1e-10 in fp64; the loss
likewise. Weights use init_std 0.2 so logits are O(1) and a leak through any
new unit would show far above the tolerance (see test_growth_is_not_trivial).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_msg.config import ModelConfig
from megatron_msg.growth.operators import grow, is_mask_name
from megatron_msg.growth.verify import TOLERANCES, measure_preservation
from megatron_msg.model.gpt import GPTModel
from megatron_msg.parallel.groups import ProcessGroups

VARIANTS = list(
    itertools.product(
        ("layernorm", "rmsnorm"), ("gelu", "swiglu"), ("learned", "rope"), (True, False)
    )
)
SMALL = {"hidden_size": 24, "ffn_hidden_size": 40, "num_heads": 2, "num_layers": 2}
GROWTHS = {
    "hidden": {"hidden_size": 40},
    "ffn": {"ffn_hidden_size": 72},
    "heads": {"num_heads": 3},
    "layers": {"num_layers": 4},
    "all": {"hidden_size": 40, "ffn_hidden_size": 72, "num_heads": 3, "num_layers": 4},
}


def make_config(**overrides: object) -> ModelConfig:
    values: dict[str, object] = {
        "vocab_size": 100,
        "head_dim": 8,
        "max_seq_len": 16,
        "init_std": 0.2,
        **SMALL,
    }
    values.update(overrides)
    return ModelConfig.from_dict(values)


def initial_state(
    config: ModelConfig, dtype: torch.dtype, seed: int = 1
) -> dict[str, torch.Tensor]:
    model = GPTModel(config, groups=ProcessGroups.single(), dtype=dtype, init_seed=seed)
    return model.to_canonical()


def tokens(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    ("norm", "activation", "position", "tied"),
    VARIANTS,
    ids=["-".join(map(str, v)) for v in VARIANTS],
)
def test_each_dimension_and_all_at_once(norm, activation, position, tied, dtype):
    small = make_config(
        norm=norm, activation=activation, position_embedding=position, tie_embeddings=tied
    )
    state = initial_state(small, dtype)
    for label, change in GROWTHS.items():
        big = small.replace(**change)
        grown = grow(state, small, big, seed=11).state
        report = measure_preservation(state, small, grown, big, tokens=tokens(), dtype=dtype)
        assert report.ok, f"{label}: {report}"
        assert report.max_abs_logits <= TOLERANCES[dtype]


def test_non_multiple_sizes_fp64_and_fp32():
    small = make_config(hidden_size=96, ffn_hidden_size=200, num_heads=3, num_layers=2)
    big = small.replace(hidden_size=160, ffn_hidden_size=328, num_heads=5, num_layers=5)
    for dtype in (torch.float32, torch.float64):
        state = initial_state(small, dtype)
        grown = grow(state, small, big, seed=5).state
        assert grown["layers.4.attn.qkv.weight"].shape == (3 * 8 * 5, 160)
        assert grown["layers.0.mlp.fc1.weight"].shape == (328, 160)
        report = measure_preservation(state, small, grown, big, tokens=tokens(), dtype=dtype)
        assert report.ok, report


@pytest.mark.parametrize("strategy", ["stack", "interleave", "random"])
def test_depth_strategies(strategy):
    small = make_config(num_layers=2)
    state = initial_state(small, torch.float64)
    for change in ({"num_layers": 5}, {**GROWTHS["all"], "num_layers": 5}):
        big = small.replace(**change)
        grown = grow(state, small, big, depth_strategy=strategy, seed=2).state
        report = measure_preservation(
            state, small, grown, big, tokens=tokens(), dtype=torch.float64
        )
        assert report.ok, f"{strategy} {change}: {report}"


def _half_ramped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state as it is mid-ramp: every mask entry at 0 moved to 0.5."""
    return {
        name: torch.where(t == 0, torch.full_like(t, 0.5), t) if is_mask_name(name) else t
        for name, t in state.items()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "variant", [VARIANTS[0], VARIANTS[-1]], ids=["ln-gelu-learned-tied", "rms-swiglu-rope-untied"]
)
def test_growth_twice_with_fractional_masks(variant, dtype):
    norm, activation, position, tied = variant
    small = make_config(
        norm=norm, activation=activation, position_embedding=position, tie_embeddings=tied
    )
    middle = small.replace(hidden_size=32, ffn_hidden_size=56, num_heads=3, num_layers=3)
    big = middle.replace(hidden_size=44, ffn_hidden_size=60, num_heads=5, num_layers=5)
    first = grow(initial_state(small, dtype), small, middle, seed=1).state
    ramping = _half_ramped(first)
    assert float(ramping["masks.hidden"].min()) == 0.5
    second = grow(ramping, middle, big, depth_strategy="interleave", seed=2).state
    hidden = second["masks.hidden"]
    assert hidden[:24].eq(1).all() and hidden[24:32].eq(0.5).all() and hidden[32:].eq(0).all()
    report = measure_preservation(ramping, middle, second, big, tokens=tokens(), dtype=dtype)
    assert report.ok, report


@pytest.mark.parametrize("dimension", ["hidden", "ffn", "heads", "layers"])
def test_growth_is_not_trivial(dimension):
    """With the new masks at 1 the new (random) units do change the output: preservation
    comes from the masks, not from new weights that happen to be inert."""
    small = make_config()
    big = small.replace(**GROWTHS[dimension])
    state = initial_state(small, torch.float64)
    grown = grow(state, small, big, seed=3).state
    assert any(is_mask_name(n) and n not in state for n in grown)
    unmasked = {n: t for n, t in grown.items() if not is_mask_name(n)}  # absent = all ones
    report = measure_preservation(state, small, unmasked, big, tokens=tokens(), dtype=torch.float64)
    assert report.max_abs_logits > 1e-3, report
    assert not report.ok


def test_large_random_init_still_preserving():
    """A callable init with huge values: preservation must not depend on small new weights."""

    def huge(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * 3.0

    small = make_config(norm="rmsnorm", activation="swiglu")
    big = small.replace(**GROWTHS["all"])
    state = initial_state(small, torch.float64)
    grown = grow(state, small, big, init=huge, depth_strategy="random", seed=4).state
    assert grown["layers.3.mlp.fc2.weight"].abs().max() > 3.0  # the callable was used
    report = measure_preservation(state, small, grown, big, tokens=tokens(), dtype=torch.float64)
    assert report.ok, report
