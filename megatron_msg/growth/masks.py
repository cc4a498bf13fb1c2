"""MSG masks on a live model: read and write them, ramp them to 1, fold them away.

Masks are addressed by canonical name (``masks.hidden``,
``layers.{i}.masks.heads|ffn|depth``) and given as full canonical tensors;
each rank keeps its slice. A folded mask (all ones) is absent from the model.

The ramp (DESIGN.md): after growth, a mask moves linearly from its start
values to 1 over ``ramp_steps`` optimizer steps; entries already at 1 stay
there. After ``k`` steps every entry is ``start + (1 - start) * k / ramp_steps``
(computed from the start values, never accumulated, so a resumed ramp is
bitwise identical), and once complete the ramped masks are folded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from megatron_msg.config import ConfigError
from megatron_msg.model.canonical import TensorSpec, gather_canonical, mask_specs
from megatron_msg.model.gpt import GPTModel
from megatron_msg.parallel.random import shard_tensor

MaskValue = torch.Tensor | float


def _holds(model: GPTModel, name: str) -> bool:
    """Whether ``model`` holds mask ``name``: always for a GPTModel; a pipeline stage
    (model/pipeline.py) holds the hidden mask and the masks of its own layers."""
    holds = getattr(model, "holds_mask", None)
    return True if holds is None else bool(holds(name))


def _local_masks(model: GPTModel) -> dict[str, torch.Tensor]:
    """This rank's shards of the unfolded masks it holds, in canonical order."""
    local = {}
    for name in mask_specs(model.config):
        if not _holds(model, name):
            continue
        owner, key = model.mask_owner(name)
        value = owner.get(key)
        if value is not None:
            local[name] = value
    return local


def present_masks(model: GPTModel) -> list[str]:
    """Canonical names of the unfolded masks of ``model`` (canonical order; local, no comm)."""
    return list(_local_masks(model))


def get_masks(model: GPTModel) -> dict[str, torch.Tensor]:
    """Full canonical values (fp32) of every unfolded mask; collective over TP (and over
    the pipeline stages for a pipeline stage module, which each hold some layers)."""
    local = {n: v.to(torch.float32) for n, v in _local_masks(model).items()}
    full = gather_canonical(local, model.config, groups=model.groups)
    merge = getattr(model, "merge_stages", None)
    return full if merge is None else dict(merge(full))


def get_mask(model: GPTModel, name: str) -> torch.Tensor | None:
    """Full value of mask ``name``, or None when it is folded; collective over TP."""
    _spec(model, name)
    return get_masks(model).get(name)


def _spec(model: GPTModel, name: str) -> TensorSpec:
    specs = mask_specs(model.config)
    if name not in specs:
        known = f"masks.hidden, layers.{{0..{model.config.num_layers - 1}}}.masks.heads|ffn|depth"
        raise ConfigError(f"unknown mask {name!r}; this model's masks are {known}")
    return specs[name]


def _full_value(model: GPTModel, name: str, value: MaskValue) -> torch.Tensor:
    spec = _spec(model, name)
    if isinstance(value, torch.Tensor):
        full = value.detach().to(device="cpu", dtype=torch.float32)
    else:
        full = torch.full(spec.shape, float(value), dtype=torch.float32)
    if tuple(full.shape) != spec.shape:
        raise ConfigError(f"mask {name} must have shape {spec.shape}, got {tuple(full.shape)}")
    if not bool(((full >= 0) & (full <= 1)).all()):
        raise ConfigError(
            f"mask {name} values must lie in [0, 1], got range "
            f"[{float(full.min())}, {float(full.max())}]"
        )
    if name == "masks.hidden" and not bool((full > 0).any()):
        # Masked norms divide by sum(mask).
        raise ConfigError("masks.hidden must have at least one non-zero entry")
    return full


def set_masks(model: GPTModel, masks: Mapping[str, MaskValue]) -> None:
    """Set masks to full canonical values (a float fills the mask); unfolds folded ones.

    All values are validated before any mask changes. Setting all ones keeps the
    mask (use :func:`fold_masks` to fold). Every TP rank passes the same values.
    """
    full = {name: _full_value(model, name, value) for name, value in masks.items()}
    specs = mask_specs(model.config)
    device = next(model.parameters()).device
    for name, value in full.items():
        if not _holds(model, name):
            continue  # another pipeline stage's layer
        owner, key = model.mask_owner(name)
        local = shard_tensor(value, dim=specs[name].split_dim, groups=model.groups)
        owner.put(key, local.to(device))


def set_mask(model: GPTModel, name: str, value: MaskValue) -> None:
    """Set one mask (see :func:`set_masks`)."""
    set_masks(model, {name: value})


def fold_masks(model: GPTModel, names: list[str] | None = None) -> list[str]:
    """Fold every mask (of ``names``, default all unfolded) whose entries are all 1 on
    every TP rank, so those layers run their plain path. Returns the folded names.
    Collective over TP."""
    local = _local_masks(model)
    for name in names or []:
        _spec(model, name)
    candidates = list(local) if names is None else [n for n in local if n in names]
    ones = torch.tensor([bool((local[n] == 1).all()) for n in candidates], dtype=torch.int32)
    if model.groups.tp_size > 1 and candidates:
        # A shard can be all ones on one rank only; fold only what is all ones everywhere.
        dist.all_reduce(ones, op=dist.ReduceOp.MIN, group=model.groups.tp_group)
    folded = [n for n, is_ones in zip(candidates, ones.tolist()) if is_ones]
    for name in folded:
        owner, key = model.mask_owner(name)
        owner.fold(key)
    return folded


class MaskRamp:
    """Linear ramp of some masks from their start values to 1 over ``ramp_steps``
    optimizer steps. Call :meth:`step` once per optimizer step (not per
    micro-batch); on the last step the ramped masks become 1 and are folded."""

    def __init__(self, start: Mapping[str, torch.Tensor], *, ramp_steps: int) -> None:
        if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
            raise ConfigError(f"ramp_steps must be a positive integer, got {ramp_steps!r}")
        self.ramp_steps = ramp_steps
        self.steps_done = 0
        self.start: dict[str, torch.Tensor] = {}
        for name, value in start.items():
            value = value.detach().to(device="cpu", dtype=torch.float32).clone()
            if not bool(((value >= 0) & (value <= 1)).all()):
                raise ConfigError(f"ramp start values of {name} must lie in [0, 1]")
            self.start[name] = value

    @classmethod
    def from_model(
        cls, model: GPTModel, *, ramp_steps: int, names: list[str] | None = None
    ) -> MaskRamp:
        """Ramp the model's unfolded masks (or ``names`` of them) from their current values."""
        current = get_masks(model)
        chosen = list(current) if names is None else names
        folded = [n for n in chosen if n not in current]
        if folded:
            raise ConfigError(f"cannot ramp folded (absent) masks: {folded}")
        return cls({n: current[n] for n in chosen}, ramp_steps=ramp_steps)

    @property
    def done(self) -> bool:
        return self.steps_done >= self.ramp_steps

    def values(self) -> dict[str, torch.Tensor]:
        """Current full mask values after ``steps_done`` steps."""
        if self.done:
            return {n: torch.ones_like(v) for n, v in self.start.items()}
        frac = self.steps_done / self.ramp_steps
        return {n: v + (1.0 - v) * frac for n, v in self.start.items()}

    def step(self, model: GPTModel) -> None:
        """Advance one optimizer step and write the new values into ``model``."""
        if self.done:
            return
        self.steps_done += 1
        self.apply(model)

    def apply(self, model: GPTModel) -> None:
        """Write the current values into ``model`` (e.g. after a resume); fold when done."""
        if self.done:
            for name in self.start:
                if not _holds(model, name):
                    continue
                owner, key = model.mask_owner(name)
                owner.fold(key)
            return
        set_masks(model, self.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "ramp_steps": self.ramp_steps,
            "steps_done": self.steps_done,
            "start": {n: v.clone() for n, v in self.start.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"ramp_steps", "steps_done", "start"}
        if set(state) != expected:
            raise ConfigError(f"MaskRamp state keys {sorted(state)} != {sorted(expected)}")
        restored = MaskRamp(state["start"], ramp_steps=int(state["ramp_steps"]))
        steps_done = int(state["steps_done"])
        if not 0 <= steps_done <= restored.ramp_steps:
            raise ConfigError(
                f"steps_done ({steps_done}) outside [0, ramp_steps={restored.ramp_steps}]"
            )
        self.ramp_steps, self.start, self.steps_done = (
            restored.ramp_steps,
            restored.start,
            steps_done,
        )

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> MaskRamp:
        ramp = cls({}, ramp_steps=1)
        ramp.load_state_dict(state)
        return ramp
