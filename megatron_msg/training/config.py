"""The configuration of a training run: dataclasses, YAML + ``key=value`` overrides, validation.

A run is described by one YAML file whose top-level sections are the fields of
:class:`TrainConfig`; any value can be overridden on the command line with a
dotted key (``optimizer.lr=3e-4``, ``growth.0.start_step=200``). Unknown keys
are rejected with the key named. :meth:`TrainConfig.validate` is one pass over
everything that can be checked before any work starts (world size, batch
arithmetic, growth schedule); each error names the values involved.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.optimizer_state import DEFAULT_MOMENT_POLICY
from megatron_msg.training.schema import build_dataclass, parse_override, set_dotted

LR_DECAY_STYLES = ("cosine", "linear", "constant")
DTYPES = ("fp32", "bf16")
DATA_SOURCES = ("indexed", "synthetic")
RECOMPUTE_MODES = ("none", "selective", "full")
Recompute = Literal["none", "selective", "full"]


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 0  # 0: derived as world_size // (tp * pp)
    zero_stage: int = 0


@dataclass
class OptimizerConfig:
    lr: float = 3e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0  # 0 disables clipping


@dataclass
class LRConfig:
    warmup_steps: int = 0
    decay_style: str = "cosine"
    decay_steps: int = 0  # 0: until train.steps
    min_lr: float = 0.0
    rewind_on_growth: bool = False  # back to the peak at each growth event ...
    rewarmup_steps: int = 0  # ... reached linearly from min_lr over these steps


@dataclass
class BatchConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 0  # 0: micro_batch_size * grad_accum * dp
    grad_accum: int = 0  # 0: derived from the global batch


@dataclass
class DataConfig:
    source: str = "indexed"
    prefixes: list[str] = field(default_factory=list)  # indexed dataset paths without .bin/.idx
    weights: list[float] = field(default_factory=list)  # blend weights, one per prefix
    split: str = "969,30,1"
    seq_len: int = 128
    seed: int = 1234


@dataclass
class GrowthStage:
    """Grow to this shape at ``start_step`` (a field left 0 keeps the previous value)."""

    start_step: int = 0
    hidden_size: int = 0
    ffn_hidden_size: int = 0
    num_heads: int = 0
    num_layers: int = 0
    ramp_steps: int = 100  # 0: masks set to 1 and folded at once ("No Mask" ablation)
    init: str = "normal"
    depth_strategy: str = "stack"
    moment_policy: str = DEFAULT_MOMENT_POLICY  # or "mean_sq"; see growth/optimizer_state.py
    # "msg": masked, strictly function-preserving; "net2net": the copy baseline
    # (growth/net2net.py), mask-free, so it needs ramp_steps 0.
    operator: str = "msg"


@dataclass
class CheckpointConfig:
    dir: str = ""  # "": <run_dir>/checkpoints
    interval: int = 0  # optimizer steps between saves; 0: only at the end
    keep: int = 2  # most recent checkpoints kept (0: all)
    resume: bool = True  # continue from <dir>/latest when it exists
    # A canonical store (``megatron-msg convert`` / ``grow`` output) to start from when
    # there is nothing to resume: the run-dir checkpoint, if any, always wins.
    load: str = ""


@dataclass
class LoggingConfig:
    interval: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    peak_flops: float = 0.0  # per device, FLOP/s; 0: a default for the device


@dataclass
class RunConfig:
    steps: int = 100  # optimizer steps
    seed: int = 1234
    dtype: str = "fp32"
    run_dir: str = "runs/default"
    max_nonfinite_in_row: int = 5  # consecutive skipped steps that stop the run
    # Activation recomputation: "full" keeps only each block's input and reruns the
    # block in backward; "selective" reruns the attention sublayer only.
    recompute: Recompute = "none"


@dataclass(frozen=True)
class PlanSettings:
    """Planning assumptions for ``megatron-msg plan`` (the ``plan:`` section); training
    carries them without using them, so one YAML serves both commands."""

    gpus: int = 0  # 0: tp * pp * dp (or the hostfile's slots)
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # GiB per GPU
    peak_tflops: float = 0.0  # per GPU; 0: logging.peak_flops, else the planner's default
    mfu: float = 0.0  # model FLOPs utilisation; give this or hfu (else the planner's default)
    hfu: float = 0.0  # hardware FLOPs utilisation (counts recomputation)
    flash_attention: bool = True  # fused attention keeps no s^2 activations
    sequence_parallel: bool = False
    overhead_gb: float = 4.0  # CUDA context, NCCL and ZeRO bucket buffers, fragmentation
    tokens: float = 0.0  # token budget; 0: train.steps * global batch * seq_len
    deepspeed_config: str = ""  # a DeepSpeed JSON (relative to the YAML) that must agree

    def __post_init__(self) -> None:
        if self.mfu and self.hfu:
            raise ConfigError(f"give plan.mfu ({self.mfu}) or plan.hfu ({self.hfu}), not both")
        if not (0 <= self.mfu <= 1 and 0 <= self.hfu <= 1):
            raise ConfigError(f"plan.mfu ({self.mfu}) and plan.hfu ({self.hfu}) must be in [0, 1]")
        for name in ("gpus", "gpus_per_node", "gpu_memory_gb", "peak_tflops", "overhead_gb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"plan.{name} must be >= 0, got {getattr(self, name)}")
        if self.tokens < 0:
            raise ConfigError(f"plan.tokens must be >= 0, got {self.tokens}")


@dataclass
class TrainConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    growth: list[GrowthStage] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: RunConfig = field(default_factory=RunConfig)
    plan: PlanSettings = field(default_factory=PlanSettings)

    # ---- derived values (valid after resolve) ------------------------------

    def resolve(self, *, world_size: int) -> TrainConfig:
        """Fill the derived fields (dp, grad_accum, global batch) and validate everything."""
        from megatron_msg.training.validate import resolve_and_validate

        return resolve_and_validate(self, world_size=world_size)

    def stage_models(self) -> list[ModelConfig]:
        """Model config of stage 0 (the base model) and of every growth stage after it."""
        models = [self.model]
        for stage in self.growth:
            previous = models[-1]
            models.append(
                previous.replace(
                    hidden_size=stage.hidden_size or previous.hidden_size,
                    ffn_hidden_size=stage.ffn_hidden_size or previous.ffn_hidden_size,
                    num_heads=stage.num_heads or previous.num_heads,
                    num_layers=stage.num_layers or previous.num_layers,
                )
            )
        return models

    def stage_at(self, step: int) -> int:
        """Index into :meth:`stage_models` of the model that trains optimizer step ``step``."""
        return sum(1 for stage in self.growth if stage.start_step <= step)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.train.run_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if not isinstance(values, dict) or "model" not in values:
            raise ConfigError("a training config needs a 'model' section")
        return build_dataclass(cls, values, prefix="")


def _plain(value: Any) -> Any:
    """Tuples become lists so the YAML we write is plain (safe_load-able)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML config file's top-level mapping; a missing, unreadable or malformed
    file is a ConfigError naming the file, not a traceback."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level, got {type(loaded).__name__}"
        )
    return loaded or {}


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML; None for an empty base) and apply ``key=value`` overrides."""
    values = read_yaml_mapping(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(values, key, value)
    return TrainConfig.from_dict(values)


def write_resolved(config: TrainConfig, run_dir: str | os.PathLike[str]) -> Path:
    """Write ``config.yaml`` into ``run_dir`` atomically; returns its path."""
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "config.yaml"
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_text(target, text)
    return target


def atomic_write_text(target: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``target``."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
