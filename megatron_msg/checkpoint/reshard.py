"""Topology arithmetic in canonical space: merge TP slices, find each tensor's pipeline stage.

Both work on names and shapes of the canonical table (``megatron_msg.model.canonical``):
a TP rank holds the ``tp_rank``-th contiguous chunk of a tensor along its
``split_dim`` (None = replicated, every rank holds all of it), and a pipeline
stage holds some of the decoder layers plus, on the first stage, the embeddings
and, on the last, the final norm and the output head.

Pipeline stages name their tensors by canonical *global* layer index
(``layers.{i}``, i counting over the whole model); a stage whose modules count
layers locally supplies a :data:`StageNaming` that maps its names to global ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model.canonical import TensorSpec, canonical_specs, parameter_specs

__all__ = [
    "StageNaming",
    "TopologyError",
    "layer_offset_naming",
    "locate_stages",
    "merge_tp",
    "pipeline_module_naming",
]

# (pp_rank, name as the stage's checkpoint spells it) -> canonical name
StageNaming = Callable[[int, str], str]


class TopologyError(ConfigError):
    """Sharded tensors do not fit together into the canonical table (names the tensors)."""


def merge_tp(name: str, slices: Sequence[torch.Tensor], spec: TensorSpec) -> torch.Tensor:
    """The full canonical tensor from its TP slices, in TP rank order.

    A replicated tensor is taken from TP rank 0 (what the live engine's gather
    returns too); its copies on the other ranks only have to have the same shape.
    """
    tp = len(slices)
    want = spec.local_shape(tp)
    wrong = [(r, tuple(s.shape)) for r, s in enumerate(slices) if tuple(s.shape) != want]
    if tp == 0 or wrong:
        raise TopologyError(
            f"{name}: TP slices of shape {wrong or 'none'} (rank, shape), expected {want} on each "
            f"of {tp} ranks for the canonical shape {spec.shape}"
        )
    if spec.split_dim is None or tp == 1:
        return slices[0]
    return torch.cat(list(slices), dim=spec.split_dim)


def layer_offset_naming(first_layers: Sequence[int]) -> StageNaming:
    """Naming for stages that count layers locally: stage s's ``layers.{j}`` is
    global layer ``first_layers[s] + j``; other names are already canonical."""

    def rename(pp_rank: int, name: str) -> str:
        if not name.startswith("layers."):
            return name
        index, _, rest = name[len("layers.") :].partition(".")
        if not index.isdigit():
            raise TopologyError(f"stage {pp_rank}: cannot read the layer index of {name!r}")
        return f"layers.{first_layers[pp_rank] + int(index)}.{rest}"

    return rename


def pipeline_module_naming(num_layers: int) -> StageNaming:
    """Naming of our DeepSpeed ``PipelineModule`` (``model/pipeline.py``): item ``i`` of
    ``[embedding, block 0 .. block L-1, head]`` registers its tensors as ``"{i}.X"``:
    ``0.embed.*``, ``{j+1}.block.X`` = ``layers.{j}.X``, ``{L+1}.final_norm.*`` /
    ``lm_head.*``, and ``{L+1}.tied_word``, the last stage's copy of the tied
    ``embed.word.weight``. Names without an index (``masks.hidden``) are canonical."""

    def rename(pp_rank: int, name: str) -> str:
        index, _, rest = name.partition(".")
        if not index.isdigit():
            return name
        item = int(index)
        if item == 0:
            return rest
        if item <= num_layers:
            if not rest.startswith("block."):
                raise TopologyError(f"stage {pp_rank}: {name!r} is not a block tensor")
            return f"layers.{item - 1}.{rest[len('block.') :]}"
        if item == num_layers + 1:
            return "embed.word.weight" if rest == "tied_word" else rest
        raise TopologyError(
            f"stage {pp_rank}: {name!r} names pipeline item {item}, the model has "
            f"{num_layers + 2} (embedding, {num_layers} blocks, head)"
        )

    return rename


def locate_stages(
    stage_names: Sequence[Iterable[str]],
    config: ModelConfig,
    *,
    naming: StageNaming | None = None,
) -> dict[str, list[tuple[int, str]]]:
    """For every canonical tensor present, the stages that hold it and their local name.

    ``stage_names[s]`` are the tensor names stage ``s`` holds (parameters and
    masks). Every parameter of ``config`` must be on at least one stage; a
    decoder layer must be whole on one stage; only tensors outside the layers
    (tied embeddings, ``masks.hidden``) may be on several stages. Raises
    :class:`TopologyError` naming what is missing, unknown or split.
    """
    specs = canonical_specs(config)
    found: dict[str, list[tuple[int, str]]] = {}
    unknown: list[str] = []
    for stage, names in enumerate(stage_names):
        for local in names:
            name = naming(stage, local) if naming is not None else local
            if name not in specs:
                unknown.append(
                    f"stage {stage}: {local!r}" + (f" (= {name})" if name != local else "")
                )
                continue
            found.setdefault(name, []).append((stage, local))
    missing = [n for n in parameter_specs(config) if n not in found]
    problems = []
    if unknown:
        problems.append(f"not in the canonical table: {_some(unknown)}")
    if missing:
        problems.append(f"on no stage: {_some(missing)}")
    problems += _split_layers(found)
    if problems:
        raise TopologyError(
            f"pipeline stages do not form the model (layers={config.num_layers}, "
            f"stages={len(stage_names)}): " + "; ".join(problems)
        )
    order = {n: i for i, n in enumerate(specs)}
    return {n: found[n] for n in sorted(found, key=order.__getitem__)}


def _split_layers(found: Mapping[str, list[tuple[int, str]]]) -> list[str]:
    stages_of_layer: dict[str, set[int]] = {}
    for name, where in found.items():
        if name.startswith("layers."):
            layer = name.split(".")[1]
            stages_of_layer.setdefault(layer, set()).update(s for s, _ in where)
    split = [f"layers.{i} on stages {sorted(s)}" for i, s in stages_of_layer.items() if len(s) > 1]
    return [f"layers not on exactly one stage: {_some(split)}"] if split else []


def _some(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
