"""LR schedule values: warmup, cosine/linear decay, rewind with re-warmup, exact state."""

from __future__ import annotations

import itertools
import math

import pytest

from megatron_msg.config import ConfigError
from megatron_msg.training.lr import LRSchedule


def test_warmup_then_cosine():
    s = LRSchedule(peak_lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=14, decay_style="cosine")
    assert [s.lr_at(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr_at(4) == pytest.approx(1.0)
    # halfway through the decay (step 9 of 4..14) cosine is at the midpoint
    assert s.lr_at(9) == pytest.approx(0.55)
    assert s.lr_at(14) == pytest.approx(0.1) and s.lr_at(100) == pytest.approx(0.1)
    values = [s.lr_at(i) for i in range(4, 15)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_linear_and_constant():
    s = LRSchedule(peak_lr=2.0, min_lr=0.0, warmup_steps=0, decay_steps=10, decay_style="linear")
    assert [s.lr_at(i) for i in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    c = LRSchedule(peak_lr=2.0, warmup_steps=2, decay_steps=10, decay_style="constant")
    assert [c.lr_at(i) for i in (0, 1, 5, 50)] == pytest.approx([1.0, 2.0, 2.0, 2.0])


def test_rewind_rewarms_from_min_to_peak_then_decays():
    s = LRSchedule(peak_lr=1.0, min_lr=0.1, warmup_steps=2, decay_steps=22, rewarmup_steps=4)
    before = s.lr_at(9)
    s.rewind(step=10)
    assert [s.lr_at(10 + i) for i in range(4)] == pytest.approx([0.325, 0.55, 0.775, 1.0])
    assert s.lr_at(14) == pytest.approx(1.0)
    # decay restarts from the peak over the remaining steps 14..22
    assert s.lr_at(18) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(22) == pytest.approx(0.1)
    assert before < 1.0
    with pytest.raises(ValueError, match="before the last rewind"):
        s.lr_at(9)


def test_state_dict_restores_exactly():
    a = LRSchedule(peak_lr=1e-3, min_lr=1e-5, warmup_steps=3, decay_steps=100, rewarmup_steps=5)
    a.rewind(step=40)
    b = LRSchedule(peak_lr=1e-3, min_lr=1e-5, warmup_steps=3, decay_steps=100, rewarmup_steps=5)
    b.load_state_dict(a.state_dict())
    assert [a.lr_at(i) for i in range(40, 100)] == [b.lr_at(i) for i in range(40, 100)]
    assert b.rewinds == [40]


def test_bad_arguments_named():
    with pytest.raises(ConfigError, match=r"min_lr \(2.0\)"):
        LRSchedule(peak_lr=1.0, min_lr=2.0, decay_steps=10)
    with pytest.raises(ConfigError, match=r"warmup_steps \(20\)"):
        LRSchedule(peak_lr=1.0, warmup_steps=20, decay_steps=10)
