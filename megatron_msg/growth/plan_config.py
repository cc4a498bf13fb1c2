"""Input of ``megatron-msg plan``: a training config plus its ``plan:`` section.

The YAML is the one ``megatron-msg train`` reads, parsed and type-checked by
the one schema of ``megatron_msg.training.config``: its ``plan:`` section
(:class:`PlanSettings`) holds planning assumptions only, which training carries
and ignores. Activation recomputation is a training setting
(``train.recompute``), read from there by the planner too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.training.config import (
    RECOMPUTE_MODES,
    PlanSettings,
    TrainConfig,
    read_yaml_mapping,
)
from megatron_msg.training.schema import parse_override, set_dotted

__all__ = ["RECOMPUTE_MODES", "PlanSettings", "StageInput", "hostfile_slots", "load_stages"]


@dataclass
class StageInput:
    """One model stage to plan: the training config, its planning assumptions, the model."""

    label: str
    train: TrainConfig
    plan: PlanSettings
    model: ModelConfig
    deepspeed_config: Path | None = None


def load_stages(path: str | Path, overrides: Sequence[str] = ()) -> list[StageInput]:
    """Read one config: the training config plus its ``plan:`` section; one entry per model stage."""
    raw = read_yaml_mapping(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    try:
        train = TrainConfig.from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    plan = train.plan
    train = _resolve_sizes(train, plan)
    models = train.stage_models()
    name = Path(path).name
    ds = Path(path).parent / plan.deepspeed_config if plan.deepspeed_config else None
    return [
        StageInput(
            label=name if len(models) == 1 else f"{name}[stage {i}]",
            train=train,
            plan=plan,
            model=m,
            deepspeed_config=ds,
        )
        for i, m in enumerate(models)
    ]


def _resolve_sizes(train: TrainConfig, plan: PlanSettings) -> TrainConfig:
    """Derive dp and the batch the way the trainer does, without failing on other checks."""
    p, b = train.parallel, train.batch
    dp = p.dp or max(plan.gpus // (p.tp * p.pp), 1)
    accum = b.grad_accum
    if not accum:
        per_step = b.micro_batch_size * dp
        accum = b.global_batch_size // per_step if b.global_batch_size else 1
    gbs = b.global_batch_size or b.micro_batch_size * accum * dp
    return dataclasses.replace(
        train,
        parallel=dataclasses.replace(p, dp=dp),
        batch=dataclasses.replace(b, grad_accum=accum, global_batch_size=gbs),
    )


def hostfile_slots(path: str | Path) -> int:
    """Total ``slots=N`` of a DeepSpeed hostfile (``host slots=N`` per line, # comments)."""
    total = 0
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or len(slots) != 1 or not slots[0][6:].isdigit():
            raise ConfigError(f"{path}:{number}: expected 'HOST slots=N', got {line!r}")
        total += int(slots[0][6:])
    if total == 0:
        raise ConfigError(f"{path}: no hosts listed")
    return total
