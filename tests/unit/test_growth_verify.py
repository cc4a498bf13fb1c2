"""verify.py: the preservation check passes on a real growth and fails on a broken one."""

from __future__ import annotations

import pytest
import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth import (
    FunctionPreservationError,
    check_function_preservation,
    grow,
    measure_preservation,
)
from megatron_msg.model.gpt import GPTModel
from megatron_msg.parallel.groups import ProcessGroups

SMALL = ModelConfig(
    vocab_size=100,
    hidden_size=24,
    ffn_hidden_size=40,
    num_heads=2,
    num_layers=2,
    head_dim=8,
    max_seq_len=16,
    init_std=0.2,
)
BIG = SMALL.replace(hidden_size=40, ffn_hidden_size=48, num_heads=3, num_layers=3)
TOKENS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    small = GPTModel(SMALL, groups=ProcessGroups.single(), dtype=torch.float64, init_seed=2)
    state = small.to_canonical()
    return state, grow(state, SMALL, BIG, seed=1).state


def test_passes_on_a_real_growth(states):
    small, big = states
    report = check_function_preservation(small, SMALL, big, BIG, tokens=TOKENS, dtype=torch.float64)
    assert report.ok and report.tolerance == 1e-10
    assert report.max_abs_logits <= 1e-10 and report.delta_loss <= 1e-10
    assert report.loss_small == pytest.approx(report.loss_big, abs=1e-10)
    assert 3.0 < report.loss_small < 6.0  # ~ log(128): a real loss was measured
    labels = torch.zeros_like(TOKENS)
    with_labels = measure_preservation(small, SMALL, big, BIG, tokens=TOKENS, labels=labels)
    assert with_labels.tolerance == 1e-5 and with_labels.ok
    assert with_labels.loss_small != pytest.approx(report.loss_small, abs=1e-3)


def test_raises_when_the_new_units_leak(states):
    small, big = states
    leaky = dict(big)
    leaky["masks.hidden"] = torch.where(big["masks.hidden"] == 0, 1e-3, big["masks.hidden"])
    with pytest.raises(FunctionPreservationError, match="not function-preserving") as info:
        check_function_preservation(small, SMALL, leaky, BIG, tokens=TOKENS, dtype=torch.float64)
    assert info.value.report.max_abs_logits > 1e-10
    assert not info.value.report.ok


def test_tolerance_must_be_known_or_given(states):
    small, big = states
    with pytest.raises(ConfigError, match=r"no default tolerance for torch.bfloat16"):
        measure_preservation(small, SMALL, big, BIG, tokens=TOKENS, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match=r"tolerance must be >= 0, got -1"):
        measure_preservation(small, SMALL, big, BIG, tokens=TOKENS, tolerance=-1.0)
