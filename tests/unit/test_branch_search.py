"""The branching schedule search's decisions, on constructed curves with known answers."""

from __future__ import annotations

import pytest

from megatron_msg.growth.branch_search import (
    BranchSearchResult,
    branch_points,
    choose_growth,
    format_branch_report,
    next_shapes,
    window_rate,
)
from megatron_msg.growth.schedule_search import Curve, ScheduleSearchError, candidate_shapes

START, TARGET = (64, 256, 2, 2), (128, 512, 4, 4)


def line(
    steps: range, *, seconds_per_step: float, loss_per_second: float, y0: float = 6.0
) -> Curve:
    """A curve losing ``loss_per_second`` steadily, ``seconds_per_step`` per step."""
    seconds = [s * seconds_per_step for s in steps]
    return Curve(
        steps=tuple(float(s) for s in steps),
        seconds=tuple(seconds),
        losses=tuple(y0 - loss_per_second * t for t in seconds),
    )


def test_window_rate_is_the_least_squares_slope_inside_the_window():
    curve = line(range(0, 101, 10), seconds_per_step=0.5, loss_per_second=0.02)
    assert window_rate(curve, 20, 60) == pytest.approx(0.02)
    noisy = Curve(steps=(0, 10, 20, 30), seconds=(0, 1, 2, 3), losses=(5.0, 4.9, 4.85, 4.7))
    # slope of the fitted line, not of the two end points (0.1)
    assert window_rate(noisy, 0, 30) == pytest.approx(0.095)
    assert window_rate(curve, 21, 29) is None  # no point inside
    assert window_rate(curve, 30, 30) is None  # one point


def test_next_shapes_are_the_lattice_shapes_still_on_the_way_to_the_target():
    shapes = candidate_shapes(START, TARGET, levels=2)
    first = next_shapes(START, TARGET, shapes)
    assert len(first) == 7 and first[-1] == TARGET and START not in first
    wide = (128, 512, 2, 2)
    assert next_shapes(wide, TARGET, shapes) == [(128, 512, 4, 2), (128, 512, 2, 4), TARGET]
    assert next_shapes(TARGET, TARGET, shapes) == []


def test_branch_points_are_spread_snapped_and_kept_a_ramp_apart():
    assert branch_points(entered=0, horizon=200, count=3, min_gap=1, latest=600, multiple=25) == [
        75,
        150,
        200,
    ]
    # a ramp of 40 after a growth at step 200: the first point is at least 241
    assert branch_points(entered=200, horizon=60, count=3, min_gap=41, latest=600, multiple=10) == [
        250,
        260,
    ]
    assert branch_points(entered=0, horizon=200, count=2, min_gap=1, latest=120, multiple=25) == [
        100
    ]
    with pytest.raises(ScheduleSearchError, match="no branch point"):
        branch_points(entered=500, horizon=100, count=2, min_gap=41, latest=520, multiple=25)
    with pytest.raises(ScheduleSearchError, match="count, horizon and multiple"):
        branch_points(entered=0, horizon=100, count=0, min_gap=1, latest=100)


WIDE, DEEP = (128, 512, 2, 2), (64, 256, 2, 4)


def grown_runs(rates: dict[tuple[int, tuple[int, int, int, int]], float]) -> dict:
    """Branch runs, 0.2 s a step (twice staying's), each losing its rate for 100 steps
    past its branch point."""
    return {
        (step, shape): line(range(0, step + 101, 25), seconds_per_step=0.2, loss_per_second=rate)
        for (step, shape), rate in rates.items()
    }


def test_choose_the_first_branch_point_where_a_grown_model_out_paces_staying():
    stay = line(range(0, 401, 25), seconds_per_step=0.1, loss_per_second=0.05)
    # at step 100 nothing pays; at 200 both do, deep faster; at 300 wide is fastest
    branches = grown_runs({(100, WIDE): 0.04, (100, DEEP): 0.03, (200, WIDE): 0.06,
                           (200, DEEP): 0.07, (300, WIDE): 0.09})  # fmt: skip
    choice = choose_growth(stay, branches, window=100)
    assert (choice.step, choice.shape, choice.horizon_limited) == (200, DEEP, False)
    assert len(choice.outcomes) == 5
    assert [o.pays for o in choice.outcomes] == [False, False, True, True, True]


def test_when_no_branch_pays_the_last_point_and_its_fastest_shape_are_taken():
    stay = line(range(0, 301, 25), seconds_per_step=0.1, loss_per_second=0.05)
    branches = grown_runs({(100, WIDE): 0.04, (200, WIDE): 0.02, (200, DEEP): 0.03})
    choice = choose_growth(stay, branches, window=100)
    assert (choice.step, choice.shape, choice.horizon_limited) == (200, DEEP, True)
    with pytest.raises(ScheduleSearchError, match="no branch runs"):
        choose_growth(stay, {}, window=100)


def test_result_gives_the_trainer_stages_and_a_report():
    stay = line(range(0, 301, 25), seconds_per_step=0.1, loss_per_second=0.05)
    grown = line(range(0, 301, 25), seconds_per_step=0.2, loss_per_second=0.08)
    first = choose_growth(stay, {(100, (128, 512, 2, 2)): grown}, window=100)
    second = choose_growth(stay, {(200, TARGET): grown}, window=100)
    result = BranchSearchResult(start=START, target=TARGET, choices=[first, second])
    assert result.growth_steps == [100, 200] and not result.horizon_limited
    assert result.growth_stages(ramp_steps=40) == [
        {"start_step": 100, "ramp_steps": 40, "hidden_size": 128, "ffn_hidden_size": 512,
         "num_heads": 2, "num_layers": 2},
        {"start_step": 200, "ramp_steps": 40, "hidden_size": 128, "ffn_hidden_size": 512,
         "num_heads": 4, "num_layers": 4},
    ]  # fmt: skip
    record = result.to_dict()
    assert record["method"] == "branch" and record["choices"][1]["shape"] == list(TARGET)
    text = format_branch_report(result, clock="cpu")
    assert "round 2, from (128, 512, 2, 2)" in text and "grow at step 200" in text
    assert "pays" in text
