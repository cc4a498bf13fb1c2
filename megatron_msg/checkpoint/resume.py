"""Start ``megatron-msg train`` from a canonical store at any topology (``checkpoint.load``).

The store (``megatron-msg convert`` or ``megatron-msg grow`` output) is
topology-free; the run that loads it may use any TP and DP (and ZeRO stage,
dtype) of its own. What happens:

1. :func:`open_canonical_start` checks the store against the run's config
   before any engine exists: the store's model must be the config's model at
   the store's step (or the model just before a growth stage that starts at
   that step, which the trainer then grows in-run), the data position must
   be ``step * batch.global_batch_size`` (the loader is indexed by step), the
   step must not be past ``train.steps``, and per-tensor Adam steps must be
   representable (ZeRO 1/2 keeps one Adam step per parameter group).
2. :func:`load_canonical_into` fills a freshly built engine: every rank reads
   only its TP slice of each parameter's fp32 master, ``exp_avg`` and
   ``exp_avg_sq`` (:meth:`CanonicalReader.get_shard`, split rules of
   ``model/canonical.py``), one tensor at a time, and hands it to DeepSpeed's
   per-parameter API (``safe_set_full_fp32_param`` /
   ``safe_set_full_optimizer_state``, through the engine's setters, which also
   cover ZeRO-0). Masks are loaded as stored, then the ramp scheduled in
   ``meta.masks["ramp"]`` is applied.

Same shape and same topology in, same numbers out: the continuation is exact
(bitwise in fp32 on CPU when TP is unchanged; a different TP only changes
reduction order). The dropout streams are not part of a canonical store: they
are reseeded from ``train.seed`` and the step.

A run directory that already holds a checkpoint of its own always wins over
``checkpoint.load``: a job restarted after a crash resumes where it stopped
instead of going back to the stage's starting point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_msg.checkpoint.canonical import CanonicalReader
from megatron_msg.checkpoint.run_meta import decode_ramp
from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.masks import set_masks
from megatron_msg.model.canonical import canonical_specs, mask_specs
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.random import ParallelRNG
from megatron_msg.training.config import TrainConfig
from megatron_msg.training.engine import MOMENT_KEYS, TrainEngine

__all__ = ["CanonicalStart", "load_canonical_into", "open_canonical_start"]

# Fields that may differ between the store's model and the config's without
# changing a single tensor (dropout is a training-time choice).
_FREE_FIELDS = ("dropout",)


@dataclass
class CanonicalStart:
    """What the trainer takes from a canonical store besides tensors."""

    reader: CanonicalReader
    stage: int  # index into TrainConfig.stage_models()
    step: int
    adam_steps: dict[str, int]  # every parameter's Adam step
    lr: dict[str, Any] = field(default_factory=dict)
    ramp: dict[str, Any] | None = None  # MaskRamp.state_dict()
    counters: dict[str, Any] = field(default_factory=dict)  # skipped_steps, elapsed, ...

    @property
    def path(self) -> Path:
        return self.reader.path


def open_canonical_start(path: str | os.PathLike[str], config: TrainConfig) -> CanonicalStart:
    """Open and check the store against the resolved ``config`` (nothing is changed)."""
    reader = CanonicalReader(path)
    try:
        meta = reader.meta
        stage = _matching_stage(config, meta.model, meta.step, where=reader.path)
        _check_position(config, meta.step, meta.data, where=reader.path)
        steps = {n: meta.adam_step.get(n, meta.step) for n in reader.names("exp_avg")}
        _check_adam_steps(config, steps, where=reader.path)
        extra = meta.extra
        counters = {
            k: extra[k]
            for k in ("skipped_steps", "nonfinite_in_row", "elapsed")
            if isinstance(extra.get(k), int | float)
        }
        tokens = meta.data.get("tokens")
        counters["tokens"] = tokens if isinstance(tokens, int) else meta.step * _tokens(config)
        return CanonicalStart(
            reader=reader,
            stage=stage,
            step=meta.step,
            adam_steps=steps,
            lr=dict(meta.lr),
            ramp=_ramp_state(reader),
            counters=counters,
        )
    except BaseException:
        reader.close()
        raise


def load_canonical_into(
    engine: TrainEngine, start: CanonicalStart, *, groups: ProcessGroups, seed: int
) -> None:
    """Fill ``engine`` (built for the store's model) from the store; collective over all ranks."""
    reader = start.reader
    model = engine.module
    specs = canonical_specs(model.config)
    targets = _targets(model)
    missing = [n for n, _ in targets if not reader.has(n, kind="exp_avg")]
    if missing:
        raise ConfigError(f"{reader.path}: no optimizer moments for {missing[:5]} ({len(missing)})")
    # DeepSpeed creates (and links) the optimizer state at the first step: one exact
    # no-op step first (zero gradients at learning rate 0), as TrainEngine.set_state does.
    if not engine._optimizer_state_ready():
        engine._null_step()
    engine._relink_zero_state()
    for name, param in targets:
        dim = specs[name].split_dim
        engine._set_fp32(param, _local(reader, name, dim, groups, kind="weights"))
        for key in MOMENT_KEYS:
            engine._set_moment(param, key, _local(reader, name, dim, groups, kind=key))
    _set_adam_steps(engine, start.adam_steps, targets)
    stored_masks = {n: reader.get(n) for n in mask_specs(model.config) if reader.has(n)}
    set_masks(model, stored_masks)
    model.rng = ParallelRNG(seed=seed + start.step, groups=groups, device=_device_of(model))


def _local(
    reader: CanonicalReader, name: str, dim: int | None, groups: ProcessGroups, *, kind: str
) -> torch.Tensor:
    if dim is None or groups.tp_size == 1:
        return reader.get(name, kind=kind)
    return reader.get_shard(name, dim=dim, rank=groups.tp_rank, world=groups.tp_size, kind=kind)


def _targets(module: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) of every parameter this rank holds: a pipeline stage's
    own (plus the last stage's copy of a tied word embedding), else the module's."""
    if hasattr(module, "canonical_parameters"):
        targets = list(module.canonical_parameters().items())
        tied = module.tied_copy()
        return targets + ([("embed.word.weight", tied)] if tied is not None else [])
    return list(module.named_parameters())


def _set_adam_steps(
    engine: TrainEngine, steps: dict[str, int], targets: list[tuple[str, torch.nn.Parameter]]
) -> None:
    values = set(steps.values())
    if len(values) <= 1:
        engine.set_adam_step(next(iter(values), 0))
        return
    # Only ZeRO-0 gets here (see _check_adam_steps): torch AdamW keeps a step per tensor.
    state = engine._inner_optimizer.state
    for name, param in targets:
        state[param]["step"].fill_(float(steps[name]))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- checks


def _shape_of(model: ModelConfig) -> dict[str, Any]:
    values = model.to_dict()
    return {k: v for k, v in values.items() if k not in _FREE_FIELDS}


def _matching_stage(config: TrainConfig, model: ModelConfig, step: int, *, where: Path) -> int:
    """The config stage whose model the store holds at ``step``."""
    models = config.stage_models()
    current = config.stage_at(step)
    candidates = [current]
    if current > 0 and config.growth[current - 1].start_step == step:
        candidates.append(current - 1)  # not grown yet: the trainer grows it in-run
    have = _shape_of(model)
    for stage in candidates:
        if _shape_of(models[stage]) == have:
            return stage
    want = _shape_of(models[current])
    diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want))}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    raise ConfigError(
        f"{where}: the checkpoint's model differs from the config's model for step {step} "
        f"(stage {current}): (checkpoint, config) = {diff}"
    )


def _check_position(config: TrainConfig, step: int, data: dict[str, Any], *, where: Path) -> None:
    if step > config.train.steps:
        raise ConfigError(
            f"{where}: the checkpoint is at step {step}, past train.steps ({config.train.steps})"
        )
    batch = config.batch.global_batch_size
    consumed = data.get("consumed_samples")
    if consumed is not None and consumed != step * batch:
        raise ConfigError(
            f"{where}: the checkpoint consumed {consumed} samples in {step} steps, but "
            f"batch.global_batch_size ({batch}) would continue the data at sample {step * batch}"
        )
    seq = data.get("seq_len")
    if seq is not None and seq != config.data.seq_len:
        raise ConfigError(
            f"{where}: the checkpoint trained with seq_len {seq}, data.seq_len is "
            f"{config.data.seq_len}"
        )


def _check_adam_steps(config: TrainConfig, steps: dict[str, int], *, where: Path) -> None:
    if config.parallel.zero_stage == 0 or len(set(steps.values())) <= 1:
        return
    by_step: dict[int, list[str]] = {}
    for name, value in steps.items():
        by_step.setdefault(value, []).append(name)
    listing = {s: names[:3] for s, names in sorted(by_step.items())}
    raise ConfigError(
        f"{where}: tensors carry different Adam steps ({listing}); ZeRO stage "
        f"{config.parallel.zero_stage} keeps one step per parameter group: use "
        "parallel.zero_stage=0 or a checkpoint with one step"
    )


def _tokens(config: TrainConfig) -> int:
    return config.batch.global_batch_size * config.data.seq_len


def _ramp_state(reader: CanonicalReader) -> dict[str, Any] | None:
    """``meta.masks["ramp"]`` as a ``MaskRamp.state_dict()``; the grow tool lists the
    ramped masks (start values: the stored masks), a converted run stores them RLE."""
    ramp = reader.meta.masks.get("ramp")
    if ramp is None:
        return None
    start = ramp.get("start") if isinstance(ramp, dict) else None
    if isinstance(start, list):
        absent = [n for n in start if not reader.has(n)]
        if absent:
            raise ConfigError(f"{reader.path}: meta.masks.ramp names masks not stored: {absent}")
        return {
            "ramp_steps": int(ramp["ramp_steps"]),
            "steps_done": int(ramp.get("steps_done", 0)),
            "start": {n: reader.get(n) for n in start},
        }
    if isinstance(start, dict) and all(isinstance(v, dict) for v in start.values()):
        return decode_ramp(reader.meta.masks)
    if isinstance(start, dict):
        values = {n: torch.tensor(v, dtype=torch.float32) for n, v in start.items()}
        return {
            "ramp_steps": int(ramp["ramp_steps"]),
            "steps_done": int(ramp.get("steps_done", 0)),
            "start": values,
        }
    raise ConfigError(f"{reader.path}: meta.masks.ramp.start must be a list or mapping")
