"""Net2Net / bert2BERT-style copy growth: the mask-free baseline MSG is compared against.

Width (Net2WiderNet, Chen et al. 2016; bert2BERT's function-preserving init):
every new FFN neuron, attention head or hidden channel is a *copy* of an old
one, and the weights that *read* the copied unit are split between the original
and its copies so their sum is the old weight. The copied units are drawn
*balanced* (a random permutation of the old units, repeated as needed), so every
old unit has the same number of copies, give or take one. Depth
(Net2DeeperNet): a new layer is built from its ``depth_strategy`` source like
MSG's, with its output projections (attn.proj, mlp.fc2) set to 0, so the
pre-norm block adds nothing and is the identity.

What this preserves, and what it does not (the MSG paper's argument for masks):

- FFN neurons, heads and layers: exactly (up to float summation order).
- Hidden channels: the copies sit in the residual stream, so every LayerNorm or
  RMSNorm normalises over them too. When the width grows by a whole multiple
  (every channel copied equally often) the mean, variance and mean square are
  unchanged and the growth is exact; otherwise the statistics move and so does
  the function (``benchmarks/growth_speedup.py`` logs by how much). The final
  norm's weight (and bias) is *split* and the output head's columns copied,
  so the logits count each channel once even with tied embeddings.

Copies of a unit that received equal shares would get equal gradients and never
separate (Net2Net adds noise for this). Here the shares are unequal, drawn at
random and normalised to sum to 1, which breaks the symmetry without giving up
exactness. All choices are drawn from generators seeded by (seed, axis name),
so the result does not depend on the order of the state dict or on TP.

The result has no masks: every unit is fully on from the first step (the
trainer requires ``ramp_steps: 0`` for this operator). ``maps`` are those of
:func:`~megatron_msg.growth.operators.plan_growth`, so optimizer moments carry
over exactly as for MSG (the old units are still the leading block).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.operators import GrowthResult, InitFn, is_mask_name, plan_growth
from megatron_msg.parallel.random import derive_seed

__all__ = ["GROWTH_OPERATORS", "net2net_grow"]

GROWTH_OPERATORS: tuple[str, ...] = ("msg", "net2net")

# The two roles an axis of a weight plays for the units along it: "copy" (the
# unit's own values: rows that write it, norm weights) or "split" (the columns
# of a consumer that reads it).
_GLOBAL_AXES = {
    "embed.word.weight": {1: ("hidden", "copy")},
    "embed.pos.weight": {1: ("hidden", "copy")},
    # The final norm feeds only the output head: splitting it (not the head) keeps the
    # logits exact with tied embeddings, where the head is the copied embedding.
    "final_norm.weight": {0: ("hidden", "split")},
    "final_norm.bias": {0: ("hidden", "split")},
    "lm_head.weight": {1: ("hidden", "copy")},
}
_LAYER_AXES = {
    "norm1.weight": {0: ("hidden", "copy")},
    "norm1.bias": {0: ("hidden", "copy")},
    "norm2.weight": {0: ("hidden", "copy")},
    "norm2.bias": {0: ("hidden", "copy")},
    "attn.qkv.weight": {0: ("heads", "copy"), 1: ("hidden", "split")},
    "attn.qkv.bias": {0: ("heads", "copy")},
    "attn.proj.weight": {0: ("hidden", "copy"), 1: ("heads", "split")},
    "attn.proj.bias": {0: ("hidden", "copy")},
    "mlp.fc1.weight": {0: ("ffn", "copy"), 1: ("hidden", "split")},
    "mlp.fc1.bias": {0: ("ffn", "copy")},
    "mlp.gate.weight": {0: ("ffn", "copy"), 1: ("hidden", "split")},
    "mlp.gate.bias": {0: ("ffn", "copy")},
    "mlp.fc2.weight": {0: ("hidden", "copy"), 1: ("ffn", "split")},
    "mlp.fc2.bias": {0: ("hidden", "copy")},
}
# Zeroed in a new layer: with them 0 the pre-norm block is the identity.
_LAYER_OUTPUTS = ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")


@dataclass(frozen=True)
class UnitCopies:
    """Where every unit of a grown axis comes from, and its share of the readers' weights.

    ``source[j]`` is the old unit new unit ``j`` copies (``source[j] == j`` for
    the old units); ``share[j] > 0`` and the shares of each old unit's group
    (itself and its copies) sum to 1.
    """

    source: torch.Tensor  # int64 [new]
    share: torch.Tensor  # float64 [new]

    @staticmethod
    def draw(old: int, new: int, *, seed: int, name: str) -> UnitCopies:
        generator = torch.Generator().manual_seed(derive_seed(seed, f"net2net:{name}"))
        rounds = max(1, -(-(new - old) // old))  # balanced: each old unit copied equally often, +-1
        extra = torch.cat([torch.randperm(old, generator=generator) for _ in range(rounds)])
        extra = extra[: new - old]
        source = torch.cat([torch.arange(old), extra])
        weight = 0.5 + torch.rand(new, generator=generator, dtype=torch.float64)
        group_total = torch.zeros(old, dtype=torch.float64).index_add_(0, source, weight)
        return UnitCopies(source=source, share=weight / group_total[source])

    def apply(self, tensor: torch.Tensor, dim: int, *, role: str, unit: int) -> torch.Tensor:
        """``tensor`` with axis ``dim`` (``unit`` elements per unit) widened by copying;
        a "split" axis also scales every copy by its share."""
        offsets = torch.arange(unit)
        index = (self.source[:, None] * unit + offsets).reshape(-1)
        out = tensor.index_select(dim, index)
        if role == "split":
            shape = [1] * tensor.dim()
            shape[dim] = -1
            scale = self.share.repeat_interleave(unit).reshape(shape)
            out = (out.to(torch.float64) * scale).to(tensor.dtype)
        return out


def net2net_grow(
    state: Mapping[str, torch.Tensor],
    old_config: ModelConfig,
    new_config: ModelConfig,
    *,
    init: str | InitFn = "normal",
    depth_strategy: str = "stack",
    seed: int = 0,
    tp_size: int = 1,
) -> GrowthResult:
    """Grow ``state`` to ``new_config`` by copying units (module docstring); no masks.

    The arguments are those of :func:`~megatron_msg.growth.operators.grow`;
    ``init`` draws only the layers ``depth_strategy="random"`` adds fresh. Masks in ``state``
    must be folded: a model still ramping an earlier growth cannot be copied
    without changing what its half-on units compute.
    """
    _check_masks_folded(state)
    params = {name: t for name, t in state.items() if not is_mask_name(name)}
    plan = plan_growth(
        {name: tuple(t.shape) for name, t in params.items()},
        old_config,
        new_config,
        init=init,
        depth_strategy=depth_strategy,
        seed=seed,
        tp_size=tp_size,
    )
    copies = _CopiesByAxis(old_config, new_config, seed)
    dtype = params["embed.word.weight"].dtype
    grown: dict[str, torch.Tensor] = {}
    for name, tmap in plan.maps.tensors.items():
        if is_mask_name(name):
            continue
        if tmap.source is None:
            grown[name] = plan.build(name, None, dtype=dtype)
        else:
            axes = _axes_of(name, tmap.source, copies, new_config.head_dim)
            grown[name] = _widen(params[tmap.source].detach(), axes)
    for index, layer in enumerate(plan.maps.layers):
        if layer.is_new:
            for local in _LAYER_OUTPUTS:
                if f"layers.{index}.{local}" in grown:
                    grown[f"layers.{index}.{local}"].zero_()
    return GrowthResult(state=grown, maps=plan.maps)


def _check_masks_folded(state: Mapping[str, torch.Tensor]) -> None:
    partial = sorted(n for n, t in state.items() if is_mask_name(n) and not bool((t == 1).all()))
    if partial:
        raise ConfigError(
            "net2net growth needs a model with every mask folded (ramp finished); "
            f"masks below 1: {partial[:8]}"
        )


class _CopiesByAxis:
    """One :class:`UnitCopies` per grown axis (hidden; FFN and heads per source layer),
    drawn once and shared by every tensor on that axis."""

    def __init__(self, old: ModelConfig, new: ModelConfig, seed: int) -> None:
        self._sizes = {
            "hidden": (old.hidden_size, new.hidden_size),
            "ffn": (old.ffn_hidden_size, new.ffn_hidden_size),
            "heads": (old.num_heads, new.num_heads),
        }
        self._seed = seed
        self._drawn: dict[str, UnitCopies] = {}

    def get(self, axis: str, layer: str) -> UnitCopies:
        name = "hidden" if axis == "hidden" else f"layers.{layer}.{axis}"
        if name not in self._drawn:
            old, new = self._sizes[axis]
            self._drawn[name] = UnitCopies.draw(old, new, seed=self._seed, name=name)
        return self._drawn[name]


def _axes_of(
    name: str, source: str, copies: _CopiesByAxis, head_dim: int
) -> dict[int, tuple[UnitCopies, str, int]]:
    """Per grown dim of ``name``: its copies, role and elements per unit."""
    parts = name.split(".", 2)
    if parts[0] != "layers":
        roles, layer = _GLOBAL_AXES.get(name, {}), ""
    else:
        # A copied layer widens like its source, so identical layers stay identical
        # apart from their zeroed outputs.
        roles, layer = _LAYER_AXES.get(parts[2], {}), source.split(".", 2)[1]
    axes: dict[int, tuple[UnitCopies, str, int]] = {}
    for dim, (axis, role) in roles.items():
        # qkv rows hold q, k and v of a head together; proj columns one head each
        unit = head_dim * (3 if role == "copy" else 1) if axis == "heads" else 1
        axes[dim] = (copies.get(axis, layer), role, unit)
    return axes


def _widen(tensor: torch.Tensor, axes: dict[int, tuple[UnitCopies, str, int]]) -> torch.Tensor:
    out = tensor
    for dim, (copies, role, unit) in axes.items():
        out = copies.apply(out, dim, role=role, unit=unit)
    return out.clone() if out is tensor else out
