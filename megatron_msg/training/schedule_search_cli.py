"""`megatron-msg schedule-search --config RUN.yaml --target H,F,N,L [key=value ...]`

Chooses a growth schedule for a run by measurement (the MSG paper's grid search,
Section 3.2.1): every candidate shape between the config's model (the start) and
``--target`` trains from scratch for ``--probe-steps`` steps of the run (its data
order and LR schedule), its held-out loss measured every ``--eval-interval``
steps against training time; :func:`megatron_msg.growth.schedule_search.search`
then picks the path and growth points with the best predicted loss per second.

``--method branch`` measures growth instead of predicting it
(:mod:`megatron_msg.growth.branch_search`): round by round, the schedule so far
trains on (``branches/roundK/stay``) and, at ``--branch-points`` steps, grows
into each candidate next shape for a ``--window`` of steps
(``branches/roundK/<step>_<shape>``); the first branch point where a grown model
lowers the loss faster per second than staying is the next growth.

Writes, under ``--out``: ``probes/<shape>/`` (each probe's ``curve.jsonl``,
written as it goes, and ``done.json``; a finished probe of the same settings is
reused when the search runs again), ``search.json`` (curves and decision),
``schedule.yaml`` (the start model and the ``growth:`` list) and ``config.yaml``
(the run config with that schedule, for `megatron-msg train --config`). Any
``growth:`` stages in the input config are replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_msg.config import ConfigError
from megatron_msg.growth.branch_search import (
    BranchSearchResult,
    branch_points,
    choose_growth,
    format_branch_report,
    next_shapes,
)
from megatron_msg.growth.schedule_search import (
    SHAPE_KEYS,
    Curve,
    ScheduleSearchError,
    SearchResult,
    Shape,
    candidate_shapes,
    format_report,
    parse_shape,
    paths_considered,
    search,
    shape_of,
)


def probe_values(
    values: dict[str, Any], shape: Shape, run_dir: Path, growth: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """The run config trained from scratch at ``shape`` with the stages ``growth`` (none:
    a plain probe); no checkpoints or TensorBoard, logs in ``run_dir``."""
    probe = json.loads(json.dumps(values))  # a deep copy of plain data
    probe["model"].update(dict(zip(SHAPE_KEYS, shape)))
    probe["growth"] = [dict(stage) for stage in growth]
    probe.setdefault("checkpoint", {}).update({"interval": 0, "resume": False, "load": ""})
    probe.setdefault("logging", {}).update({"tensorboard": False, "progress_bar": False})
    probe.setdefault("train", {})["run_dir"] = str(run_dir)
    return probe


def run_probe(
    values: dict[str, Any],
    *,
    steps: int,
    eval_interval: int,
    eval_batches: int,
    out: Path,
) -> Curve:
    """Train ``values`` (a probe config) for ``steps`` steps, measuring held-out loss
    every ``eval_interval`` steps; reuses a finished probe of identical settings."""
    from megatron_msg.training.config import TrainConfig
    from megatron_msg.training.data import validation_batches
    from megatron_msg.training.loop import Trainer

    settings = {"config": values, "steps": steps, "eval_interval": eval_interval,
                "eval_batches": eval_batches}  # fmt: skip
    done = out / "done.json"
    if done.exists() and json.loads(done.read_text()).get("settings") == settings:
        return _curve_of(json.loads(done.read_text())["points"])
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(TrainConfig.from_dict(values))
    valid = validation_batches(trainer.config, count=eval_batches, device=trainer.device)
    points: list[dict[str, float]] = []
    cpu = 0.0  # process CPU seconds of training (all threads), evaluation excluded
    rank0 = trainer.rank0
    with open(out / "curve.jsonl", "w") if rank0 else open(os.devnull, "w") as log:
        while True:
            loss = sum(trainer.engine.eval_loss(*b) for b in valid) / len(valid)
            point = {"step": trainer.step, "wall": trainer.elapsed, "cpu": cpu, "loss": loss}
            points.append(point)
            log.write(json.dumps(point) + "\n")
            log.flush()
            if trainer.step >= steps:
                break
            start = time.process_time()
            trainer.advance(to=min(trainer.step + eval_interval, steps))
            cpu += time.process_time() - start
    trainer.close()
    if rank0:
        _write_atomic(done, json.dumps({"settings": settings, "points": points}, indent=1))
    return _curve_of(points)


def _curve_of(points: list[dict[str, float]], clock: str = "wall") -> Curve:
    return Curve(
        steps=tuple(p["step"] for p in points),
        seconds=tuple(p[clock] for p in points),
        losses=tuple(p["loss"] for p in points),
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _shape_dir(shape: Shape) -> str:
    return "x".join(str(v) for v in shape)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-msg schedule-search", description=__doc__)
    p.add_argument("--config", required=True, help="the run config (YAML); its model is the start")
    p.add_argument("--target", required=True, help="final shape: hidden,ffn,heads,layers")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for `megatron-msg train`")
    p.add_argument("--levels", type=int, default=2,
                   help="values per dimension group (width, heads, layers) in the lattice")  # fmt: skip
    p.add_argument("--probe-steps", type=int, default=0, help="steps per probe (0: train.steps/4)")
    p.add_argument(
        "--eval-interval", type=int, default=0, help="steps between evaluations (0: probe/10)"
    )
    p.add_argument(
        "--eval-batches", type=int, default=4, help="held-out micro-batches per evaluation"
    )
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="seconds measured: wall, or process CPU time (steadier on a shared machine)")  # fmt: skip
    p.add_argument(
        "--ramp-steps", type=int, default=0, help="mask ramp per growth (0: train.steps/40)"
    )
    p.add_argument("--max-growth-fraction", type=float, default=0.75,
                   help="the last growth starts by this fraction of train.steps")  # fmt: skip
    p.add_argument("--method", choices=("grid", "branch"), default="grid",
                   help="grid: predict from from-scratch probes of every shape; branch: grow "
                        "the real model at branch points and measure (module docstring)")  # fmt: skip
    p.add_argument("--branch-points", type=int, default=3,
                   help="branch: growth steps tried per round, spread over --probe-steps")  # fmt: skip
    p.add_argument("--window", type=int, default=0,
                   help="branch: steps each grown model trains to measure its rate "
                        "(0: a quarter of --probe-steps, at least a ramp and two evaluations)")  # fmt: skip
    p.add_argument(
        "--out", default="", help="output directory (default: <train.run_dir>/schedule_search)"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _check_args(args: argparse.Namespace, train_steps: int) -> None:
    if args.levels < 2:
        raise ScheduleSearchError(f"--levels must be >= 2, got {args.levels}")
    for name in ("probe_steps", "eval_interval", "ramp_steps", "eval_batches", "window"):
        if getattr(args, name) < 0:
            raise ScheduleSearchError(
                f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}"
            )
    if args.probe_steps > train_steps:
        raise ScheduleSearchError(
            f"--probe-steps ({args.probe_steps}) exceeds the run's train.steps ({train_steps})"
        )
    if not 0 < args.max_growth_fraction <= 1:
        raise ScheduleSearchError(
            f"--max-growth-fraction must be in (0, 1], got {args.max_growth_fraction}"
        )
    if args.eval_batches < 1:
        raise ScheduleSearchError("--eval-batches must be >= 1")
    if args.branch_points < 1:
        raise ScheduleSearchError(f"--branch-points must be >= 1, got {args.branch_points}")
    if args.window >= train_steps:
        raise ScheduleSearchError(
            f"--window ({args.window}) must be shorter than the run's train.steps ({train_steps})"
        )


def schedule_search(
    values: dict[str, Any], args: argparse.Namespace, out: Path
) -> tuple[SearchResult, dict[Shape, Curve]]:
    """Probe every candidate shape and search; ``values`` is the validated run config."""
    train_steps = int(values["train"]["steps"])
    probe_steps = args.probe_steps or max(2, train_steps // 4)
    interval = args.eval_interval or max(1, probe_steps // 10)
    start, target = shape_of(values["model"]), parse_shape(args.target)
    shapes = candidate_shapes(start, target, levels=args.levels)
    log = _rank0_print
    log(f"schedule-search: {len(shapes)} shapes, {paths_considered(shapes, start, target)} "
        f"growth paths, {probe_steps} probe steps each")  # fmt: skip
    _validate_probes(values, shapes, out)
    points: dict[Shape, list[dict[str, float]]] = {}
    for shape in shapes:
        probe_dir = out / "probes" / _shape_dir(shape)
        begin = time.perf_counter()
        run_probe(probe_values(values, shape, probe_dir), steps=probe_steps,
                  eval_interval=interval, eval_batches=args.eval_batches, out=probe_dir)  # fmt: skip
        points[shape] = json.loads((probe_dir / "done.json").read_text())["points"]
        log(f"  probe {shape}: loss {points[shape][-1]['loss']:.4f} "
            f"({time.perf_counter() - begin:.0f}s)")  # fmt: skip
    curves = {s: _curve_of(p, args.clock) for s, p in points.items()}
    # the trainer wants each growth after the previous one's ramp has ended
    result = search(curves, start=start, target=target, train_steps=train_steps,
                    max_growth_fraction=args.max_growth_fraction,
                    min_stage_steps=ramp_steps(args, train_steps) + 1)  # fmt: skip
    return result, curves


def branch_schedule_search(
    values: dict[str, Any], args: argparse.Namespace, out: Path
) -> tuple[BranchSearchResult, dict[str, Curve]]:
    """Round by round, grow the real model at branch points and keep the first growth
    that pays (:mod:`megatron_msg.growth.branch_search`); ``values`` is validated."""
    train_steps = int(values["train"]["steps"])
    horizon = args.probe_steps or max(2, train_steps // 4)
    interval = args.eval_interval or max(1, horizon // 10)
    ramp = ramp_steps(args, train_steps)
    # Whole evaluation intervals, so every window has its first and last point measured.
    window = _round_up(args.window or max(horizon // 4, ramp + 2 * interval), interval)
    latest = min(int(args.max_growth_fraction * train_steps), train_steps - window)
    start, target = shape_of(values["model"]), parse_shape(args.target)
    shapes = candidate_shapes(start, target, levels=args.levels)
    result = BranchSearchResult(start=start, target=target)
    curves: dict[str, Curve] = {}
    growth: list[dict[str, Any]] = []
    current, entered = start, 0

    def train(name: str, stages: list[dict[str, Any]], steps: int) -> Curve:
        run_dir = out / "branches" / name
        run_probe(probe_values(values, start, run_dir, stages), steps=steps,
                  eval_interval=interval, eval_batches=args.eval_batches, out=run_dir)  # fmt: skip
        points = json.loads((run_dir / "done.json").read_text())["points"]
        curves[name] = _curve_of(points, args.clock)
        return curves[name]

    _rank0_print(f"schedule-search (branch): {len(shapes)} shapes, horizon {horizon} steps, "
                 f"{args.branch_points} branch points, window {window} steps")  # fmt: skip
    while current != target:
        rnd = f"round{len(result.choices) + 1}"
        points = branch_points(entered=entered, horizon=horizon, count=args.branch_points,
                               min_gap=ramp + 1 if growth else 1, latest=latest,
                               multiple=interval)  # fmt: skip
        _validate_runs(values, start, [*growth, _stage(points[-1], target, ramp)], out)
        stay = train(f"{rnd}/stay", growth, points[-1] + window)
        branches = {}
        for step in points:
            for shape in next_shapes(current, target, shapes):
                stages = [*growth, _stage(step, shape, ramp)]
                branches[(step, shape)] = train(f"{rnd}/{step}_{_shape_dir(shape)}", stages,
                                                step + window)  # fmt: skip
        choice = choose_growth(stay, branches, window=window)
        result.choices.append(choice)
        _rank0_print(f"  {rnd}: grow at step {choice.step} -> {choice.shape}"
                     + (" (horizon limited)" if choice.horizon_limited else ""))  # fmt: skip
        growth.append(_stage(choice.step, choice.shape, ramp))
        current, entered = choice.shape, choice.step
    return result, curves


def _stage(step: int, shape: Shape, ramp: int) -> dict[str, Any]:
    return {"start_step": step, "ramp_steps": ramp, **dict(zip(SHAPE_KEYS, shape))}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def ramp_steps(args: argparse.Namespace, train_steps: int) -> int:
    return int(args.ramp_steps or max(1, train_steps // 40))


def _validate_probes(values: dict[str, Any], shapes: list[Shape], out: Path) -> None:
    """Every probe's config must be valid before the first one trains (ConfigError)."""
    for shape in shapes:
        _validate_runs(values, shape, [], out)


def _validate_runs(
    values: dict[str, Any], shape: Shape, growth: list[dict[str, Any]], out: Path
) -> None:
    import torch.distributed as dist

    from megatron_msg.training.config import TrainConfig

    probe = probe_values(values, shape, out / "probes" / _shape_dir(shape), growth)
    TrainConfig.from_dict(probe).resolve(world_size=dist.get_world_size())


def _rank0_print(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def write_outputs(
    values: dict[str, Any], result: SearchResult | BranchSearchResult,
    curves: Mapping[Shape, Curve] | Mapping[str, Curve], *,
    out: Path, ramp_steps: int, clock: str,
) -> dict[str, Any]:  # fmt: skip
    """search.json, schedule.yaml and config.yaml under ``out`` (atomically); the config."""
    import yaml

    growth = result.growth_stages(ramp_steps=ramp_steps)
    config = {**values, "growth": growth}
    record = {
        "clock": clock,
        "result": result.to_dict(),
        "curves": {k if isinstance(k, str) else _shape_dir(k): vars(c) for k, c in curves.items()},
    }
    _write_atomic(out / "search.json", json.dumps(record, indent=1))
    schedule = {"model": {k: values["model"][k] for k in SHAPE_KEYS}, "growth": growth}
    _write_atomic(out / "schedule.yaml", yaml.safe_dump(schedule, sort_keys=False))
    _write_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return config


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_msg.training.accelerator import default_to_cpu_accelerator

    default_to_cpu_accelerator()
    from megatron_msg.training.config import load_config
    from megatron_msg.training.engine import init_distributed

    try:
        config = load_config(args.config, args.overrides)
        parse_shape(args.target)
        _check_args(args, config.train.steps)
        values = config.to_dict()
        out = Path(args.out or Path(config.train.run_dir) / "schedule_search")
        init_distributed()
        ramp = ramp_steps(args, config.train.steps)
        result: SearchResult | BranchSearchResult
        curves: Mapping[Shape, Curve] | Mapping[str, Curve]
        if args.method == "branch":
            result, curves = branch_schedule_search(values, args, out)
            report = format_branch_report(result, clock=args.clock)
        else:
            result, curves = schedule_search(values, args, out)
            report = format_report(result, curves, clock=args.clock)
        if os.environ.get("RANK", "0") == "0":
            write_outputs(values, result, curves, out=out, ramp_steps=ramp, clock=args.clock)
    except (ConfigError, ScheduleSearchError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron-msg schedule-search: {err}", file=sys.stderr)
        return 1
    _rank0_print(report)
    _rank0_print(f"schedule: {out / 'schedule.yaml'}; run config: {out / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
