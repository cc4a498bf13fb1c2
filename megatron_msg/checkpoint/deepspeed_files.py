"""The files of a ``megatron-msg train`` checkpoint: where they are, what they must say, safe loading.

A training checkpoint (``megatron_msg.training.checkpoint``) is one tag folder::

    <checkpoint dir>/latest                 names the newest complete tag
    <checkpoint dir>/<tag>/msg_meta.json    our run state (step, stage, LR, data, config)
    <checkpoint dir>/<tag>/msg_state.safetensors            mask-ramp start values
    <checkpoint dir>/<tag>/mp_rank_{mp:02d}_model_states.pt one per model-parallel rank
    <checkpoint dir>/<tag>/[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt
                                            one per (DP, MP) rank under ZeRO 1/2

The model-parallel rank of (pp_rank, tp_rank) is ``pp_rank * tp + tp_rank``
(our ``DeepSpeedMPU``). DeepSpeed's ``.pt`` files are pickles: they are opened
with ``torch.load(weights_only=True, mmap=True)`` and only three DeepSpeed
value types are allow-listed (the loss scaler, the ZeRO stage enum and the
fragment address of ``param_slice_mappings``), all plain data holders. With
``mmap`` a file costs only its pickled metadata until a tensor is read.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_msg.checkpoint.safetensors_files import CanonicalCheckpointError
from megatron_msg.config import ConfigError
from megatron_msg.training.checkpoint import META, STATE, RunState, load_run_state
from megatron_msg.training.config import TrainConfig

__all__ = [
    "DeepSpeedCheckpointError",
    "NativeLayout",
    "find_tag_dir",
    "read_run_state",
    "safe_load",
]

_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")


class DeepSpeedCheckpointError(CanonicalCheckpointError):
    """A training checkpoint is missing, inconsistent, corrupt or unsafe; the message names the file."""


def _safe_globals() -> list[Any]:
    # Imported here: importing deepspeed takes seconds and only conversion needs it.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: Path) -> Any:
    """``torch.load`` a DeepSpeed file without executing code from it (memory-mapped, CPU)."""
    if not path.is_file():
        raise DeepSpeedCheckpointError(f"{path}: missing")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        match = _UNSUPPORTED.search(str(err))
        what = f"type {match.group(1)}" if match else _last_line(str(err))
        raise DeepSpeedCheckpointError(
            f"{path}: refusing to unpickle {what}: only tensors, plain Python values and "
            "DeepSpeed's LossScaler / ZeroStageEnum / fragment_address are allowed"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise DeepSpeedCheckpointError(
            f"{path}: cannot be read (truncated, corrupt or not a torch.save zip file): "
            f"{_last_line(str(err))}"
        ) from None


def _last_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else message[:300]


def find_tag_dir(load: str | os.PathLike[str], *, tag: str | None = None) -> Path:
    """The tag folder meant by ``load``: a tag folder itself, a checkpoint directory
    (with ``latest``) or a run directory (with ``checkpoints/latest`` or a config.yaml
    naming ``checkpoint.dir``); ``tag`` picks a tag other than the latest."""
    path = Path(load)
    if (path / META).is_file():
        if tag is not None and tag != path.name:
            raise DeepSpeedCheckpointError(f"{path} is the checkpoint {path.name!r}, not {tag!r}")
        return path
    for root in _checkpoint_roots(path):
        if tag is not None and (root / tag).is_dir():
            return _require_meta(root / tag)
        if tag is None and (root / "latest").is_file():
            name = (root / "latest").read_text().strip()
            return _require_meta(root / name)
    what = f"tag {tag!r}" if tag else "a 'latest' file"
    raise DeepSpeedCheckpointError(
        f"{path}: no training checkpoint here (looked for {META}, {what} in it or in "
        f"{path / 'checkpoints'})"
    )


def _checkpoint_roots(path: Path) -> list[Path]:
    roots = [path, path / "checkpoints"]
    config = path / "config.yaml"
    if config.is_file():
        import yaml

        values = yaml.safe_load(config.read_text()) or {}
        folder = (values.get("checkpoint") or {}).get("dir") if isinstance(values, dict) else None
        if folder:
            roots.append(Path(folder))
    return roots


def _require_meta(folder: Path) -> Path:
    if not (folder / META).is_file():
        raise DeepSpeedCheckpointError(f"{folder}: incomplete checkpoint, {META} is missing")
    return folder


def read_run_state(folder: Path) -> tuple[RunState, TrainConfig]:
    """Our run metadata of a tag folder and the run's resolved config."""
    try:
        run = load_run_state(folder.parent, folder.name)
        config = TrainConfig.from_dict(run.config)
    except FileNotFoundError as err:
        raise DeepSpeedCheckpointError(f"{folder}: {err.filename or err} is missing") from None
    except (json.JSONDecodeError, TypeError, KeyError, ConfigError) as err:
        raise DeepSpeedCheckpointError(f"{folder / META} (or {STATE}): {err}") from None
    except Exception as err:  # safetensors raises its own error types
        raise DeepSpeedCheckpointError(f"{folder / STATE}: cannot be read: {err}") from None
    if not 0 <= run.stage < len(config.stage_models()):
        raise DeepSpeedCheckpointError(
            f"{folder / META}: stage {run.stage} but the config has "
            f"{len(config.stage_models())} stage(s)"
        )
    return run, config


@dataclass(frozen=True)
class NativeLayout:
    """The topology a checkpoint was written with and the file names that follow from it."""

    folder: Path
    tp: int
    pp: int
    dp: int
    zero_stage: int
    bf16: bool
    num_layers: int  # decoder layers of the checkpoint's model (pipeline layer files)

    @classmethod
    def of(cls, folder: Path, config: TrainConfig, *, stage: int) -> NativeLayout:
        p = config.parallel
        layers = config.stage_models()[stage].num_layers
        return cls(folder, p.tp, p.pp, p.dp, p.zero_stage, config.train.dtype == "bf16", layers)

    def describe(self) -> str:
        dtype = "bf16" if self.bf16 else "fp32"
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero_stage={self.zero_stage} {dtype}"

    def mp_rank(self, *, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def model_file(self, mp_rank: int) -> Path:
        return self.folder / f"mp_rank_{mp_rank:02d}_model_states.pt"

    def optim_file(self, *, dp_rank: int, mp_rank: int) -> Path:
        prefix = "bf16_" if self.bf16 else ""
        return self.folder / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"

    def layer_file(self, index: int, *, tp_rank: int) -> Path:
        """DeepSpeed ``PipelineModule`` weights of item ``index`` of the layer list
        ``[embedding, block 0 .. block L-1, head]`` (pp > 1 only)."""
        return self.folder / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"

    def expected_files(self) -> list[Path]:
        mps = range(self.tp * self.pp)
        files = [self.model_file(m) for m in mps]
        if self.zero_stage > 0:
            files += [self.optim_file(dp_rank=d, mp_rank=m) for m in mps for d in range(self.dp)]
        if self.pp > 1:
            items = range(self.num_layers + 2)
            files += [self.layer_file(i, tp_rank=t) for i in items for t in range(self.tp)]
        return files

    def check_files(self) -> None:
        """Every file the topology needs exists and no file of another topology is there."""
        expected = self.expected_files()
        missing = [f.name for f in expected if not f.is_file()]
        present = {f.name for f in self.folder.glob("*_states.pt")}
        stray = sorted(present - {f.name for f in expected})
        if missing:
            raise DeepSpeedCheckpointError(
                f"{self.folder}: missing {len(missing)} file(s) for the run's topology "
                f"({self.describe()}): {', '.join(missing[:6])}"
            )
        if stray:
            raise DeepSpeedCheckpointError(
                f"{self.folder}: file(s) {', '.join(stray[:6])} do not belong to the topology "
                f"recorded in {META} ({self.describe()})"
            )

    def check_model_states(self, path: Path, states: dict[str, Any]) -> None:
        """What DeepSpeed recorded in a model-states file agrees with our metadata."""
        dims = states.get("checkpoint_parallel_dimensions") or {}
        found = {
            "dp_world_size": (states.get("dp_world_size"), self.dp),
            "mp_world_size": (states.get("mp_world_size"), self.tp * self.pp),
            "tp_degree": (dims.get("tp_degree", self.tp), self.tp),
            "pp_degree": (dims.get("pp_degree", self.pp), self.pp),
        }
        ds_config = states.get("ds_config") or {}
        stage = (ds_config.get("zero_optimization") or {}).get("stage", self.zero_stage)
        found["zero stage"] = (stage, self.zero_stage)
        found["bf16"] = (bool((ds_config.get("bf16") or {}).get("enabled", self.bf16)), self.bf16)
        wrong = {k: v for k, (v, want) in found.items() if v != want}
        if wrong:
            raise DeepSpeedCheckpointError(
                f"{path}: written with {wrong}, but {META} says {self.describe()}"
            )
