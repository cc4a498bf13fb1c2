"""Choosing a growth schedule from measured loss-per-second rates (the MSG paper's
grid search, Section 3.2.1, automated).

Every candidate shape on the way from the start shape to the target is trained
briefly from scratch on the first steps of the run (a small data slice), which
gives its loss-vs-time curve ``T_s(l)``: the seconds shape ``s`` needs to bring
the loss down to ``l``. MSG growth is function preserving, so right after
growing into ``s'`` at loss ``l`` the model is at loss ``l``; the search assumes
it then goes on at the rate ``s'`` itself has at that loss, i.e. reaching
``l' < l`` costs ``T_s'(l') - T_s'(l)`` seconds. Growing pays where the larger
shape brings the loss down faster per second than the current one.

:func:`search` finds the path through the candidate lattice (shapes only grow,
one or more dimensions at a time) and the loss levels at which to grow that
minimise the predicted time to the target shape's lowest measured loss, by
dynamic programming over a grid of loss levels; the growth losses are then turned
into optimizer steps with each shape's own steps-to-loss curve.

The assumption is the paper's and is only approximately true: a grown model
starts with representations a from-scratch model of its shape has not built yet,
and the probes see the run's first steps only. The schedule is a measured
starting point, not an optimum; the growth speed-up benchmark tests it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Shape = tuple[int, int, int, int]  # (hidden, ffn, heads, layers)
SHAPE_KEYS = ("hidden_size", "ffn_hidden_size", "num_heads", "num_layers")


class ScheduleSearchError(ValueError):
    """The inputs cannot give a schedule; the message says which value is wrong."""


@dataclass(frozen=True)
class Curve:
    """A from-scratch probe of one shape: loss against optimizer steps and seconds."""

    steps: tuple[float, ...]
    seconds: tuple[float, ...]
    losses: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.losses)
        if n < 2 or len(self.steps) != n or len(self.seconds) != n:
            raise ScheduleSearchError(
                f"a curve needs >= 2 points with steps, seconds and losses each, got "
                f"{len(self.steps)}/{len(self.seconds)}/{n}"
            )
        for name in ("steps", "seconds"):
            xs = getattr(self, name)
            if any(b < a for a, b in itertools.pairwise(xs)) or xs[0] < 0:
                raise ScheduleSearchError(f"a curve's {name} must be >= 0 and non-decreasing: {xs}")
        if not all(math.isfinite(v) for v in self.losses):
            raise ScheduleSearchError(f"a curve's losses must be finite: {self.losses}")

    @property
    def envelope(self) -> tuple[float, ...]:
        """The running minimum of the losses: the best loss reached so far (monotone)."""
        return tuple(itertools.accumulate(self.losses, min))

    @property
    def lowest(self) -> float:
        return min(self.losses)

    def reach(self, level: float, *, axis: str = "seconds") -> float | None:
        """First ``axis`` value (seconds or steps) at which the loss is down to ``level``
        (linear interpolation between points); None when the probe never got there."""
        xs, ys = getattr(self, axis), self.envelope
        if ys[0] <= level:
            return float(xs[0])
        for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
            if y1 <= level:
                return float(x0 + (x1 - x0) * (y0 - level) / (y0 - y1))
        return None

    def seconds_per_step(self) -> float:
        return (self.seconds[-1] - self.seconds[0]) / max(self.steps[-1] - self.steps[0], 1e-12)


def candidate_shapes(start: Shape, target: Shape, *, levels: int = 2) -> list[Shape]:
    """The lattice between ``start`` and ``target``: width (hidden and FFN together),
    heads and layers each take ``levels`` values from the start's to the target's.

    Intermediate hidden/FFN sizes are rounded to multiples of 8 (heads and layers to
    integers); shapes are sorted by size, start first, target last.
    """
    if levels < 2:
        raise ScheduleSearchError(f"levels must be >= 2, got {levels}")
    if any(s < 1 for s in start) or any(a > b for a, b in zip(start, target)):
        raise ScheduleSearchError(
            f"the target {target} must be at least the start {start} in every dimension "
            "(hidden, ffn, heads, layers), all positive"
        )

    def value(a: int, b: int, frac: float, multiple: int) -> int:
        return max(a, min(b, multiple * round((a + (b - a) * frac) / multiple)))

    fracs = [i / (levels - 1) for i in range(levels)]
    ends = (0.0, 1.0)
    widths = sorted(
        {(value(start[0], target[0], f, 1 if f in ends else 8),
          value(start[1], target[1], f, 1 if f in ends else 8)) for f in fracs}
    )  # fmt: skip
    heads = sorted({value(start[2], target[2], f, 1) for f in fracs})
    depths = sorted({value(start[3], target[3], f, 1) for f in fracs})
    shapes = {(h, f, n, layers) for (h, f), n, layers in itertools.product(widths, heads, depths)}
    return sorted(shapes, key=_size_key)


def _size_key(shape: Shape) -> tuple[int, Shape]:
    """Sorts every shape after all the shapes that grow into it."""
    return shape[0] * shape[1] * shape[3], shape


def _grows_into(a: Shape, b: Shape) -> bool:
    return a != b and all(x <= y for x, y in zip(a, b))


@dataclass
class Leg:
    """Training in ``shape`` from loss ``loss_from`` down to ``loss_to``."""

    shape: Shape
    loss_from: float
    loss_to: float
    seconds: float
    steps: float


@dataclass
class SearchResult:
    legs: list[Leg]
    end_loss: float  # the loss the prediction runs to (the target's lowest probe loss)
    predicted_seconds: float  # along the chosen path
    scratch_seconds: float  # the target shape from scratch to the same loss
    growth_steps: list[int] = field(default_factory=list)  # start_step of each growth
    clamped: bool = False  # growth steps moved earlier to fit the step budget

    @property
    def horizon_limited(self) -> bool:
        """The target shape trains no step of the predicted path: within the probes a
        smaller shape was always at least as fast per second, so the last growth sits
        at the end of what was measured (longer probes would show where growth pays)."""
        return self.legs[-1].steps < 1

    @property
    def predicted_speedup(self) -> float:
        return self.scratch_seconds / max(self.predicted_seconds, 1e-12)

    def growth_stages(self, *, ramp_steps: int) -> list[dict[str, Any]]:
        """The trainer's ``growth:`` list (one entry per leg after the first)."""
        stages = []
        for leg, step in zip(self.legs[1:], self.growth_steps):
            stage: dict[str, Any] = {"start_step": step, "ramp_steps": ramp_steps}
            stage.update(dict(zip(SHAPE_KEYS, leg.shape)))
            stages.append(stage)
        return stages

    def to_dict(self) -> dict[str, Any]:
        return {
            "legs": [vars(leg) | {"shape": list(leg.shape)} for leg in self.legs],
            "end_loss": self.end_loss,
            "predicted_seconds": self.predicted_seconds,
            "scratch_seconds": self.scratch_seconds,
            "predicted_speedup": self.predicted_speedup,
            "growth_steps": self.growth_steps,
            "clamped": self.clamped,
            "horizon_limited": self.horizon_limited,
        }


def search(
    curves: dict[Shape, Curve],
    *,
    start: Shape,
    target: Shape,
    train_steps: int,
    max_growth_fraction: float = 0.75,
    min_stage_steps: int = 1,
    grid: int = 400,
    growth_seconds: float = 0.0,
) -> SearchResult:
    """The fastest predicted path from ``start`` to ``target`` (see the module docstring).

    ``train_steps`` is the run's step budget: the last growth must start by
    ``max_growth_fraction`` of it (later growth steps are moved earlier). Growths are
    at least ``min_stage_steps`` apart (the trainer's rule is more than a ramp): a
    shape the path would train for fewer steps is skipped. ``growth_seconds`` is
    charged per growth.
    """
    for shape in (start, target):
        if shape not in curves:
            raise ScheduleSearchError(f"no probe curve for shape {shape}")
    if not 0 < max_growth_fraction <= 1:
        raise ScheduleSearchError(
            f"max_growth_fraction must be in (0, 1], got {max_growth_fraction}"
        )
    shapes = sorted(
        (
            s
            for s in curves
            if s in (start, target) or (_grows_into(start, s) and _grows_into(s, target))
        ),
        key=_size_key,
    )
    top = curves[start].losses[0]
    end = curves[target].lowest
    if not end < top:
        raise ScheduleSearchError(
            f"the target shape's probe never went below the start's initial loss ({top:.4f}); "
            "use more probe steps"
        )
    levels = [top + (end - top) * j / grid for j in range(grid + 1)]
    times = {s: [curves[s].reach(level) for level in levels] for s in shapes}
    inf = math.inf
    best = {s: [inf] * (grid + 1) for s in shapes}
    parent: dict[tuple[Shape, int], tuple[Shape, int]] = {}
    for s in shapes:
        t = times[s]
        for j in range(grid + 1):
            if s == start and t[j] is not None:
                best[s][j] = t[j]  # type: ignore[assignment]
                if j:
                    parent[(s, j)] = (s, j - 1)
                continue
            for p in shapes:  # grow from a smaller shape at this loss level
                if _grows_into(p, s) and best[p][j] + growth_seconds < best[s][j]:
                    best[s][j] = best[p][j] + growth_seconds
                    parent[(s, j)] = (p, j)
            if j and t[j] is not None and t[j - 1] is not None:
                stay = best[s][j - 1] + (t[j] - t[j - 1])  # type: ignore[operator]
                if stay < best[s][j]:
                    best[s][j] = stay
                    parent[(s, j)] = (s, j - 1)
    if not math.isfinite(best[target][grid]):
        raise ScheduleSearchError("no path through the probed shapes reaches the target's loss")
    path = _backtrack(parent, (target, grid))
    legs = _merge_short_legs(_legs(path, levels, curves), min_stage_steps)
    result = SearchResult(
        legs=legs,
        end_loss=end,
        predicted_seconds=best[target][grid],
        scratch_seconds=float(curves[target].reach(end) or 0.0),
    )
    _assign_steps(result, train_steps, max_growth_fraction, min_stage_steps)
    return result


def _backtrack(
    parent: dict[tuple[Shape, int], tuple[Shape, int]], node: tuple[Shape, int]
) -> list[tuple[Shape, int]]:
    path = [node]
    while node in parent:
        node = parent[node]
        path.append(node)
    return path[::-1]


def _legs(
    path: list[tuple[Shape, int]], levels: list[float], curves: dict[Shape, Curve]
) -> list[Leg]:
    """Group consecutive same-shape nodes of the DP path into legs."""
    legs: list[Leg] = []
    for shape, group in itertools.groupby(path, key=lambda node: node[0]):
        js = [j for _, j in group]
        lo, hi = levels[js[0]], levels[js[-1]]
        c = curves[shape]
        t0, t1 = c.reach(lo), c.reach(hi)
        s0, s1 = c.reach(lo, axis="steps"), c.reach(hi, axis="steps")
        legs.append(
            Leg(
                shape=shape,
                loss_from=lo,
                loss_to=hi,
                seconds=float((t1 or 0.0) - (t0 or 0.0)),
                steps=float((s1 or 0.0) - (s0 or 0.0)),
            )
        )
    # a leg of no steps is a growth straight on into the next shape: merged into it
    return [leg for i, leg in enumerate(legs) if leg.steps > 0 or i in (0, len(legs) - 1)]


def _merge_short_legs(legs: list[Leg], min_steps: int) -> list[Leg]:
    """Drop the middle legs shorter than ``min_steps`` (the trainer needs a whole ramp
    between growths): the previous leg trains their steps and then grows straight on
    into the next shape."""
    kept = [legs[0]]
    for i, leg in enumerate(legs[1:], start=1):
        if i < len(legs) - 1 and leg.steps < min_steps:
            previous = kept[-1]
            previous.steps += leg.steps
            previous.seconds += leg.seconds
            previous.loss_to = leg.loss_to
            continue
        kept.append(leg)
    return kept


def _assign_steps(
    result: SearchResult, train_steps: int, max_growth_fraction: float, min_stage_steps: int
) -> None:
    """Growth start steps: cumulative steps of the legs before each growth, fitted into
    the budget (the last growth by ``max_growth_fraction * train_steps``)."""
    steps, total = [], 0.0
    for leg in result.legs[:-1]:
        total += leg.steps
        steps.append(total)
    latest = int(max_growth_fraction * train_steps)
    growth: list[int] = []
    for i, value in enumerate(steps):
        # room for the stages still to come, min_stage_steps apart
        limit = latest - (len(steps) - 1 - i) * min_stage_steps
        step = max(round(value), (growth[-1] + min_stage_steps) if growth else 1)
        if step > limit:
            result.clamped = True
            step = limit
        growth.append(step)
    if growth and growth[0] < 1:
        raise ScheduleSearchError(
            f"{len(growth)} growth stages do not fit in {train_steps} steps with "
            f"max_growth_fraction {max_growth_fraction} and min_stage_steps {min_stage_steps}"
        )
    result.growth_steps = growth


def format_report(result: SearchResult, curves: dict[Shape, Curve], *, clock: str) -> str:
    """A plain-text table of the probes and the chosen path."""
    lines = [
        f"probes (from scratch, {clock} seconds):",
        "  shape (h, f, n, L)      s/step  lowest loss",
    ]
    for shape, c in sorted(curves.items(), key=lambda kv: _size_key(kv[0])):
        lines.append(f"  {shape!s:22s} {c.seconds_per_step():7.3f}  {c.lowest:.4f}")
    lines.append(f"chosen path to loss {result.end_loss:.4f}:")
    for i, leg in enumerate(result.legs):
        at = "start" if i == 0 else f"grow at step {result.growth_steps[i - 1]}"
        lines.append(
            f"  {at:>20s} -> {leg.shape}: loss {leg.loss_from:.4f} -> {leg.loss_to:.4f} "
            f"({leg.steps:.0f} steps, {leg.seconds:.1f}s predicted)"
        )
    lines.append(
        f"predicted {result.predicted_seconds:.1f}s vs {result.scratch_seconds:.1f}s for the "
        f"target from scratch ({result.predicted_speedup:.2f}x)"
        + ("; growth steps were moved earlier to fit the step budget" if result.clamped else "")
    )
    if result.horizon_limited:
        lines.append(
            "note: the target shape never out-paced the smaller shapes within the probes, so the "
            "last growth is placed where the probes end; longer probes would show where it pays"
        )
    return "\n".join(lines)


def shape_of(model: dict[str, Any]) -> Shape:
    """(hidden, ffn, heads, layers) of a ``model:`` mapping."""
    h, f, n, layers = (int(model[k]) for k in SHAPE_KEYS)
    return h, f, n, layers


def parse_shape(text: str) -> Shape:
    """``"256,1024,8,8"`` -> (256, 1024, 8, 8)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 4 or any(v < 1 for v in shape):
        raise ScheduleSearchError(
            f"a shape is four positive integers hidden,ffn,heads,layers; got {text!r}"
        )
    return shape  # type: ignore[return-value]


def paths_considered(shapes: Sequence[Shape], start: Shape, target: Shape) -> int:
    """How many growth paths the lattice holds from start to target (for the report)."""
    count = {start: 1}
    for s in sorted(shapes, key=_size_key):
        if s != start:
            count[s] = sum(v for p, v in count.items() if _grows_into(p, s))
    return count.get(target, 0)
