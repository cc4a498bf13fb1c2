"""One model-parallel rank of a training checkpoint: its fp32 masters, Adam state and masks.

Where each lives (see :mod:`deepspeed_io` for why these records are trusted):

- ZeRO 1/2 (fp32 or bf16): each DP rank's ``*_optim_states.pt`` holds one flat
  fp32 partition per parameter group and the matching flat Adam moments;
  DeepSpeed's ``param_slice_mappings`` says which elements of a partition
  belong to which parameter, ``param_shapes`` (model-states file) its shape.
- ZeRO 0 (fp32 only): the model-states file holds the module, whose fp32
  parameters are the masters, and torch AdamW's ``state_dict()``, whose
  parameter ids follow the trainer's ``build_optimizer`` grouping.
- Masks are fp32 buffers: in the model-states file's module (pp == 1) or in
  the pipeline layer files (pp > 1, where DeepSpeed saves the module per layer).

Names are local (as the rank's module names them); shapes are TP-local.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from megatron_msg.checkpoint.deepspeed_files import (
    DeepSpeedCheckpointError,
    NativeLayout,
    safe_load,
)
from megatron_msg.config import ModelConfig
from megatron_msg.training.config import TrainConfig

__all__ = ["RankState", "open_rank"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


class RankState:
    """Fp32 masters, moments, Adam steps and masks of one model-parallel rank (local shards)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.masks: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.steps: dict[str, int] = {}

    def get(self, name: str, kind: str) -> torch.Tensor:
        raise NotImplementedError


class _Stage0Rank(RankState):
    """ZeRO-0: module parameters are the masters; moments in AdamW's state_dict."""

    def __init__(self, path: Path, states: dict[str, Any], order: list[list[str]]) -> None:
        super().__init__(path)
        self.masks = _module_masks(path, states)
        module = states["module"]
        params = [n for n in module if n not in self.masks]
        self._weights = {n: module[n] for n in params}
        low = {n: t.dtype for n, t in self._weights.items() if t.dtype != torch.float32}
        if low:
            raise DeepSpeedCheckpointError(
                f"{path}: ZeRO-0 parameters in {sorted(set(low.values()))} (e.g. {next(iter(low))}) "
                "carry no fp32 masters"
            )
        self.shapes = {n: tuple(t.shape) for n, t in self._weights.items()}
        self._state: dict[str, dict[str, Any]] = {}
        optimizer = states.get("optimizer")
        if not isinstance(optimizer, dict) or "param_groups" not in optimizer:
            raise DeepSpeedCheckpointError(
                f"{path}: no optimizer state_dict (ZeRO-0 keeps it here)"
            )
        ids = [list(g["params"]) for g in optimizer["param_groups"]]
        if [len(g) for g in ids] != [len(g) for g in order] or set(params) != {
            n for g in order for n in g
        }:
            raise DeepSpeedCheckpointError(
                f"{path}: optimizer groups of sizes {[len(g) for g in ids]} do not match the "
                f"model's parameters grouped as the trainer does ({[len(g) for g in order]})"
            )
        state = optimizer.get("state", {})
        for group_ids, group_names in zip(ids, order):
            for pid, name in zip(group_ids, group_names):
                self._state[name] = state.get(pid, {})
                self.steps[name] = int(self._state[name].get("step", 0))
                for key in _MOMENTS:
                    value = self._state[name].get(key)
                    if value is not None and tuple(value.shape) != self.shapes[name]:
                        raise DeepSpeedCheckpointError(
                            f"{path}: {key} of {name} has shape {tuple(value.shape)}, "
                            f"the parameter {self.shapes[name]}"
                        )

    def get(self, name: str, kind: str) -> torch.Tensor:
        if kind == "weights":
            return self._weights[name].to(torch.float32).clone()
        value = self._state[name].get(kind)
        if value is None:  # no step taken yet: Adam's moments are zero
            return torch.zeros(self.shapes[name], dtype=torch.float32)
        return value.to(torch.float32).clone()


class _ZeroRank(RankState):
    """ZeRO 1/2: the parameter's fragments in each DP rank's flat fp32 partitions."""

    def __init__(self, path: Path, states: dict[str, Any], optim_paths: list[Path]) -> None:
        super().__init__(path)
        groups = states.get("param_shapes")
        if not isinstance(groups, list):
            raise DeepSpeedCheckpointError(f"{path}: no param_shapes (not a ZeRO checkpoint?)")
        self._group_of = {n: g for g, shapes in enumerate(groups) for n in shapes}
        self.shapes = {n: tuple(int(d) for d in s) for shapes in groups for n, s in shapes.items()}
        # name -> [(dp rank, start, numel)]; flats[dp][kind][group] are memory-mapped.
        self._fragments: dict[str, list[tuple[int, int, int]]] = {n: [] for n in self.shapes}
        self._flats: list[dict[str, list[torch.Tensor]]] = []
        self._dp = len(optim_paths)
        group_steps: list[list[int]] = []
        for dp_rank, optim_path in enumerate(optim_paths):
            group_steps.append(self._add_partition(dp_rank, optim_path, len(groups)))
        for name, shape in self.shapes.items():
            have = sum(n for _, _, n in self._fragments[name])
            if have != math.prod(shape):
                files = ", ".join(p.name for p in optim_paths)
                raise DeepSpeedCheckpointError(
                    f"{path.parent}: the DP partitions ({files}) hold {have} elements of {name}, "
                    f"its shape {shape} has {math.prod(shape)}"
                )
        for g, steps in enumerate(zip(*group_steps)):
            if len(set(steps)) != 1:
                raise DeepSpeedCheckpointError(
                    f"{path.parent}: Adam steps of parameter group {g} differ across DP ranks: "
                    f"{list(steps)}"
                )
        self.steps = {n: group_steps[0][self._group_of[n]] for n in self.shapes}

    def _add_partition(self, dp_rank: int, path: Path, num_groups: int) -> list[int]:
        optim = safe_load(path).get("optimizer_state_dict")
        try:
            mappings = optim["param_slice_mappings"]
            fp32 = optim["single_partition_of_fp32_groups"]
            state = optim["base_optimizer_state"]["state"]
            groups = [state.get(g, {}) for g in range(len(fp32))]
            flats = {
                "weights": list(fp32),
                **{k: [_moment(s, k, f) for s, f in zip(groups, fp32)] for k in _MOMENTS},
            }
            steps = [int(s.get("step", 0)) for s in groups]
            counts = optim["partition_count"]
        except (KeyError, TypeError, IndexError) as err:
            raise DeepSpeedCheckpointError(
                f"{path}: not a ZeRO 1/2 optimizer state ({err!r})"
            ) from None
        counts = counts if isinstance(counts, list) else [counts]
        if len(mappings) != num_groups or len(fp32) != num_groups:
            raise DeepSpeedCheckpointError(
                f"{path}: {len(fp32)} parameter groups, the model states file has {num_groups}"
            )
        dp = self._dp
        if any(int(c) != dp for c in counts):
            raise DeepSpeedCheckpointError(
                f"{path}: partitioned over {counts} DP ranks, the run's metadata says {dp}"
            )
        for g, mapping in enumerate(mappings):
            sizes = {k: (v[g].numel(), v[g].dtype) for k, v in flats.items()}
            for name, address in mapping.items():
                self._add_fragment(path, dp_rank, g, name, address, sizes)
        self._flats.append(flats)
        return steps

    def _add_fragment(
        self, path: Path, dp_rank: int, group: int, name: str, address: Any, sizes: dict[str, Any]
    ) -> None:
        if self._group_of.get(name) != group:
            raise DeepSpeedCheckpointError(
                f"{path}: {name} in parameter group {group}, which param_shapes of "
                f"{self.path.name} does not list there"
            )
        start, numel = int(address.start), int(address.numel)
        bad = {k: s for k, s in sizes.items() if s[1] != torch.float32 or start + numel > s[0]}
        if start < 0 or numel < 0 or bad:
            raise DeepSpeedCheckpointError(
                f"{path}: fragment [{start}, {start + numel}) of {name} does not fit the fp32 "
                f"partitions of group {group} ({bad})"
            )
        self._fragments[name].append((dp_rank, start, numel))

    def get(self, name: str, kind: str) -> torch.Tensor:
        group = self._group_of[name]
        pieces = [self._flats[d][kind][group].narrow(0, s, n) for d, s, n in self._fragments[name]]
        return torch.cat(pieces).view(self.shapes[name])  # cat copies out of the mapping


def _moment(state: dict[str, Any], key: str, fp32: torch.Tensor) -> torch.Tensor:
    # Saved before the group's first step: Adam's moments are zero.
    value = state.get(key)
    return torch.zeros_like(fp32) if value is None else value


def _optimizer_order(model: ModelConfig, config: TrainConfig) -> list[list[str]]:
    """Parameter names per AdamW group, exactly as the trainer's build_optimizer groups them."""
    from megatron_msg.model import GPTModel
    from megatron_msg.parallel.groups import ProcessGroups
    from megatron_msg.training.engine import build_optimizer

    shell = GPTModel(model, groups=ProcessGroups.single(), device="meta", init_seed=None)
    names = {id(p): n for n, p in shell.named_parameters()}
    optimizer = build_optimizer(shell, config)
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _module_masks(path: Path, states: dict[str, Any]) -> dict[str, torch.Tensor]:
    module = states.get("module")
    if not isinstance(module, dict):
        raise DeepSpeedCheckpointError(f"{path}: no module state_dict in it")
    buffers = set(states.get("buffer_names") or [])
    # DeepSpeed casts only parameters to bf16; masks stay fp32 buffers.
    return {n: t.to(torch.float32) for n, t in module.items() if n in buffers}


def _pipeline_masks(
    layout: NativeLayout, tp_rank: int, params: set[str]
) -> dict[str, torch.Tensor]:
    """Buffers (masks) in the layer files of the items whose parameters this rank holds."""
    items = sorted({int(n.partition(".")[0]) for n in params if n.partition(".")[0].isdigit()})
    masks = {}
    for item in items:
        path = layout.layer_file(item, tp_rank=tp_rank)
        state = safe_load(path)
        if not isinstance(state, dict):
            raise DeepSpeedCheckpointError(f"{path}: not a layer state_dict")
        for key, value in state.items():
            name = f"{item}.{key}"
            if name not in params:
                masks[name] = value.to(torch.float32).clone()  # a copy: the file is released
    return masks


def open_rank(
    layout: NativeLayout, *, pp_rank: int, tp_rank: int, model: ModelConfig, config: TrainConfig
) -> RankState:
    """Open (and check) the files of model-parallel rank (``pp_rank``, ``tp_rank``)."""
    mp = layout.mp_rank(pp_rank=pp_rank, tp_rank=tp_rank)
    path = layout.model_file(mp)
    states = safe_load(path)
    if not isinstance(states, dict):
        raise DeepSpeedCheckpointError(f"{path}: not a DeepSpeed model states file")
    layout.check_model_states(path, states)
    if layout.zero_stage == 0:
        return _Stage0Rank(path, states, _optimizer_order(model, config))
    optim = [layout.optim_file(dp_rank=d, mp_rank=mp) for d in range(layout.dp)]
    rank = _ZeroRank(path, states, optim)
    if layout.pp > 1:
        rank.masks = _pipeline_masks(layout, tp_rank, set(rank.shapes))
    else:
        rank.masks = _module_masks(path, states)
    return rank
