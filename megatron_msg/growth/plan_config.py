"""Input of ``megatron-msg plan``: a training config plus its ``plan:`` section.

The YAML is the one ``megatron-msg train`` reads (parsed and type-checked by
``megatron_msg.training.config``); the ``plan:`` section holds planning
assumptions only and is removed before the training schema sees the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.training.config import TrainConfig
from megatron_msg.training.schema import build_dataclass, parse_override, set_dotted

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class PlanSettings:
    """Planning assumptions: the ``plan:`` section of a config (``megatron-msg train`` ignores it)."""

    gpus: int = 0  # 0: tp * pp * dp (or the hostfile's slots)
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # GiB per GPU
    peak_tflops: float = 0.0  # per GPU; 0: logging.peak_flops, else DEFAULT_PEAK_TFLOPS
    mfu: float = 0.0  # model FLOPs utilisation; give this or hfu (else DEFAULT_MFU)
    hfu: float = 0.0  # hardware FLOPs utilisation (counts recomputation)
    recompute: str = "full"  # activation recomputation: none | selective | full
    flash_attention: bool = True  # fused attention keeps no s^2 activations
    sequence_parallel: bool = False
    overhead_gb: float = 4.0  # CUDA context, NCCL and ZeRO bucket buffers, fragmentation
    tokens: float = 0.0  # token budget; 0: train.steps * global batch * seq_len
    deepspeed_config: str = ""  # a DeepSpeed JSON (relative to the YAML) that must agree

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(
                f"plan.recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}"
            )
        if self.mfu and self.hfu:
            raise ConfigError(f"give plan.mfu ({self.mfu}) or plan.hfu ({self.hfu}), not both")
        if not (0 <= self.mfu <= 1 and 0 <= self.hfu <= 1):
            raise ConfigError(f"plan.mfu ({self.mfu}) and plan.hfu ({self.hfu}) must be in [0, 1]")
        for name in (
            "gpus",
            "gpus_per_node",
            "gpu_memory_gb",
            "peak_tflops",
            "overhead_gb",
            "tokens",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"plan.{name} must be >= 0, got {getattr(self, name)}")


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
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    plan = build_dataclass(PlanSettings, raw.pop("plan", None) or {}, prefix="plan.")
    try:
        train = TrainConfig.from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
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
