"""Our GPT as a DeepSpeed ``PipelineModule``: embedding, blocks, final norm + head.

The layer list is ``[embedding, block 0 .. block L-1, head]`` and DeepSpeed
registers each piece under its *global* index in that list, so native
checkpoints (one file per layer) and canonical names do not depend on the
partition: ``"{i+1}.block.X"`` is ``layers.{i}.X`` on whichever stage holds it.
Blocks are split evenly over the stages (the first stage also holds the
embedding, the last the head).

Tied embeddings (Megatron's way): the last stage keeps its own copy of this
TP rank's word-embedding shard (``tied_word``), initialised from the same
canonical tensor; the two copies' gradients are summed over an embedding group
(first and last stage with the same data/tensor coordinates) before the
optimizer step, so both copies and their Adam state stay bitwise equal. The
copy is marked ``ds_pipe_replicated`` so gradient norms count it once.

Masks: every stage holds the hidden mask (a copy of the same values); the
per-layer masks live in their blocks. ``mask_owner``/``holds_mask``/
``merge_stages`` let growth/masks.py address them by canonical name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.pipe import PipelineModule
from torch import nn

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model.attention import Rope, RopeCache
from megatron_msg.model.block import Block
from megatron_msg.model.canonical import canonical_specs
from megatron_msg.model.gpt import Embedding, GPTModel
from megatron_msg.model.maskset import MaskSet, apply_mask
from megatron_msg.model.norms import Norm
from megatron_msg.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.layers import ColumnParallelLinear
from megatron_msg.parallel.mappings import copy_to_tp
from megatron_msg.parallel.random import ParallelRNG


def stage_bounds(num_layers: int, pp: int) -> list[int]:
    """DeepSpeed ``parts`` over ``[embedding, blocks..., head]``: blocks split evenly
    (the first ``num_layers % pp`` stages get one more)."""
    if num_layers < pp:
        raise ConfigError(f"num_layers ({num_layers}) must be >= pipeline parallel size ({pp})")
    base, extra = divmod(num_layers, pp)
    parts = [0]
    blocks = 0
    for stage in range(pp):
        blocks += base + (1 if stage < extra else 0)
        parts.append(blocks + 1)  # +1: the embedding is item 0
    parts[-1] = num_layers + 2  # the head goes with the last stage
    return parts


def owner_stage(name: str, *, num_layers: int, pp: int) -> int:
    """The pipeline stage holding canonical tensor ``name`` (``masks.hidden``: stage 0)."""
    parts = stage_bounds(num_layers, pp)
    if name.startswith("layers."):
        index = int(name.split(".")[1]) + 1
    elif name.startswith(("embed.", "masks.")):
        index = 0
    else:
        index = num_layers + 1
    return next(s for s in range(pp) if parts[s] <= index < parts[s + 1])


class _StageContext:
    """What every piece of a stage shares: hidden mask, RoPE tables, dropout streams.

    A plain object (not a module), so the shared state is registered once."""

    def __init__(self, config: ModelConfig, groups: ProcessGroups, masks: MaskSet) -> None:
        self.config, self.groups, self.masks = config, groups, masks
        self.rng: ParallelRNG | None = None
        self._rope = RopeCache(config)

    def hidden_mask(self) -> torch.Tensor | None:
        return self.masks.get("hidden")

    def rope(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> Rope | None:
        return self._rope.get(seq_len, device, dtype)


class EmbeddingPipe(nn.Module):
    def __init__(self, embed: Embedding, ctx: _StageContext) -> None:
        super().__init__()
        self.embed, self.ctx = embed, ctx

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.ctx.config.max_seq_len:
            raise ValueError(
                f"tokens must be [batch, seq <= {self.ctx.config.max_seq_len}], "
                f"got shape {tuple(tokens.shape)}"
            )
        x = apply_mask(self.embed(tokens), self.ctx.hidden_mask())
        dropout = self.ctx.config.dropout
        if self.training and dropout > 0.0 and self.ctx.rng is not None:
            x = self.ctx.rng.dropout(x, dropout, stream="default", training=True)
        return x


class BlockPipe(nn.Module):
    def __init__(self, block: Block, ctx: _StageContext) -> None:
        super().__init__()
        self.block, self.ctx = block, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = self.ctx.rope(x.shape[1], x.device, x.dtype)
        return self.block(x, hidden_mask=self.ctx.hidden_mask(), rope=rope, rng=self.ctx.rng)


class HeadPipe(nn.Module):
    """Final norm and output projection (own ``lm_head``, or the tied word-embedding copy)."""

    def __init__(
        self,
        final_norm: Norm,
        lm_head: ColumnParallelLinear | None,
        tied_word: torch.Tensor | None,
        ctx: _StageContext,
    ) -> None:
        super().__init__()
        self.final_norm, self.lm_head, self.ctx = final_norm, lm_head, ctx
        self.tied_word: nn.Parameter | None = None
        if tied_word is not None:
            self.tied_word = nn.Parameter(tied_word.detach().clone())
            self.tied_word.tensor_model_parallel = True  # type: ignore[attr-defined]
            self.tied_word.partition_dim = 0  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_norm(x, self.ctx.hidden_mask())
        if self.lm_head is not None:
            return self.lm_head(x)
        assert self.tied_word is not None
        return F.linear(copy_to_tp(x, self.ctx.groups), self.tied_word)


class GPTPipe(PipelineModule):
    """See the module docstring. Built from a :class:`GPTModel` (its modules are reused)."""

    _layer_specs: list[Any]  # DeepSpeed's, typed here for mypy

    def __init__(self, model: GPTModel, *, groups: ProcessGroups) -> None:
        config = model.config
        if groups.pp_size < 2:
            raise ConfigError(f"GPTPipe needs pipeline parallel size >= 2, got {groups.pp_size}")
        ctx = _StageContext(config, groups, model.masks)
        ctx.rng = model.rng
        tied = model.embed.word.weight if config.tie_embeddings else None
        layers: list[nn.Module] = [EmbeddingPipe(model.embed, ctx)]
        layers += [BlockPipe(block, ctx) for block in model.layers if isinstance(block, Block)]
        layers.append(HeadPipe(model.final_norm, model.lm_head, tied, ctx))
        self._parts = stage_bounds(config.num_layers, groups.pp_size)
        super().__init__(
            layers=layers,
            topology=groups.deepspeed_topology(),
            loss_fn=self._loss,
            partition_method="explicit",
        )
        self.config, self.groups, self.ctx = config, groups, ctx
        # DeepSpeed only reads the layer list while building; drop other stages' modules.
        specs: list[Any] = list(self._layer_specs)
        start, stop = self._local_start, self._local_stop
        self._layer_specs = [s if start <= i < stop else None for i, s in enumerate(specs)]
        self.masks = model.masks
        self.recorded_losses: list[torch.Tensor] = []
        self.loss_scale = 1.0  # 0.0 for the no-op step that creates Adam's state
        self._embedding_group = _embedding_groups(groups)
        head = self._head()
        if head is not None and head.tied_word is not None:
            head.tied_word.ds_pipe_replicated = True  # type: ignore[attr-defined]

    def _partition_layers(self, method: str = "explicit") -> None:
        # DeepSpeed's balanced partitions do not guarantee where zero-weight items
        # (embedding, head) go; ours are fixed by stage_bounds.
        self.parts = list(self._parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    @property
    def rng(self) -> ParallelRNG | None:
        return self.ctx.rng

    @rng.setter
    def rng(self, value: ParallelRNG | None) -> None:
        self.ctx.rng = value

    # ---- loss -----------------------------------------------------------------

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = vocab_parallel_cross_entropy(logits, labels, self.groups).mean()
        if not bool(torch.isfinite(loss)):
            loss = loss * float("nan")  # every rank then skips the same step
        self.recorded_losses.append(loss.detach().float())
        return loss * self.loss_scale

    # ---- tied embedding -------------------------------------------------------

    def _head(self) -> HeadPipe | None:
        module = self._modules.get(str(self.config.num_layers + 1))
        return module if isinstance(module, HeadPipe) else None

    def _tied_word(self) -> torch.Tensor | None:
        if not self.config.tie_embeddings:
            return None
        if self.groups.is_first_stage:
            embed = self._modules["0"]
            assert isinstance(embed, EmbeddingPipe)
            return embed.embed.word.weight
        head = self._head()
        return head.tied_word if head is not None else None

    def get_tied_weights_and_groups(self) -> list[tuple[torch.Tensor, Any]]:
        pairs = list(super().get_tied_weights_and_groups())
        weight = self._tied_word()
        if weight is not None and self._embedding_group is not None:
            pairs.append((weight, self._embedding_group))
        return pairs

    def allreduce_tied_weight_gradients(self) -> None:
        for weight, group in self.get_tied_weights_and_groups():
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=group)

    # ---- canonical names ------------------------------------------------------

    def canonical_name(self, local: str) -> str | None:
        """Canonical name of a local parameter/buffer name (None: the tied copy)."""
        index, _, rest = local.partition(".")
        i = int(index)
        if i == 0:
            return rest
        if i <= self.config.num_layers:
            return f"layers.{i - 1}.{rest.removeprefix('block.')}"
        return None if rest == "tied_word" else rest

    def canonical_parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for name, param in self.named_parameters():
            canonical = self.canonical_name(name)
            if canonical is not None:
                out[canonical] = param
        return out

    def tied_copy(self) -> nn.Parameter | None:
        """The last stage's copy of the word embedding (None elsewhere or untied)."""
        head = self._head()
        return head.tied_word if head is not None else None

    def owner(self, name: str) -> int:
        return owner_stage(name, num_layers=self.config.num_layers, pp=self.groups.pp_size)

    def holds_mask(self, name: str) -> bool:
        return name == "masks.hidden" or self.owner(name) == self.groups.pp_rank

    def mask_owner(self, name: str) -> tuple[MaskSet, str]:
        if name == "masks.hidden":
            return self.masks, "hidden"
        prefix, _, key = name.rpartition(".")
        parts = prefix.split(".")
        if len(parts) == 3 and parts[0] == "layers" and self.holds_mask(name):
            block = self._modules[str(int(parts[1]) + 1)]
            assert isinstance(block, BlockPipe)
            if key in block.block.masks.names:
                return block.block.masks, key
        raise ValueError(f"{name!r} is not a mask held by pipeline stage {self.groups.pp_rank}")

    def merge_stages(self, local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full canonical tensors of every stage from this stage's ones; collective over PP.

        Each stage contributes the names it owns (:func:`owner_stage`); which of
        them are present (unfolded masks) travels first, then one flat fp32 buffer.
        """
        return merge_over_stages(local, self.config, groups=self.groups)


def merge_over_stages(
    local: Mapping[str, torch.Tensor], config: ModelConfig, *, groups: ProcessGroups
) -> dict[str, torch.Tensor]:
    """See :meth:`GPTPipe.merge_stages`."""
    specs = canonical_specs(config)
    device = next(iter(local.values())).device if local else torch.device("cpu")
    if dist.get_backend(groups.pp_group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    merged: dict[str, torch.Tensor] = {}
    for stage in range(groups.pp_size):
        names = [
            n
            for n in specs
            if owner_stage(n, num_layers=config.num_layers, pp=groups.pp_size) == stage
        ]
        mine = stage == groups.pp_rank
        flags = torch.tensor([mine and n in local for n in names], dtype=torch.int32, device=device)
        src = groups.pp_ranks[stage]
        dist.broadcast(flags, src=src, group=groups.pp_group)
        present = [n for n, f in zip(names, flags.tolist()) if f]
        sizes = [int(torch.Size(specs[n].shape).numel()) for n in present]
        if not present:
            continue
        if mine:
            flat = torch.cat([local[n].reshape(-1).to(device, torch.float32) for n in present])
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        dist.broadcast(flat, src=src, group=groups.pp_group)
        for name, piece in zip(present, flat.split(sizes)):
            merged[name] = piece.reshape(specs[name].shape).cpu().clone()
    order = {n: i for i, n in enumerate(specs)}
    return dict(sorted(merged.items(), key=lambda item: order[item[0]]))


def _embedding_groups(groups: ProcessGroups) -> Any:
    """Groups of (first stage, last stage) ranks with equal data/tensor coordinates;
    collective (every rank creates every group). Returns this rank's or None."""
    from megatron_msg.parallel.groups import grid_rank

    tp, dp, pp = groups.tp_size, groups.dp_size, groups.pp_size
    mine = None
    for d in range(dp):
        for t in range(tp):
            ranks = [grid_rank(tp_rank=t, pp_rank=p, dp_rank=d, tp=tp, dp=dp) for p in (0, pp - 1)]
            group = dist.new_group(ranks=ranks)
            if groups.rank in ranks:
                mine = group
    return mine
