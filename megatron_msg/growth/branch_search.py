"""Choosing growth steps by growing for real: the branching schedule search.

The grid search (``schedule_search.search``) predicts a grown model's progress
from *from-scratch* probes of its shape. Early in training a small shape learns
faster per second than a large one at every loss the probes reach, so it never
sees the point where growing pays ("horizon limited"). This search measures that
point directly, one growth at a time, the way the MSG paper grows: train the
current schedule on (the *stay* run), and at a few *branch points* grow the real
model into each candidate next shape and train it a short *window*. Growth pays
at a branch point when the grown model brings the held-out loss down faster per
second over the window than staying does over the same steps; the first branch
point where some candidate pays is the growth, into the candidate with the best
rate. The chosen growth becomes part of the schedule and the search goes on from
there until the schedule ends in the target shape.

This module holds the decisions only (pure, testable on constructed curves);
``training/schedule_search_cli.py`` trains the runs. The rates are slopes of a
least-squares line through the window's evaluations, so one noisy evaluation
does not decide a growth.

Known limits (measured in benchmarks/RESULTS.md): the search is greedy, comparing
the next window and not the rest of the run, so a growth that pays only later
(once the small model's capacity runs out) is not seen. Staying is compared over
the same *steps*, which it covers in less time, on the steeper part of its curve;
a comparison at equal time would be fairer to growth. When no branch pays, the
round falls back to the last branch point and the fastest shape there, and the
result says so (``horizon_limited``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_msg.growth.schedule_search import (
    SHAPE_KEYS,
    Curve,
    ScheduleSearchError,
    Shape,
    _grows_into,
    _size_key,
)

__all__ = [
    "BranchOutcome",
    "BranchSearchResult",
    "GrowthChoice",
    "branch_points",
    "choose_growth",
    "format_branch_report",
    "next_shapes",
    "window_rate",
]


def window_rate(curve: Curve, first: float, last: float) -> float | None:
    """Loss decrease per second over the steps [first, last] of ``curve``: minus the
    least-squares slope of loss against seconds through the points in the window.
    None when fewer than two points fall in it or no time passes."""
    points = [
        (t, y) for s, t, y in zip(curve.steps, curve.seconds, curve.losses) if first <= s <= last
    ]
    if len(points) < 2:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread <= 0:
        return None
    return -sum((t - mean_t) * (y - mean_y) for t, y in points) / spread


def next_shapes(current: Shape, target: Shape, shapes: Sequence[Shape]) -> list[Shape]:
    """The candidates one growth can reach: lattice shapes above ``current`` that still
    grow into ``target`` (and the target itself), smallest first."""
    found = {
        s for s in shapes if _grows_into(current, s) and (s == target or _grows_into(s, target))
    }
    if _grows_into(current, target):
        found.add(target)
    return sorted(found, key=_size_key)


def branch_points(
    *, entered: int, horizon: int, count: int, min_gap: int, latest: int, multiple: int = 1
) -> list[int]:
    """``count`` steps spread evenly over (entered, entered + horizon], each a multiple of
    ``multiple`` (an evaluation falls on it), at least ``min_gap`` after ``entered``
    (the trainer needs the previous ramp finished) and at most ``latest``; duplicates
    dropped."""
    if count < 1 or horizon < 1 or multiple < 1:
        raise ScheduleSearchError(
            f"need count, horizon and multiple >= 1, got {count}, {horizon} and {multiple}"
        )
    first = entered + min_gap
    highest = latest // multiple * multiple
    points: list[int] = []
    for i in range(1, count + 1):
        step = max(entered + round(horizon * i / count), first)
        step = min(-(-step // multiple) * multiple, highest)
        if step >= first and step not in points:
            points.append(step)
    if not points:
        raise ScheduleSearchError(
            f"no branch point (a multiple of {multiple}) fits between step {first} "
            f"(previous growth {entered} + {min_gap}) and the latest growth step {latest}"
        )
    return points


@dataclass(frozen=True)
class BranchOutcome:
    """One measurement: grow at ``step`` into ``shape``; both rates over the same steps."""

    step: int
    shape: Shape
    rate: float | None  # loss per second of the grown model over the window
    stay_rate: float | None  # loss per second of the current model over the same steps

    @property
    def pays(self) -> bool:
        return self.rate is not None and (self.stay_rate is None or self.rate > self.stay_rate)


@dataclass(frozen=True)
class GrowthChoice:
    """The growth one round of the search chose, and everything it measured."""

    step: int
    shape: Shape
    outcomes: tuple[BranchOutcome, ...]
    horizon_limited: bool  # no branch paid: grown at the last point into the fastest shape


def choose_growth(
    stay: Curve, branches: Mapping[tuple[int, Shape], Curve], *, window: int
) -> GrowthChoice:
    """The first branch point at which some candidate out-paces staying (the fastest
    candidate there); if none does, the last point and its fastest candidate.

    ``branches[(step, shape)]`` is the run grown into ``shape`` at ``step``; its rate
    and the stay run's are measured over the steps [step, step + window].
    """
    if not branches:
        raise ScheduleSearchError("no branch runs to choose from")
    outcomes = tuple(
        BranchOutcome(
            step=step,
            shape=shape,
            rate=window_rate(curve, step, step + window),
            stay_rate=window_rate(stay, step, step + window),
        )
        for (step, shape), curve in sorted(
            branches.items(), key=lambda kv: (kv[0][0], _size_key(kv[0][1]))
        )
    )
    steps = sorted({o.step for o in outcomes})
    for step in steps:
        paying = [o for o in outcomes if o.step == step and o.pays]
        if paying:
            best = max(paying, key=lambda o: o.rate or 0.0)
            return GrowthChoice(step, best.shape, outcomes, horizon_limited=False)
    last = [o for o in outcomes if o.step == steps[-1] and o.rate is not None]
    if not last:
        raise ScheduleSearchError(
            f"no branch at step {steps[-1]} has two evaluations in its {window}-step window"
        )
    best = max(last, key=lambda o: o.rate or 0.0)
    return GrowthChoice(steps[-1], best.shape, outcomes, horizon_limited=True)


@dataclass
class BranchSearchResult:
    start: Shape
    target: Shape
    choices: list[GrowthChoice] = field(default_factory=list)

    @property
    def growth_steps(self) -> list[int]:
        return [c.step for c in self.choices]

    @property
    def horizon_limited(self) -> bool:
        return any(c.horizon_limited for c in self.choices)

    def growth_stages(self, *, ramp_steps: int) -> list[dict[str, Any]]:
        """The trainer's ``growth:`` list."""
        return [
            {"start_step": c.step, "ramp_steps": ramp_steps, **dict(zip(SHAPE_KEYS, c.shape))}
            for c in self.choices
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "branch",
            "start": list(self.start),
            "target": list(self.target),
            "growth_steps": self.growth_steps,
            "horizon_limited": self.horizon_limited,
            "choices": [
                {
                    "step": c.step,
                    "shape": list(c.shape),
                    "horizon_limited": c.horizon_limited,
                    "outcomes": [vars(o) | {"shape": list(o.shape)} for o in c.outcomes],
                }
                for c in self.choices
            ],
        }


def format_branch_report(result: BranchSearchResult, *, clock: str) -> str:
    """Per round: every branch's rate against staying, and the choice."""
    lines = [f"branch search ({clock} seconds; rates in loss per second over each window):"]
    current = result.start
    for round_no, choice in enumerate(result.choices, start=1):
        lines.append(f" round {round_no}, from {current}:")
        for o in choice.outcomes:
            rate = "-" if o.rate is None else f"{o.rate:.5f}"
            stay = "-" if o.stay_rate is None else f"{o.stay_rate:.5f}"
            mark = " pays" if o.pays else ""
            lines.append(
                f"   step {o.step:5d} -> {o.shape!s:22s} {rate:>9s} vs stay {stay:>9s}{mark}"
            )
        how = (
            "no branch paid; the last point, fastest shape"
            if choice.horizon_limited
            else "first paying point"
        )
        lines.append(f"  grow at step {choice.step} -> {choice.shape} ({how})")
        current = choice.shape
    return "\n".join(lines)
