"""One validation pass over a :class:`TrainConfig`, before any work starts.

Every problem found is collected and reported in a single :class:`ConfigError`,
each naming the values involved ("tp (2) * pp (1) * dp (2) = 4 != world size
(2)"), so a user fixes a config in one round trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.net2net import GROWTH_OPERATORS
from megatron_msg.growth.operators import DEPTH_STRATEGIES, INIT_SCHEMES
from megatron_msg.growth.optimizer_state import MOMENT_POLICIES
from megatron_msg.training.config import (
    DATA_SOURCES,
    DTYPES,
    LR_DECAY_STYLES,
    BatchConfig,
    ParallelConfig,
    TrainConfig,
)

Report = Callable[[str], None]
_GROWN = ("hidden_size", "ffn_hidden_size", "num_heads", "num_layers")


def resolve_and_validate(config: TrainConfig, *, world_size: int) -> TrainConfig:
    """Return ``config`` with derived sizes filled in; raise one ConfigError listing every problem."""
    problems: list[str] = []
    parallel = _resolve_parallel(config, world_size, problems.append)
    batch = _resolve_batch(config, parallel.dp, problems.append)
    lr = config.lr
    if lr.decay_steps == 0:
        lr = dataclasses.replace(lr, decay_steps=config.train.steps)
    resolved = dataclasses.replace(config, parallel=parallel, batch=batch, lr=lr)
    for check in (_check_model, _check_run, _check_optimizer, _check_lr, _check_data):
        check(resolved, problems.append)
    _check_growth(resolved, problems.append)
    _check_io(resolved, problems.append)
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
    return resolved


def _resolve_parallel(config: TrainConfig, world_size: int, report: Report) -> ParallelConfig:
    p = config.parallel
    if p.tp < 1 or p.pp < 1 or p.dp < 0:
        report(f"parallel sizes must be positive: tp ({p.tp}), pp ({p.pp}), dp ({p.dp})")
        return p
    dp = p.dp or max(world_size // (p.tp * p.pp), 1)
    if p.tp * p.pp * dp != world_size:
        report(
            f"parallel.tp ({p.tp}) * parallel.pp ({p.pp}) * parallel.dp ({dp}) = "
            f"{p.tp * p.pp * dp} != world size ({world_size})"
        )
    if p.zero_stage not in (0, 1, 2):
        report(f"parallel.zero_stage must be 0, 1 or 2, got {p.zero_stage}")
    if p.pp > 1 and p.zero_stage != 1:
        # DeepSpeed's PipelineEngine rejects ZeRO-2; at ZeRO-0 it would clip with its own norm.
        report(f"parallel.pp ({p.pp}) > 1 needs parallel.zero_stage 1, got {p.zero_stage}")
    return dataclasses.replace(p, dp=dp)


def _resolve_batch(config: TrainConfig, dp: int, report: Report) -> BatchConfig:
    b = config.batch
    if b.micro_batch_size < 1 or b.global_batch_size < 0 or b.grad_accum < 0 or dp < 1:
        report(
            f"batch sizes must be positive: micro_batch_size ({b.micro_batch_size}), "
            f"global_batch_size ({b.global_batch_size}), grad_accum ({b.grad_accum})"
        )
        return b
    per_step = b.micro_batch_size * dp
    accum = b.grad_accum
    if accum == 0:
        if b.global_batch_size == 0:
            accum = 1
        elif b.global_batch_size % per_step:
            report(
                f"batch.global_batch_size ({b.global_batch_size}) is not divisible by "
                f"micro_batch_size ({b.micro_batch_size}) * dp ({dp}) = {per_step}"
            )
            return b
        else:
            accum = b.global_batch_size // per_step
    total = per_step * accum
    if b.global_batch_size and b.global_batch_size != total:
        report(
            f"batch.global_batch_size ({b.global_batch_size}) != micro_batch_size "
            f"({b.micro_batch_size}) * grad_accum ({accum}) * dp ({dp}) = {total}"
        )
    return dataclasses.replace(b, grad_accum=accum, global_batch_size=total)


def _check_model(config: TrainConfig, report: Report) -> None:
    try:
        config.model.validate(tp_size=config.parallel.tp, pp_size=config.parallel.pp)
    except ConfigError as err:
        report(f"model: {err}")


def _check_run(config: TrainConfig, report: Report) -> None:
    t = config.train
    if t.steps < 1:
        report(f"train.steps must be >= 1, got {t.steps}")
    if t.dtype not in DTYPES:
        report(f"train.dtype must be one of {DTYPES}, got {t.dtype!r}")
    if t.dtype == "bf16" and config.parallel.zero_stage == 0:
        # DeepSpeed keeps per-parameter fp32 masters (needed for growth and exact
        # checkpoints) only under ZeRO for bf16.
        report("train.dtype bf16 needs parallel.zero_stage >= 1, got 0")
    if t.max_nonfinite_in_row < 1:
        report(f"train.max_nonfinite_in_row must be >= 1, got {t.max_nonfinite_in_row}")


def _check_optimizer(config: TrainConfig, report: Report) -> None:
    o = config.optimizer
    if not o.lr > 0:
        report(f"optimizer.lr must be > 0, got {o.lr}")
    if not all(0.0 <= beta < 1.0 for beta in o.betas):
        report(f"optimizer.betas must be in [0, 1), got {list(o.betas)}")
    if not o.eps > 0 or o.weight_decay < 0 or o.clip_grad < 0:
        report(
            f"optimizer.eps ({o.eps}) must be > 0, weight_decay ({o.weight_decay}) and "
            f"clip_grad ({o.clip_grad}) >= 0"
        )


def _check_lr(config: TrainConfig, report: Report) -> None:
    s = config.lr
    if s.decay_style not in LR_DECAY_STYLES:
        report(f"lr.decay_style must be one of {LR_DECAY_STYLES}, got {s.decay_style!r}")
    if s.warmup_steps < 0 or s.rewarmup_steps < 0 or s.decay_steps < 0:
        report(
            f"lr.warmup_steps ({s.warmup_steps}), lr.rewarmup_steps ({s.rewarmup_steps}) and "
            f"lr.decay_steps ({s.decay_steps}) must be >= 0"
        )
    if not 0.0 <= s.min_lr <= config.optimizer.lr:
        report(f"lr.min_lr ({s.min_lr}) must be in [0, optimizer.lr ({config.optimizer.lr})]")
    if s.warmup_steps > s.decay_steps:
        report(f"lr.warmup_steps ({s.warmup_steps}) > lr.decay_steps ({s.decay_steps})")


def _check_data(config: TrainConfig, report: Report) -> None:
    d = config.data
    if d.source not in DATA_SOURCES:
        report(f"data.source must be one of {DATA_SOURCES}, got {d.source!r}")
    if d.source == "indexed" and not d.prefixes:
        report(
            "data.prefixes is empty; name at least one indexed dataset (or data.source=synthetic)"
        )
    if d.weights and len(d.weights) != len(d.prefixes):
        report(f"data.weights has {len(d.weights)} entries for {len(d.prefixes)} data.prefixes")
    if any(w < 0 for w in d.weights) or (d.weights and sum(d.weights) <= 0):
        report(f"data.weights must be >= 0 with a positive sum, got {d.weights}")
    try:
        parts = [float(x) for x in d.split.split(",")]
        if any(x < 0 for x in parts) or sum(parts) <= 0 or len(parts) > 3:
            raise ValueError
    except ValueError:
        report(f"data.split must be up to 3 comma-separated non-negative numbers, got {d.split!r}")
    if d.seq_len < 1 or d.seq_len > config.model.max_seq_len:
        report(
            f"data.seq_len ({d.seq_len}) must be in [1, model.max_seq_len ({config.model.max_seq_len})]"
        )


def _check_growth(config: TrainConfig, report: Report) -> None:
    try:
        models = config.stage_models()
    except ConfigError as err:
        report(f"growth: {err}")
        return
    previous_end = 0
    for k, (stage, old, new) in enumerate(zip(config.growth, models, models[1:])):
        key = f"growth.{k}"
        if stage.start_step <= previous_end:
            report(
                f"{key}.start_step ({stage.start_step}) must be after the previous stage "
                f"(start + ramp_steps = {previous_end})"
            )
        previous_end = stage.start_step + stage.ramp_steps
        _check_stage_shape(key, old, new, report)
        try:
            new.validate(tp_size=config.parallel.tp, pp_size=config.parallel.pp)
        except ConfigError as err:
            report(f"{key}: {err}")
        if stage.ramp_steps < 0:  # 0: the "No Mask" ablation (new units fully on at once)
            report(f"{key}.ramp_steps must be >= 0, got {stage.ramp_steps}")
        if stage.operator == "net2net" and stage.ramp_steps != 0:
            report(f"{key}.ramp_steps must be 0 with operator net2net (it has no masks to ramp), "
                   f"got {stage.ramp_steps}")  # fmt: skip
        for name, value, choices in (
            ("operator", stage.operator, GROWTH_OPERATORS),
            ("init", stage.init, INIT_SCHEMES),
            ("depth_strategy", stage.depth_strategy, DEPTH_STRATEGIES),
            ("moment_policy", stage.moment_policy, MOMENT_POLICIES),
        ):
            if value not in choices:
                report(f"{key}.{name} must be one of {choices}, got {value!r}")


def _check_stage_shape(key: str, old: ModelConfig, new: ModelConfig, report: Report) -> None:
    old_shape = tuple(getattr(old, n) for n in _GROWN)
    new_shape = tuple(getattr(new, n) for n in _GROWN)
    smaller = [
        f"{n} {getattr(old, n)} -> {getattr(new, n)}"
        for n in _GROWN
        if getattr(new, n) < getattr(old, n)
    ]
    if smaller:
        report(f"{key} is smaller than the previous stage: {', '.join(smaller)}")
    elif new_shape == old_shape:
        report(f"{key} does not grow anything: (hidden, ffn, heads, layers) stays {old_shape}")


def _check_io(config: TrainConfig, report: Report) -> None:
    c, lg = config.checkpoint, config.logging
    if c.interval < 0 or c.keep < 0:
        report(f"checkpoint.interval ({c.interval}) and checkpoint.keep ({c.keep}) must be >= 0")
    # The run's own checkpoint wins over checkpoint.load, so only a run with nothing to
    # resume needs the store (checkpoint/resume.py checks its contents).
    resuming = c.resume and (config.checkpoint_dir / "latest").exists()
    if c.load and not resuming and not (Path(c.load) / "meta.json").is_file():
        report(
            f"checkpoint.load ({c.load}) is not a canonical checkpoint (no meta.json there); "
            "make one with `megatron-msg convert` or `megatron-msg grow`"
        )
    if lg.interval < 1 or lg.peak_flops < 0:
        report(
            f"logging.interval ({lg.interval}) must be >= 1, logging.peak_flops ({lg.peak_flops}) >= 0"
        )
