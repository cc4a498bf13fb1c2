"""Our training run state (``msg_meta.json``) as canonical ``meta.json`` fields, and back.

``CanonicalMeta`` is JSON only, so the mask ramp's per-entry start values
(tensors in ``MaskRamp.state_dict()``) are stored run-length encoded: after a
growth step they are long runs of 1 (old units) and 0 (new units), so even a
51B model's ramp stays a few kilobytes. Values go through Python floats, which
hold every fp32 value exactly, so a decoded ramp equals the saved one bitwise.

Layout written by :func:`canonical_meta`::

    masks: {"ramp": {"ramp_steps": R, "steps_done": k,
                     "start": {mask name: {"shape": [...], "runs": [[value, count], ...]}}}}
           ({} when no ramp is scheduled)
    data:  {"consumed_samples": ..., "tokens": ..., "global_batch_size": ..., "seq_len": ...}
    lr:    the LR schedule's state_dict()
    extra: {"source": {...}, "train_config": {...}, "skipped_steps": ..., "nonfinite_in_row": ...,
            "elapsed": ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megatron_msg.checkpoint.canonical import CanonicalMeta
from megatron_msg.config import ConfigError
from megatron_msg.training.checkpoint import RunState
from megatron_msg.training.config import TrainConfig

__all__ = ["canonical_meta", "decode_ramp", "encode_ramp"]


def encode_ramp(state: Mapping[str, Any]) -> dict[str, Any]:
    """JSON form of a ``MaskRamp.state_dict()`` (start values run-length encoded)."""
    start = {name: _encode_tensor(value) for name, value in state["start"].items()}
    return {
        "ramp_steps": int(state["ramp_steps"]),
        "steps_done": int(state["steps_done"]),
        "start": start,
    }


def decode_ramp(masks_meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``MaskRamp.state_dict()`` stored in ``meta.masks``, or None when there is no ramp."""
    ramp = masks_meta.get("ramp")
    if ramp is None:
        return None
    try:
        start = {name: _decode_tensor(name, value) for name, value in ramp["start"].items()}
        return {
            "ramp_steps": int(ramp["ramp_steps"]),
            "steps_done": int(ramp["steps_done"]),
            "start": start,
        }
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"meta.masks.ramp is malformed: {err!r}") from None


def _encode_tensor(value: torch.Tensor) -> dict[str, Any]:
    flat = value.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    runs: list[list[float | int]] = []
    if flat.numel():
        # Boundaries where the value changes; each run is [value, length].
        change = torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1
        starts = [0, *change.tolist()]
        ends = [*starts[1:], flat.numel()]
        runs = [[float(flat[s]), e - s] for s, e in zip(starts, ends)]
    return {"shape": list(value.shape), "runs": runs}


def _decode_tensor(name: str, value: Mapping[str, Any]) -> torch.Tensor:
    shape = [int(s) for s in value["shape"]]
    runs = value["runs"]
    values = torch.tensor([float(v) for v, _ in runs], dtype=torch.float32)
    counts = torch.tensor([int(n) for _, n in runs], dtype=torch.long)
    if bool((counts < 1).any()) or int(counts.sum()) != torch.Size(shape).numel():
        raise ValueError(f"runs of {name} do not add up to its shape {shape}")
    return torch.repeat_interleave(values, counts).reshape(shape)


def canonical_meta(
    *,
    run: RunState,
    config: TrainConfig,
    adam_step: Mapping[str, int],
    source: Mapping[str, Any],
) -> CanonicalMeta:
    """The canonical meta of a training checkpoint's run state.

    ``adam_step`` is every parameter's Adam step; only those that differ from the
    run's optimizer step count are recorded (CanonicalMeta's convention).
    """
    return CanonicalMeta(
        model=config.stage_models()[run.stage],
        step=run.step,
        stage=run.stage,
        adam_step={n: int(s) for n, s in adam_step.items() if s != run.step},
        masks={} if run.ramp is None else {"ramp": encode_ramp(run.ramp)},
        data={
            "consumed_samples": run.consumed_samples,
            "tokens": run.tokens,
            "global_batch_size": config.batch.global_batch_size,
            "seq_len": config.data.seq_len,
        },
        lr=dict(run.lr),
        extra={
            "source": dict(source),
            "train_config": dict(run.config),
            "skipped_steps": run.skipped_steps,
            "nonfinite_in_row": run.nonfinite_in_row,
            "elapsed": run.elapsed,
        },
    )
