"""Read a ``megatron-msg train`` checkpoint (DeepSpeed's native files) as canonical tensors.

For every parameter we need its fp32 master, Adam ``exp_avg`` / ``exp_avg_sq``
and step, whatever the topology the run used:

- ZeRO 1/2 (fp32 or bf16): each DP rank's ``*_optim_states.pt`` holds one flat
  fp32 partition per parameter group (``single_partition_of_fp32_groups``) and
  the matching flat moments (``base_optimizer_state.state[g]``). Which elements
  of a partition belong to which parameter is DeepSpeed's own record,
  ``param_slice_mappings`` (name -> start, numel in that partition): the same
  table DeepSpeed's ``ds_to_universal`` uses, so alignment padding and the
  round-robin parameter order are DeepSpeed's business, not re-derived here.
  A parameter's fragments, in DP-rank order, are its flattened local shard;
  ``param_shapes`` in the model-states file gives its shape.
- ZeRO 0 (fp32 only): the model-states file holds the module (whose fp32
  parameters are the masters) and torch AdamW's ``state_dict()``, whose
  parameter ids follow the trainer's :func:`build_optimizer` grouping.

Why not DeepSpeed's converters directly: ``zero_to_fp32`` returns weights only
(no moments), reads only ``mp_rank_00`` (no TP) and concatenates every DP
partition in memory; ``ds_to_universal`` does moments but requires Megatron's
``universal_checkpoint_info``, writes one ``torch.save`` file per fragment and
state, and has no ZeRO-0 path; and all of them unpickle with
``weights_only=False``, which we never do (see :mod:`deepspeed_files`).

TP slices are then merged by the canonical split rules and pipeline stages
collected by layer name (:mod:`megatron_msg.checkpoint.reshard`).

Memory: files are memory-mapped; tensors are produced one canonical tensor
(and kind) at a time, so the converter holds about twice the largest tensor
(its TP slices and the merged copy), never the model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_msg.checkpoint.canonical import DEFAULT_SHARD_BYTES, CanonicalWriter
from megatron_msg.checkpoint.deepspeed_files import (
    DeepSpeedCheckpointError,
    NativeLayout,
    find_tag_dir,
    read_run_state,
    safe_load,
)
from megatron_msg.checkpoint.reshard import StageNaming, locate_stages, merge_tp
from megatron_msg.checkpoint.run_meta import canonical_meta
from megatron_msg.checkpoint.safetensors_files import refuse_existing
from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model.canonical import canonical_specs
from megatron_msg.training.config import TrainConfig

__all__ = ["KINDS", "ConvertReport", "NativeCheckpoint", "RankState", "convert_to_canonical"]

KINDS = ("weights", "exp_avg", "exp_avg_sq")
_MOMENTS = ("exp_avg", "exp_avg_sq")


class RankState:
    """Fp32 masters, moments, Adam steps and masks of one model-parallel rank (local shards)."""

    def __init__(self, path: Path, states: dict[str, Any]) -> None:
        self.path = path
        module = states.get("module")
        if not isinstance(module, dict):
            raise DeepSpeedCheckpointError(f"{path}: no module state_dict in it")
        buffers = set(states.get("buffer_names") or [])
        # Masks are fp32 buffers (DeepSpeed casts only parameters to bf16).
        self.masks = {n: t.to(torch.float32) for n, t in module.items() if n in buffers}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.steps: dict[str, int] = {}

    def get(self, name: str, kind: str) -> torch.Tensor:
        raise NotImplementedError


class _Stage0Rank(RankState):
    """ZeRO-0: module parameters are the masters; moments in AdamW's state_dict."""

    def __init__(self, path: Path, states: dict[str, Any], order: list[list[str]]) -> None:
        super().__init__(path, states)
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
        super().__init__(path, states)
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


class NativeCheckpoint:
    """One training checkpoint (a tag folder), checked on open, read tensor by tensor.

    Opening checks, before any tensor is read: our metadata parses; every file
    the recorded topology needs is there and no other; DeepSpeed's own records
    (world sizes, ZeRO stage, partition counts, dtype) agree with it; every
    file unpickles safely; the ZeRO fragments of every parameter add up to its
    shape; the stages and TP slices form the canonical table of the run's
    current model. Anything else raises :class:`DeepSpeedCheckpointError`
    naming the file (and the tensors, for a layout problem).

    ``naming`` maps a pipeline stage's parameter names to canonical ones when
    its modules count layers locally (default: names are canonical already).
    Pipeline-parallel training is not built yet, so PP > 1 is exercised only
    by the synthetic merge tests of :mod:`reshard`.
    """

    def __init__(self, folder: Path, *, naming: StageNaming | None = None) -> None:
        self.folder = folder
        self.naming = naming
        self.run, self.train_config = read_run_state(folder)
        self.model = self.train_config.stage_models()[self.run.stage]
        self.layout = NativeLayout.of(folder, self.train_config)
        self.layout.check_files()
        self.ranks = {
            (pp, tp): self._open_rank(pp, tp)
            for pp in range(self.layout.pp)
            for tp in range(self.layout.tp)
        }
        self.where = self._locate()
        self.adam_step = self._adam_steps()

    def _open_rank(self, pp_rank: int, tp_rank: int) -> RankState:
        layout = self.layout
        mp = layout.mp_rank(pp_rank=pp_rank, tp_rank=tp_rank)
        path = layout.model_file(mp)
        states = safe_load(path)
        if not isinstance(states, dict):
            raise DeepSpeedCheckpointError(f"{path}: not a DeepSpeed model states file")
        layout.check_model_states(path, states)
        if layout.zero_stage == 0:
            return _Stage0Rank(path, states, _optimizer_order(self.model, self.train_config))
        optim = [layout.optim_file(dp_rank=d, mp_rank=mp) for d in range(layout.dp)]
        return _ZeroRank(path, states, optim)

    def _locate(self) -> dict[str, list[tuple[int, str]]]:
        """Which stage holds each canonical tensor; TP ranks of a stage must agree on names."""
        stages = []
        for pp in range(self.layout.pp):
            names = [
                set(self.ranks[pp, tp].shapes) | set(self.ranks[pp, tp].masks)
                for tp in range(self.layout.tp)
            ]
            odd = [tp for tp, n in enumerate(names) if n != names[0]]
            if odd:
                diff = sorted(names[0] ^ names[odd[0]])[:6]
                raise DeepSpeedCheckpointError(
                    f"{self.ranks[pp, odd[0]].path}: holds other tensors than "
                    f"{self.ranks[pp, 0].path.name}, e.g. {diff}"
                )
            stages.append(sorted(names[0]))
        try:
            where = locate_stages(stages, self.model, naming=self.naming)
        except ConfigError as err:
            raise DeepSpeedCheckpointError(f"{self.folder}: {err}") from None
        specs = canonical_specs(self.model)
        for name, places in where.items():
            want = specs[name].local_shape(self.layout.tp)
            for pp, local in places:
                for tp in range(self.layout.tp):
                    rank = self.ranks[pp, tp]
                    got = rank.shapes[local] if local in rank.shapes else rank.masks[local].shape
                    if tuple(got) != want:
                        raise DeepSpeedCheckpointError(
                            f"{rank.path}: {local} has shape {got}, expected {want} "
                            f"(canonical {specs[name].shape} at tp={self.layout.tp})"
                        )
        return where

    def _adam_steps(self) -> dict[str, int]:
        steps = {}
        for name, places in self.where.items():
            pp, local = places[0]
            if local not in self.ranks[pp, 0].shapes:
                continue  # a mask
            found = {
                self.ranks[p, tp].steps[loc] for p, loc in places for tp in range(self.layout.tp)
            }
            if len(found) != 1:
                raise DeepSpeedCheckpointError(
                    f"{self.folder}: Adam steps of {name} differ across ranks: {sorted(found)}"
                )
            steps[name] = found.pop()
        return steps

    def tensors(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(canonical name, kind, full fp32 tensor)``, one at a time in canonical order;
        parameters in all three kinds, unfolded masks as ``weights``."""
        specs = canonical_specs(self.model)
        for name, places in self.where.items():
            pp, local = places[0]  # tied copies on later stages are the same tensor
            ranks = [self.ranks[pp, tp] for tp in range(self.layout.tp)]
            if specs[name].is_mask:
                yield name, "weights", merge_tp(name, [r.masks[local] for r in ranks], specs[name])
                continue
            for kind in KINDS:
                yield name, kind, merge_tp(name, [r.get(local, kind) for r in ranks], specs[name])

    def nbytes(self) -> int:
        """Bytes of all tensors :meth:`tensors` yields."""
        specs = canonical_specs(self.model)
        return sum(
            4 * math.prod(specs[n].shape) * (1 if specs[n].is_mask else len(KINDS))
            for n in self.where
        )


@dataclass(frozen=True)
class ConvertReport:
    source: Path  # the tag folder read
    target: Path
    layout: str  # the source topology, e.g. "tp=2 pp=1 dp=2 zero_stage=1 fp32"
    step: int
    stage: int
    tensors: int  # tensors written, all kinds
    nbytes: int
    seconds: float


def convert_to_canonical(
    *,
    load: str | os.PathLike[str],
    save: str | os.PathLike[str],
    tag: str | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> ConvertReport:
    """Write the training checkpoint ``load`` (run dir, checkpoint dir or tag folder; the
    latest tag unless ``tag``) as a canonical store at ``save``.

    The source is only read. Everything that can be checked is checked before
    the first byte is written; the store appears at ``save`` complete or not at all.
    """
    start = time.perf_counter()
    folder = find_tag_dir(load, tag=tag)
    target = Path(save)
    if target.resolve().is_relative_to(folder.resolve()):
        raise DeepSpeedCheckpointError(
            f"{target}: the output must not be inside the input {folder}"
        )
    refuse_existing(target, overwrite=overwrite)
    ckpt = NativeCheckpoint(folder)
    source = {
        "format": "megatron-msg train (DeepSpeed native)",
        "path": str(folder),
        "tag": folder.name,
        "layout": ckpt.layout.describe(),
    }
    meta = canonical_meta(
        run=ckpt.run, config=ckpt.train_config, adam_step=ckpt.adam_step, source=source
    )
    count = 0
    with (
        CanonicalWriter(target, shard_bytes=shard_bytes, overwrite=overwrite) as writer,
        _progress(ckpt.nbytes(), enabled=progress) as bar,
    ):
        for name, kind, tensor in ckpt.tensors():
            writer.add(name, tensor, kind=kind)
            bar.update(tensor.nbytes)
            count += 1
        writer.finalize(meta)
    return ConvertReport(
        source=folder,
        target=target,
        layout=ckpt.layout.describe(),
        step=ckpt.run.step,
        stage=ckpt.run.stage,
        tensors=count,
        nbytes=ckpt.nbytes(),
        seconds=time.perf_counter() - start,
    )


def _progress(total: int, *, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, desc="convert", disable=not enabled, leave=False
    )
