"""growth/schedule_search.py: the lattice of candidate shapes and the loss-per-second
search, on constructed curves whose best schedule is known in closed form."""

from __future__ import annotations

import pytest

from megatron_msg.growth.schedule_search import (
    Curve,
    ScheduleSearchError,
    candidate_shapes,
    parse_shape,
    paths_considered,
    search,
)

SMALL, MID, BIG = (64, 256, 2, 2), (128, 512, 2, 2), (128, 512, 4, 4)


def linear_then_flat(*, start: float, floor: float, rate: float, seconds_per_step: float,
                     horizon: float) -> Curve:  # fmt: skip
    """Loss falls by ``rate`` per second from ``start`` to ``floor``, then stays there;
    sampled every second up to ``horizon`` seconds."""
    seconds = [float(t) for t in range(int(horizon) + 1)]
    losses = [max(floor, start - rate * t) for t in seconds]
    return Curve(
        steps=tuple(t / seconds_per_step for t in seconds),
        seconds=tuple(seconds),
        losses=tuple(losses),
    )


def test_grows_where_the_larger_shape_becomes_faster_per_second():
    # small: 0.2 loss/s down to 5 (10 s), then flat; big: 0.1 loss/s down to 3 (40 s).
    # Best: small until loss 5 (10 s, 100 steps at 0.1 s/step), then big from 5 to 3
    # (T_big(3) - T_big(5) = 40 - 20 = 20 s): 30 s against 40 s from scratch.
    curves = {
        SMALL: linear_then_flat(start=7, floor=5, rate=0.2, seconds_per_step=0.1, horizon=40),
        BIG: linear_then_flat(start=7, floor=3, rate=0.1, seconds_per_step=0.4, horizon=40),
    }
    result = search(curves, start=SMALL, target=BIG, train_steps=1000)
    assert [leg.shape for leg in result.legs] == [SMALL, BIG]
    assert result.growth_steps == [100]
    assert result.predicted_seconds == pytest.approx(30.0, abs=0.1)
    assert result.scratch_seconds == pytest.approx(40.0)
    assert result.predicted_speedup == pytest.approx(40 / 30, rel=0.01)
    assert result.legs[1].steps == pytest.approx(50.0, abs=1)  # 20 s at 0.4 s/step
    assert not result.clamped and not result.horizon_limited
    stages = result.growth_stages(ramp_steps=7)
    assert stages == [{"start_step": 100, "ramp_steps": 7, "hidden_size": 128,
                       "ffn_hidden_size": 512, "num_heads": 4, "num_layers": 4}]  # fmt: skip


def test_a_slower_small_shape_means_training_the_target_from_the_start():
    curves = {
        SMALL: linear_then_flat(start=7, floor=5, rate=0.05, seconds_per_step=0.1, horizon=40),
        BIG: linear_then_flat(start=7, floor=3, rate=0.1, seconds_per_step=0.4, horizon=40),
    }
    result = search(curves, start=SMALL, target=BIG, train_steps=1000)
    assert result.growth_steps == [1]  # at once (the start shape trains no real step)
    assert result.predicted_speedup == pytest.approx(1.0, abs=0.01)


def test_an_intermediate_shape_is_used_when_it_pays():
    # small fastest down to 6, mid fastest from 6 to 4, big needed below 4.
    curves = {
        SMALL: linear_then_flat(start=7, floor=6, rate=0.5, seconds_per_step=0.1, horizon=60),
        MID: linear_then_flat(start=7, floor=4, rate=0.25, seconds_per_step=0.2, horizon=60),
        BIG: linear_then_flat(start=7, floor=2, rate=0.1, seconds_per_step=0.4, horizon=60),
    }
    result = search(curves, start=SMALL, target=BIG, train_steps=1000)
    assert [leg.shape for leg in result.legs] == [SMALL, MID, BIG]
    # 2 s in small (to 6), 8 s in mid (6 -> 4 at 0.25/s), 20 s in big (4 -> 2 at 0.1/s),
    # against 50 s for big from scratch
    assert result.predicted_seconds == pytest.approx(30.0, abs=0.2)
    assert result.predicted_speedup == pytest.approx(50 / 30, rel=0.01)
    assert result.growth_steps == [20, 60]  # 2 s / 0.1 s; then + 8 s / 0.2 s
    # The leg losses chain: each growth happens at the loss the last leg ended at.
    assert result.legs[0].loss_to == result.legs[1].loss_from == pytest.approx(6.0, abs=0.01)
    assert result.legs[1].loss_to == result.legs[2].loss_from == pytest.approx(4.0, abs=0.01)


def test_a_shape_trained_shorter_than_a_ramp_is_skipped():
    # As above, but growths must be >= 50 steps apart: the 40-step mid leg is dropped and
    # the small shape grows straight into the big one after the steps the mid leg had.
    curves = {
        SMALL: linear_then_flat(start=7, floor=6, rate=0.5, seconds_per_step=0.1, horizon=60),
        MID: linear_then_flat(start=7, floor=4, rate=0.25, seconds_per_step=0.2, horizon=60),
        BIG: linear_then_flat(start=7, floor=2, rate=0.1, seconds_per_step=0.4, horizon=60),
    }
    result = search(curves, start=SMALL, target=BIG, train_steps=1000, min_stage_steps=50)
    assert [leg.shape for leg in result.legs] == [SMALL, BIG]
    assert result.growth_steps == [60]


def test_late_growth_is_moved_into_the_step_budget_and_flagged():
    curves = {
        SMALL: linear_then_flat(start=7, floor=5, rate=0.2, seconds_per_step=0.1, horizon=40),
        BIG: linear_then_flat(start=7, floor=3, rate=0.1, seconds_per_step=0.4, horizon=40),
    }
    result = search(curves, start=SMALL, target=BIG, train_steps=100, max_growth_fraction=0.5)
    assert result.growth_steps == [50] and result.clamped


def test_a_target_never_faster_within_the_probes_is_reported_as_horizon_limited():
    # The small shape reaches the target's lowest loss first: growth only at the very end.
    curves = {
        SMALL: linear_then_flat(start=7, floor=4, rate=0.3, seconds_per_step=0.1, horizon=20),
        BIG: linear_then_flat(start=7, floor=4, rate=0.2, seconds_per_step=0.4, horizon=20),
    }
    result = search(curves, start=SMALL, target=BIG, train_steps=1000)
    assert result.horizon_limited
    assert result.growth_steps == [100]  # where the small shape got to loss 4 (10 s)


def test_noisy_curves_use_their_running_minimum():
    c = Curve(steps=(0, 10, 20, 30), seconds=(0, 1, 2, 3), losses=(7.0, 6.0, 6.5, 5.0))
    assert c.envelope == (7.0, 6.0, 6.0, 5.0)
    assert c.reach(6.2) == pytest.approx(0.8)
    assert c.reach(5.5) == pytest.approx(2.5)
    assert c.reach(5.5, axis="steps") == pytest.approx(25.0)
    assert c.reach(4.9) is None and c.reach(8.0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": (0,), "seconds": (0,), "losses": (1.0,)}, ">= 2 points"),
        ({"steps": (0, 1), "seconds": (1, 0), "losses": (2.0, 1.0)}, "non-decreasing"),
        ({"steps": (0, 1), "seconds": (0, 1), "losses": (2.0, float("nan"))}, "finite"),
    ],
)
def test_bad_curves_are_refused(kwargs, message):
    with pytest.raises(ScheduleSearchError, match=message):
        Curve(**kwargs)


def test_search_refuses_missing_probes_and_bad_fractions():
    c = linear_then_flat(start=7, floor=5, rate=0.2, seconds_per_step=0.1, horizon=5)
    with pytest.raises(ScheduleSearchError, match="no probe curve for shape"):
        search({SMALL: c}, start=SMALL, target=BIG, train_steps=10)
    with pytest.raises(ScheduleSearchError, match="max_growth_fraction"):
        search({SMALL: c, BIG: c}, start=SMALL, target=BIG, train_steps=10, max_growth_fraction=0)
    flat = Curve(steps=(0, 1), seconds=(0, 1), losses=(7.0, 7.0))
    with pytest.raises(ScheduleSearchError, match="never went below"):
        search({SMALL: c, BIG: flat}, start=SMALL, target=BIG, train_steps=10)


def test_candidate_lattice():
    shapes = candidate_shapes((128, 512, 4, 4), (256, 1024, 8, 8))
    assert len(shapes) == 8 and shapes[0] == (128, 512, 4, 4) and shapes[-1] == (256, 1024, 8, 8)
    assert paths_considered(shapes, shapes[0], shapes[-1]) == 13  # ordered partitions of 3 groups
    three = candidate_shapes((128, 512, 4, 4), (256, 1024, 8, 8), levels=3)
    assert {(s[0], s[1]) for s in three} == {(128, 512), (192, 768), (256, 1024)}
    assert {s[2] for s in three} == {4, 6, 8} and {s[3] for s in three} == {4, 6, 8}
    # every shape comes after all the shapes that grow into it
    for i, a in enumerate(three):
        for b in three[:i]:
            assert not (a != b and all(x <= y for x, y in zip(a, b)))
    # rounding keeps hidden/FFN on multiples of 8 between the ends
    odd = candidate_shapes((100, 300, 3, 3), (164, 612, 3, 5), levels=3)
    assert {(s[0], s[1]) for s in odd} == {(100, 300), (128, 456), (164, 612)}
    with pytest.raises(ScheduleSearchError, match="at least the start"):
        candidate_shapes((256, 1024, 8, 8), (128, 1024, 8, 8))
    with pytest.raises(ScheduleSearchError, match="levels must be >= 2"):
        candidate_shapes(SMALL, BIG, levels=1)


def test_parse_shape():
    assert parse_shape("256,1024,8,8") == (256, 1024, 8, 8)
    for bad in ("256,1024,8", "a,b,c,d", "0,1,1,1"):
        with pytest.raises(ScheduleSearchError, match="four positive integers"):
            parse_shape(bad)
