"""Adam state across growth: moment policies for new entries and per-tensor steps.

Old entries keep their exp_avg, exp_avg_sq and Adam step exactly (DESIGN.md,
"Optimizer state across growth"); new entries follow a *moment policy*:

- ``zero`` (default; the MSG reference code): exp_avg = exp_avg_sq = 0. Adam's
  bias correction uses the tensor's old step count t, so a new entry's update
  is m/sqrt(v) without correction: for a constant gradient its first nonzero
  step is (1-b1)/sqrt(1-b2) lr (0.45 lr at b2 = 0.95, 3.2 lr at b2 = 0.999)
  whatever the size of g. The gradient of a unit behind a mask near 0 is
  small but not constant, and measured steps stay below that bound.
- ``mean_sq``: exp_avg = 0, exp_avg_sq = the mean exp_avg_sq of the tensor's
  old entries (for a brand-new tensor, e.g. a freshly drawn layer: of the same
  kind of tensor in every old layer, ``layers.*.mlp.fc1.weight``, or of all old
  moments when no tensor of that kind exists). The updates are then
  g / sqrt(mean v): proportional to the gradient, so new units barely move
  while their masks are small, and v forgets the old scale only over ~1/(1-b2)
  steps.

Why ``zero`` is the default (``DEFAULT_MOMENT_POLICY``, used by both the
trainer's ``growth[].moment_policy`` and ``megatron-msg grow``): measured by
``benchmarks/moment_policy.py`` (the demo's model and data, the real trainer,
hidden + ffn + heads growth at step 80 of 160 with a 20-step ramp, two seeds x
b2 in {0.95, 0.999}; benchmarks/RESULTS.md). ``zero`` gave the lower mean loss
over the 80 steps after growth in all four cells (0.20-0.61%, mean 0.33%) and
equal loss over the first 30. Over the first five steps after growth its new
entries moved 0.2-0.7 lr per step (old entries: 0.15-0.21), well under the
3.2 lr figure; under ``mean_sq`` they moved <= 0.001 lr: they stay frozen
through the ramp, which costs more than ``zero``'s larger first steps. An
earlier run on examples/tiny_cpu (synthetic data) pointed the same way (1.7-2.6%).

Everything works one tensor at a time (``carry_tensor``) so the offline growth
tool can stream a checkpoint; ``carry_moments`` is the whole-dict form for
growth inside a run. The statistics a brand-new tensor needs come from one
pass over the old exp_avg_sq (:meth:`SquareMeans.accumulate`), and only when
such a tensor exists (:func:`needs_square_means`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from megatron_msg.config import ConfigError
from megatron_msg.growth.operators import GrowthMaps, TensorMap, carry_over, is_mask_name

__all__ = [
    "DEFAULT_MOMENT_POLICY",
    "MOMENT_POLICIES",
    "SquareMeans",
    "carry_adam_steps",
    "carry_moments",
    "carry_tensor",
    "check_policy",
    "fill_value",
    "needs_square_means",
]

MOMENT_POLICIES: tuple[str, ...] = ("zero", "mean_sq")
DEFAULT_MOMENT_POLICY = "zero"  # by measurement; see the module docstring
MOMENTS: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
_LAYER = re.compile(r"^layers\.\d+\.")
_CHUNK = 1 << 22  # elements per fp32 partial sum (added up in fp64)


def check_policy(policy: str) -> None:
    if policy not in MOMENT_POLICIES:
        raise ConfigError(f"moment_policy must be one of {MOMENT_POLICIES}, got {policy!r}")


def _sum(tensor: torch.Tensor) -> float:
    """Sum of all entries: fp32 sums of chunks, added up in fp64.

    Each chunk's fp32 sum (pairwise in torch, relative error ~1e-7) is exact
    enough for a value that is stored in fp32 anyway, and it avoids
    ``tensor.double()``: a copy at twice the size, and the slowest step here.
    """
    flat = tensor.detach().reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), _CHUNK):
        total += float(flat[start : start + _CHUNK].sum(dtype=torch.float32))
    return total


def _kind(name: str) -> str:
    return _LAYER.sub("layers.*.", name)


@dataclass(frozen=True)
class SquareMeans:
    """Mean old exp_avg_sq per kind of tensor (``layers.*.attn.qkv.weight``) and overall,
    each over all the entries of those tensors."""

    by_kind: dict[str, float]
    overall: float

    @classmethod
    def accumulate(cls, tensors: Iterable[tuple[str, torch.Tensor]]) -> SquareMeans:
        """One pass over ``(name, old exp_avg_sq)`` pairs; only one tensor is held at a time."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for name, tensor in tensors:
            key = _kind(name)
            sums[key] = sums.get(key, 0.0) + _sum(tensor)
            counts[key] = counts.get(key, 0) + tensor.numel()
        total = sum(counts.values())
        overall = sum(sums.values()) / total if total else 0.0
        by_kind = {k: sums[k] / counts[k] for k in sums if counts[k]}
        return cls(by_kind=by_kind, overall=overall)


def needs_square_means(maps: GrowthMaps, policy: str) -> bool:
    """Whether ``policy`` needs :class:`SquareMeans`: some parameter is brand new."""
    return policy == "mean_sq" and any(
        m.source is None for n, m in maps.tensors.items() if not is_mask_name(n)
    )


def fill_value(
    policy: str,
    moment: str,
    name: str,
    source: torch.Tensor | None,
    *,
    means: SquareMeans | None = None,
) -> float:
    """The value new entries of ``moment`` of tensor ``name`` get (``source``: its old values)."""
    check_policy(policy)
    if moment not in MOMENTS:
        raise ValueError(f"moment must be one of {MOMENTS}, got {moment!r}")
    if policy == "zero" or moment == "exp_avg":
        return 0.0
    if source is not None and source.numel() > 0:
        return _sum(source) / source.numel()
    if means is None:
        raise ValueError(f"mean_sq needs SquareMeans of the old exp_avg_sq for brand-new {name}")
    return means.by_kind.get(_kind(name), means.overall)


def carry_tensor(
    name: str,
    tmap: TensorMap,
    source: torch.Tensor | None,
    *,
    policy: str,
    moment: str,
    means: SquareMeans | None = None,
    dtype: torch.dtype = torch.float32,
    consume: bool = False,
) -> torch.Tensor:
    """One grown moment tensor: old entries from ``source`` (the moment of
    ``tmap.source``; None for a brand-new tensor), new ones by ``policy``.
    ``dtype`` is used only for a brand-new tensor. With ``consume`` the caller
    gives ``source`` up, and a tensor without new entries is returned as
    ``source`` itself instead of a copy."""
    if (source is None) != (tmap.source is None):
        raise ValueError(f"{moment} of {name}: the map's source is {tmap.source!r}")
    if consume and source is not None and tuple(source.shape) == tmap.new_shape:
        check_policy(policy)
        return source
    value = fill_value(policy, moment, name, source, means=means)
    if source is None or tmap.source is None:
        return torch.full(tmap.new_shape, value, dtype=dtype)
    return carry_over({tmap.source: source}, GrowthMaps({name: tmap}, ()), fill=value)[name]


def carry_moments(
    exp_avg: Mapping[str, torch.Tensor],
    exp_avg_sq: Mapping[str, torch.Tensor],
    maps: GrowthMaps,
    *,
    policy: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(exp_avg, exp_avg_sq) of every grown parameter under ``policy`` (whole dicts)."""
    check_policy(policy)
    means = SquareMeans.accumulate(exp_avg_sq.items()) if needs_square_means(maps, policy) else None
    dtype = next((t.dtype for t in exp_avg.values()), torch.float32)
    out: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    for name, tmap in maps.tensors.items():
        if is_mask_name(name):
            continue
        for moment, old, result in zip(MOMENTS, (exp_avg, exp_avg_sq), out):
            source = None if tmap.source is None else old[tmap.source]
            result[name] = carry_tensor(
                name, tmap, source, policy=policy, moment=moment, means=means, dtype=dtype
            )
    return out


def carry_adam_steps(
    adam_step: Mapping[str, int], maps: GrowthMaps, *, step: int
) -> dict[str, int]:
    """Per-tensor Adam steps of the grown parameters, in ``CanonicalMeta.adam_step`` form
    (only tensors whose step differs from the global ``step``): a grown or copied
    tensor keeps its source's step, a brand-new one starts at ``step`` (as growth
    inside a run does)."""
    out: dict[str, int] = {}
    for name, tmap in maps.tensors.items():
        if is_mask_name(name) or tmap.source is None:
            continue
        value = adam_step.get(tmap.source, step)
        if value != step:
            out[name] = value
    return out
