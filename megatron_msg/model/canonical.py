"""The canonical (topology-free) tensor table of a GPT model and its TP split rules.

Every tensor has one canonical name and full shape (DESIGN.md, "Canonical
parameter layout"); a TP rank holds the contiguous ``tp_rank``-th chunk of the
tensor along ``split_dim`` (None = replicated). The model's module tree mirrors
these names, so ``model.state_dict()`` keys *are* the canonical names and its
values are this rank's shards.

Masks are part of the table but optional: a mask appears in a canonical state
iff it is unfolded (not all ones).

The canonical vocabulary is ``config.padded_vocab_size()`` (padded to a
multiple of 128, independent of TP) so that the softmax over padded rows, and
hence the loss, is the same at every TP size; each TP size must divide it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.random import gather_tensor, shard_tensor


class CanonicalStateError(ConfigError):
    """A canonical state does not match the model config (names or shapes)."""


@dataclass(frozen=True)
class TensorSpec:
    """Full canonical shape, TP split dim (None = replicated) and whether it is a mask."""

    shape: tuple[int, ...]
    split_dim: int | None
    is_mask: bool = False

    def local_shape(self, tp_size: int) -> tuple[int, ...]:
        if self.split_dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.split_dim] //= tp_size
        return tuple(shape)


def canonical_vocab_size(config: ModelConfig) -> int:
    """Rows of ``embed.word.weight`` / ``lm_head.weight``: the TP-independent padded vocabulary."""
    return config.padded_vocab_size()


def _norm_specs(prefix: str, config: ModelConfig) -> dict[str, TensorSpec]:
    h = config.hidden_size
    specs = {f"{prefix}.weight": TensorSpec((h,), None)}
    if config.norm == "layernorm" and config.use_bias:
        specs[f"{prefix}.bias"] = TensorSpec((h,), None)
    return specs


def _linear_specs(
    prefix: str, out_features: int, in_features: int, *, column: bool, bias: bool
) -> dict[str, TensorSpec]:
    # Column-parallel splits the output rows (and bias); row-parallel splits the
    # input columns and keeps the bias replicated (added once after all-reduce).
    specs = {f"{prefix}.weight": TensorSpec((out_features, in_features), 0 if column else 1)}
    if bias:
        specs[f"{prefix}.bias"] = TensorSpec((out_features,), 0 if column else None)
    return specs


def layer_parameter_specs(config: ModelConfig, index: int) -> dict[str, TensorSpec]:
    """Parameters of decoder layer ``index``, in canonical order."""
    h, f, b = config.hidden_size, config.ffn_hidden_size, config.use_bias
    qkv_rows = 3 * config.num_heads * config.head_dim
    p = f"layers.{index}"
    specs: dict[str, TensorSpec] = {}
    specs |= _norm_specs(f"{p}.norm1", config)
    specs |= _linear_specs(f"{p}.attn.qkv", qkv_rows, h, column=True, bias=b)
    specs |= _linear_specs(
        f"{p}.attn.proj", h, config.num_heads * config.head_dim, column=False, bias=b
    )
    specs |= _norm_specs(f"{p}.norm2", config)
    specs |= _linear_specs(f"{p}.mlp.fc1", f, h, column=True, bias=b)
    if config.activation == "swiglu":
        specs |= _linear_specs(f"{p}.mlp.gate", f, h, column=True, bias=b)
    specs |= _linear_specs(f"{p}.mlp.fc2", h, f, column=False, bias=b)
    return specs


def parameter_specs(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every parameter (no masks), in canonical order."""
    v, h = canonical_vocab_size(config), config.hidden_size
    specs = {"embed.word.weight": TensorSpec((v, h), 0)}
    if config.position_embedding == "learned":
        specs["embed.pos.weight"] = TensorSpec((config.max_seq_len, h), None)
    for i in range(config.num_layers):
        specs |= layer_parameter_specs(config, i)
    specs |= _norm_specs("final_norm", config)
    if not config.tie_embeddings:
        specs["lm_head.weight"] = TensorSpec((v, h), 0)
    return specs


def mask_specs(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every mask that can exist (each is present only while unfolded)."""
    specs = {"masks.hidden": TensorSpec((config.hidden_size,), None, is_mask=True)}
    for i in range(config.num_layers):
        specs[f"layers.{i}.masks.heads"] = TensorSpec((config.num_heads,), 0, is_mask=True)
        specs[f"layers.{i}.masks.ffn"] = TensorSpec((config.ffn_hidden_size,), 0, is_mask=True)
        specs[f"layers.{i}.masks.depth"] = TensorSpec((), None, is_mask=True)
    return specs


def canonical_specs(config: ModelConfig) -> dict[str, TensorSpec]:
    """Parameters then masks: the full canonical name table of ``config``."""
    return parameter_specs(config) | mask_specs(config)


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def validate_canonical(state: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    """Raise :class:`CanonicalStateError` naming every missing, unexpected or mis-shaped tensor."""
    specs = canonical_specs(config)
    params = parameter_specs(config)
    missing = [n for n in params if n not in state]
    unexpected = sorted(n for n in state if n not in specs)
    misshaped = [
        f"{n} {tuple(t.shape)} (expected {specs[n].shape})"
        for n, t in state.items()
        if n in specs and tuple(t.shape) != specs[n].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"wrong shape: {_listing(misshaped)}")
    if problems:
        raise CanonicalStateError(
            "canonical state does not match the model config "
            f"(hidden={config.hidden_size}, ffn={config.ffn_hidden_size}, "
            f"heads={config.num_heads}, layers={config.num_layers}): " + "; ".join(problems)
        )


def shard_canonical(
    state: Mapping[str, torch.Tensor], config: ModelConfig, *, groups: ProcessGroups
) -> dict[str, torch.Tensor]:
    """This rank's slices of canonical tensors (names must be in the table)."""
    specs = canonical_specs(config)
    unknown = sorted(n for n in state if n not in specs)
    if unknown:
        raise CanonicalStateError(f"not canonical tensor names: {_listing(unknown)}")
    return {n: shard_tensor(t, dim=specs[n].split_dim, groups=groups) for n, t in state.items()}


def gather_canonical(
    local: Mapping[str, torch.Tensor], config: ModelConfig, *, groups: ProcessGroups
) -> dict[str, torch.Tensor]:
    """Full canonical tensors from this rank's shards (collective over TP, in name order).

    Works for any per-parameter tensors laid out like the parameters: weights,
    gradients, optimizer moments. Every TP rank must pass the same names.
    """
    specs = canonical_specs(config)
    unknown = sorted(n for n in local if n not in specs)
    if unknown:
        raise CanonicalStateError(f"not canonical tensor names: {_listing(unknown)}")
    order = {n: i for i, n in enumerate(specs)}
    return {
        n: gather_tensor(local[n], dim=specs[n].split_dim, groups=groups)
        for n in sorted(local, key=order.__getitem__)
    }
