"""Read a ``megatron-msg train`` checkpoint (DeepSpeed's native files) as canonical tensors.

For every parameter we need its fp32 master, Adam ``exp_avg`` / ``exp_avg_sq``
and step, whatever the topology the run used; :mod:`deepspeed_ranks` takes
them out of one model-parallel rank's files (ZeRO 1/2: the flat fp32
partitions of every DP rank, located by DeepSpeed's own
``param_slice_mappings``, the table its ``ds_to_universal`` uses, so alignment
padding and the round-robin order stay DeepSpeed's business; ZeRO 0: the
module and AdamW's state_dict). Here the ranks' slices are merged by the
canonical TP split rules and the pipeline stages collected by layer
(:mod:`reshard`); the result is streamed into a canonical store.

Why not DeepSpeed's converters directly: ``zero_to_fp32`` returns weights only
(no moments), reads only ``mp_rank_00`` (no TP) and concatenates every DP
partition in memory; ``ds_to_universal`` does moments but requires Megatron's
``universal_checkpoint_info``, writes one ``torch.save`` file per fragment and
state, and has no ZeRO-0 path; and all of them unpickle with
``weights_only=False``, which we never do (see :mod:`deepspeed_files`).

Pipeline stages (pp > 1) are DeepSpeed ``PipelineModule`` checkpoints of our
``GPTPipe``: parameters named by pipeline item (``reshard.pipeline_module_naming``),
masks in the per-layer files, the last stage's copy of a tied word embedding
checked bitwise against the first stage's. ``masks.hidden`` is in no layer
file, so while a ramp runs it is recomputed from the saved ramp state (as a
resumed run does).

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
)
from megatron_msg.checkpoint.deepspeed_ranks import RankState, open_rank
from megatron_msg.checkpoint.reshard import (
    StageNaming,
    locate_stages,
    merge_tp,
    pipeline_module_naming,
)
from megatron_msg.checkpoint.run_meta import canonical_meta
from megatron_msg.checkpoint.safetensors_files import refuse_existing
from megatron_msg.config import ConfigError
from megatron_msg.model.canonical import canonical_specs

__all__ = ["KINDS", "ConvertReport", "NativeCheckpoint", "RankState", "convert_to_canonical"]

KINDS = ("weights", "exp_avg", "exp_avg_sq")


class NativeCheckpoint:
    """One training checkpoint (a tag folder), checked on open, read tensor by tensor.

    Opening checks, before any tensor is read: our metadata parses; every file
    the recorded topology needs is there and no other; DeepSpeed's own records
    (world sizes, ZeRO stage, partition counts, dtype) agree with it; every
    file unpickles safely; the ZeRO fragments of every parameter add up to its
    shape; the stages and TP slices form the canonical table of the run's
    current model. Anything else raises :class:`DeepSpeedCheckpointError`
    naming the file (and the tensors, for a layout problem).

    ``naming`` maps a rank's tensor names to canonical ones (default: identity
    for pp == 1, :func:`pipeline_module_naming` for pipeline stages).
    """

    def __init__(self, folder: Path, *, naming: StageNaming | None = None) -> None:
        self.folder = folder
        self.run, self.train_config = read_run_state(folder)
        self.model = self.train_config.stage_models()[self.run.stage]
        self.layout = NativeLayout.of(folder, self.train_config, stage=self.run.stage)
        if naming is None and self.layout.pp > 1:
            naming = pipeline_module_naming(self.model.num_layers)
        self.naming = naming
        self.layout.check_files()
        self.ranks = {
            (pp, tp): open_rank(
                self.layout, pp_rank=pp, tp_rank=tp, model=self.model, config=self.train_config
            )
            for pp in range(self.layout.pp)
            for tp in range(self.layout.tp)
        }
        self.where = self._locate()
        self.adam_step = self._adam_steps()
        self.ramp_masks = self._ramp_masks()

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

    def _ramp_masks(self) -> dict[str, torch.Tensor]:
        """Masks a running ramp defines but no file holds (``masks.hidden`` under pp > 1)."""
        if self.run.ramp is None:
            return {}
        from megatron_msg.growth.masks import MaskRamp

        ramp = MaskRamp.from_state_dict(self.run.ramp)
        if ramp.done:
            return {}  # folded
        specs = canonical_specs(self.model)
        values = {n: v for n, v in ramp.values().items() if n not in self.where}
        wrong = [n for n, v in values.items() if n not in specs or tuple(v.shape) != specs[n].shape]
        if wrong:
            raise DeepSpeedCheckpointError(
                f"{self.folder}: the saved mask ramp names masks the model does not have: {wrong}"
            )
        return values

    def names(self) -> list[str]:
        """Canonical names of every tensor :meth:`tensors` yields, in canonical order."""
        order = {n: i for i, n in enumerate(canonical_specs(self.model))}
        return sorted({*self.where, *self.ramp_masks}, key=order.__getitem__)

    def tensors(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(canonical name, kind, full fp32 tensor)``, one at a time in canonical order;
        parameters in all three kinds, unfolded masks as ``weights``."""
        specs = canonical_specs(self.model)
        for name in self.names():
            if name in self.ramp_masks:
                yield name, "weights", self.ramp_masks[name]
            elif specs[name].is_mask:
                yield name, "weights", self._merged(name, "mask")
            else:
                for kind in KINDS:
                    yield name, kind, self._merged(name, kind)

    def _merged(self, name: str, kind: str) -> torch.Tensor:
        """The full tensor from the first stage that holds it; copies on other stages
        (the tied word embedding) must be bitwise equal to it."""
        spec = canonical_specs(self.model)[name]
        copies = []
        for pp, local in self.where[name]:
            ranks = [self.ranks[pp, tp] for tp in range(self.layout.tp)]
            pieces = [r.masks[local] if kind == "mask" else r.get(local, kind) for r in ranks]
            copies.append(merge_tp(name, pieces, spec))
        for (pp, local), copy in zip(self.where[name][1:], copies[1:]):
            if not torch.equal(copy, copies[0]):
                raise DeepSpeedCheckpointError(
                    f"{self.folder}: {kind} of {name} differs between pipeline stage "
                    f"{self.where[name][0][0]} and its copy {local!r} on stage {pp}"
                )
        return copies[0]

    def nbytes(self) -> int:
        """Bytes of all tensors :meth:`tensors` yields."""
        specs = canonical_specs(self.model)
        return sum(
            4 * math.prod(specs[n].shape) * (1 if specs[n].is_mask else len(KINDS))
            for n in self.names()
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
