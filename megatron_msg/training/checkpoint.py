"""Atomic training checkpoints: DeepSpeed's native shards plus our run metadata.

Layout of ``<checkpoint dir>``::

    latest                      text: the tag of the newest complete checkpoint
    step_00000120/              one complete checkpoint (tag)
        mp_rank_00_model_states.pt, ...   DeepSpeed's files (each rank its shard)
        msg_meta.json           step, stage, data position, LR state, counters, config
        msg_state.safetensors   mask values and ramp start values (rank 0)
        msg_rng_rank{r}.safetensors  RNG states of rank r
    .tmp-step_00000140/         a save in progress (ignored, removed by the next save)

A save writes everything under ``.tmp-<tag>``, every rank flushes its files,
then rank 0 renames the directory to ``<tag>`` and only then rewrites
``latest`` (temp file + rename). A run killed at any point leaves ``latest``
naming a complete checkpoint. Ranks must share the filesystem.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_msg.training.config import atomic_write_text

META = "msg_meta.json"
STATE = "msg_state.safetensors"
TMP_PREFIX = ".tmp-"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class RunState:
    """Everything besides the engine that a resumed run needs to continue exactly."""

    step: int  # optimizer steps completed
    stage: int  # index into TrainConfig.stage_models()
    consumed_samples: int
    lr: dict[str, Any]
    ramp: dict[str, Any] | None  # MaskRamp.state_dict() of the current stage, if any
    skipped_steps: int = 0
    nonfinite_in_row: int = 0
    elapsed: float = 0.0  # wall seconds of training before this checkpoint
    tokens: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def latest_tag(directory: str | os.PathLike[str]) -> str | None:
    """The tag ``latest`` names, or None for a directory with no complete checkpoint."""
    pointer = Path(directory) / "latest"
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (Path(directory) / tag / META).exists():
        raise FileNotFoundError(
            f"{pointer} names {tag!r} but {Path(directory) / tag / META} is missing"
        )
    return tag


def save_checkpoint(
    engine: Any, run: RunState, *, directory: str | os.PathLike[str], keep: int
) -> str:
    """Save atomically (see the module docstring); collective over all ranks. Returns the tag."""
    root = Path(directory)
    tag = tag_for(run.step)
    tmp_tag = TMP_PREFIX + tag
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_native(str(root), tag=tmp_tag)
    tmp_dir = root / tmp_tag
    _save_rng(tmp_dir / f"msg_rng_rank{rank}.safetensors", engine)
    if rank == 0:
        _save_run_state(tmp_dir, run)
    dist.barrier()  # every rank's files are written
    if rank == 0:
        _fsync_tree(tmp_dir)
        _publish(root, tmp_dir, tag)
        _prune(root, keep=keep)
    dist.barrier()
    return tag


def _save_run_state(tmp_dir: Path, run: RunState) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta = dict(run.__dict__)
    if run.ramp is not None:
        ramp = dict(run.ramp)
        for name, value in ramp.pop("start").items():
            tensors[f"ramp.start.{name}"] = value.contiguous()
        meta["ramp"] = ramp
    save_file(tensors, str(tmp_dir / STATE))
    atomic_write_text(tmp_dir / META, json.dumps(meta, indent=1, sort_keys=True))


def _publish(root: Path, tmp_dir: Path, tag: str) -> None:
    final = root / tag
    if final.exists():  # the same step saved again after a resume replayed it
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    atomic_write_text(root / "latest", tag + "\n")


def _prune(root: Path, *, keep: int) -> None:
    if keep <= 0:
        return
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Make the checkpoint's files durable before the rename publishes them."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def load_run_state(directory: str | os.PathLike[str], tag: str) -> RunState:
    folder = Path(directory) / tag
    meta = json.loads((folder / META).read_text())
    tensors = load_file(str(folder / STATE))
    if meta.get("ramp") is not None:
        prefix = "ramp.start."
        start = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        meta["ramp"] = {**meta["ramp"], "start": start}
    return RunState(**meta)


# ---- RNG states ---------------------------------------------------------------


def _save_rng(path: Path, engine: Any) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    model_rng = getattr(engine.module, "rng", None)
    if model_rng is not None:
        for name, state in model_rng.state_dict().items():
            tensors[f"model.{name}"] = state
    np_state: Any = np.random.get_state(legacy=True)
    metadata = {
        "python": json.dumps(_jsonable(random.getstate())),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_rng(directory: str | os.PathLike[str], tag: str, engine: Any) -> None:
    """Restore this rank's RNG states (torch, CUDA, numpy, python, model dropout streams)."""
    from safetensors import safe_open

    path = Path(directory) / tag / f"msg_rng_rank{dist.get_rank()}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    model_rng = getattr(engine.module, "rng", None)
    streams = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    if model_rng is not None and streams:
        model_rng.load_state_dict(streams)
    random.setstate(_tupled(json.loads(metadata["python"])))
    kind, keys, *rest = json.loads(metadata["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
