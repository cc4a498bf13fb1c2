"""Pre-LN GPT decoder with tensor parallelism and MSG masks.

The module tree mirrors the canonical names (DESIGN.md), so ``state_dict()``
keys are canonical names and values this rank's shards; unfolded masks are
persistent buffers among them. ``forward`` returns this rank's vocabulary shard
of the logits; ``loss`` uses the vocab-parallel cross entropy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_msg.config import ModelConfig
from megatron_msg.model.attention import Rope, RopeCache
from megatron_msg.model.block import Block, set_recompute
from megatron_msg.model.canonical import (
    CanonicalStateError,
    canonical_specs,
    canonical_vocab_size,
    gather_canonical,
    mask_specs,
    validate_canonical,
)
from megatron_msg.model.init import iter_canonical_init
from megatron_msg.model.maskset import MaskSet, apply_mask
from megatron_msg.model.norms import Norm
from megatron_msg.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron_msg.parallel.mappings import copy_to_tp
from megatron_msg.parallel.random import ParallelRNG, shard_tensor, zeros_init

Device = torch.device | str | None


class Embedding(nn.Module):
    """Token embedding (vocab-parallel) plus learned positions (replicated) if configured."""

    def __init__(
        self, config: ModelConfig, *, groups: ProcessGroups, dtype: torch.dtype, device: Device
    ) -> None:
        super().__init__()
        h = config.hidden_size
        self.word = VocabParallelEmbedding(
            canonical_vocab_size(config),
            h,
            groups=groups,
            init_method=zeros_init(),
            dtype=dtype,
            device=device,
        )
        self.pos: _Positions | None = None
        if config.position_embedding == "learned":
            self.pos = _Positions(config.max_seq_len, h, dtype=dtype, device=device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word(tokens)
        return x if self.pos is None else x + self.pos.weight[: tokens.shape[1]]


class _Positions(nn.Module):
    def __init__(self, seq_len: int, hidden: int, *, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(seq_len, hidden, dtype=dtype, device=device))


class GPTModel(nn.Module):
    """GPT decoder; see the module docstring. Build it with random weights from
    ``init_seed`` (TP-invariant), or with ``init_seed=None`` (zeros) when weights
    are loaded next, as :meth:`from_canonical` does."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        groups: ProcessGroups,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        init_seed: int | None = 0,
    ) -> None:
        super().__init__()
        config.validate(tp_size=groups.tp_size)
        self.config, self.groups = config, groups
        self.embed = Embedding(config, groups=groups, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            Block(config, groups=groups, dtype=dtype, device=device)
            for _ in range(config.num_layers)
        )
        self.final_norm = Norm(
            config.hidden_size,
            kind=config.norm,
            eps=config.norm_eps,
            use_bias=config.use_bias,
            dtype=dtype,
            device=device,
        )
        self.lm_head: ColumnParallelLinear | None = None
        if not config.tie_embeddings:
            self.lm_head = ColumnParallelLinear(
                config.hidden_size,
                canonical_vocab_size(config),
                bias=False,
                groups=groups,
                init_method=zeros_init(),
                dtype=dtype,
                device=device,
            )
        self.masks = MaskSet(("hidden",))
        self._rope = RopeCache(config)
        # Dropout draws from named per-rank streams (replace to restore a checkpoint's).
        self.rng: ParallelRNG | None = None
        if init_seed is not None:
            self.init_weights(seed=init_seed)

    # ---- forward -------------------------------------------------------------

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [b, s] -> this rank's logits shard [b, s, V_pad / tp]."""
        self._check_tokens(tokens)
        hidden_mask = self.masks.get("hidden")
        x = apply_mask(self.embed(tokens), hidden_mask)
        if self.training and self.config.dropout > 0.0:
            x = self._require_rng().dropout(x, self.config.dropout, stream="default", training=True)
        rope = self._rope_tables(tokens.shape[1], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, hidden_mask=hidden_mask, rope=rope, rng=self.rng)
        x = self.final_norm(x, hidden_mask)
        if self.lm_head is not None:
            return self.lm_head(x)
        return F.linear(copy_to_tp(x, self.groups), self.embed.word.weight)

    def loss(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        *,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean cross entropy over tokens (weighted by ``loss_mask`` [b, s] if given)."""
        if labels.shape != tokens.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != tokens shape {tuple(tokens.shape)}"
            )
        per_token = vocab_parallel_cross_entropy(self(tokens), labels, self.groups)
        if loss_mask is None:
            return per_token.mean()
        if loss_mask.shape != tokens.shape:
            raise ValueError(
                f"loss_mask shape {tuple(loss_mask.shape)} != tokens shape {tuple(tokens.shape)}"
            )
        weight = loss_mask.to(per_token.dtype)
        return (per_token * weight).sum() / weight.sum().clamp(min=1.0)

    def set_recompute(self, mode: str) -> None:
        """Activation recomputation of every block: ``none``, ``selective`` or ``full``
        (see :mod:`megatron_msg.model.block`). Changes memory and time, never results."""
        set_recompute(self, mode)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length ({tokens.shape[1]}) exceeds max_seq_len "
                f"({self.config.max_seq_len})"
            )

    def _rope_tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> Rope | None:
        return self._rope.get(seq_len, device, dtype)

    def _require_rng(self) -> ParallelRNG:
        if self.rng is None:
            self.rng = ParallelRNG(seed=0, groups=self.groups, device=self._device())
        return self.rng

    def _device(self) -> torch.device:
        return self.embed.word.weight.device

    # ---- weights in canonical form ------------------------------------------

    def init_weights(self, *, seed: int) -> None:
        """TP-invariant init: each canonical tensor drawn in full from ``seed``, then sliced.

        Also reseeds the dropout streams from ``seed``. Masks are left as they are.
        """
        specs = canonical_specs(self.config)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, full in iter_canonical_init(self.config, seed=seed):
                local = shard_tensor(full, dim=specs[name].split_dim, groups=self.groups)
                params[name].copy_(local)
        self.rng = ParallelRNG(seed=seed, groups=self.groups, device=self._device())

    def to_canonical(self) -> dict[str, torch.Tensor]:
        """Full canonical tensors (weights and unfolded masks); collective over TP."""
        return gather_canonical(self.state_dict(), self.config, groups=self.groups)

    def load_canonical(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load full canonical tensors (each rank keeps its slice); masks absent from
        ``state`` are folded. Validates every name and shape before changing anything."""
        validate_canonical(state, self.config)
        specs = canonical_specs(self.config)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, spec in specs.items():
                if spec.is_mask:
                    self._load_mask(name, state.get(name), spec.split_dim)
                else:
                    local = shard_tensor(state[name], dim=spec.split_dim, groups=self.groups)
                    params[name].copy_(local)

    def _load_mask(self, name: str, full: torch.Tensor | None, split_dim: int | None) -> None:
        owner, key = self.mask_owner(name)
        if full is None:
            owner.fold(key)
            return
        local = shard_tensor(full.detach().to(torch.float32), dim=split_dim, groups=self.groups)
        owner.put(key, local.to(self._device()))

    def mask_owner(self, name: str) -> tuple[MaskSet, str]:
        """The :class:`MaskSet` holding canonical mask ``name`` and its key there."""
        prefix, _, key = name.rpartition(".")
        try:
            owner = self.get_submodule(prefix) if prefix else None
        except AttributeError:
            owner = None
        if not isinstance(owner, MaskSet) or key not in owner.names:
            raise ValueError(f"{name!r} is not a mask of this model")
        return owner, key

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict`` that also restores which masks are unfolded:
        a mask in ``state_dict`` is unfolded with its value; with ``strict`` a mask
        absent from it is folded. (Values here are this rank's shards.)"""
        specs = mask_specs(self.config)
        wrong = [
            f"{n} {tuple(state_dict[n].shape)} (expected {s.local_shape(self.groups.tp_size)})"
            for n, s in specs.items()
            if n in state_dict and tuple(state_dict[n].shape) != s.local_shape(self.groups.tp_size)
        ]
        if wrong:
            raise CanonicalStateError(f"mask shards of the wrong shape: {', '.join(wrong)}")
        for name in specs:
            owner, key = self.mask_owner(name)
            if name in state_dict:
                owner.put(key, state_dict[name].to(self._device()))
            elif strict:
                owner.fold(key)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_canonical(
        cls,
        state: Mapping[str, torch.Tensor],
        config: ModelConfig,
        *,
        groups: ProcessGroups,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
    ) -> GPTModel:
        """Build a model on this rank from full canonical tensors (validated first)."""
        config.validate(tp_size=groups.tp_size)
        validate_canonical(state, config)
        model = cls(config, groups=groups, dtype=dtype, device=device, init_seed=None)
        model.load_canonical(state)
        return model
