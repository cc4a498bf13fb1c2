"""Check that a grown model computes what the small one did (DESIGN.md tolerances).

Both models are built from their canonical states with
``GPTModel.from_canonical`` at the same process groups, run in eval mode
(dropout off) on the same tokens, and compared on the logits of the real
(unpadded) vocabulary and on the loss. Tolerances: max |delta| <= 1e-5 in
fp32 (reduction orders differ between the shapes), <= 1e-10 in fp64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model.gpt import GPTModel
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.random import gather_tensor

__all__ = [
    "TOLERANCES",
    "FunctionPreservationError",
    "PreservationReport",
    "check_function_preservation",
    "measure_preservation",
]

TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-10}


@dataclass(frozen=True)
class PreservationReport:
    max_abs_logits: float  # max |logits_big - logits_small| over the unpadded vocab
    loss_small: float
    loss_big: float
    tolerance: float
    dtype: torch.dtype

    @property
    def delta_loss(self) -> float:
        return abs(self.loss_big - self.loss_small)

    @property
    def ok(self) -> bool:
        return self.max_abs_logits <= self.tolerance and self.delta_loss <= self.tolerance

    def __str__(self) -> str:
        return (
            f"max |dlogits| {self.max_abs_logits:.3e}, |dloss| {self.delta_loss:.3e} "
            f"(loss {self.loss_small:.6f} -> {self.loss_big:.6f}; "
            f"tolerance {self.tolerance:.0e} in {self.dtype})"
        )


class FunctionPreservationError(AssertionError):
    """The grown model does not compute what the small one did; ``report`` has the figures."""

    def __init__(self, report: PreservationReport) -> None:
        super().__init__(f"growth is not function-preserving: {report}")
        self.report = report


def measure_preservation(
    small_state: Mapping[str, torch.Tensor],
    small_config: ModelConfig,
    big_state: Mapping[str, torch.Tensor],
    big_config: ModelConfig,
    *,
    tokens: torch.Tensor,
    labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    groups: ProcessGroups | None = None,
    tolerance: float | None = None,
) -> PreservationReport:
    """Build both models and compare them on ``tokens`` [b, s].

    ``labels`` default to the tokens shifted left by one (the last position
    wraps around; harmless for a comparison). With ``groups`` at TP > 1 the
    call is collective over the TP group and the logits are gathered.
    ``tolerance`` defaults to :data:`TOLERANCES` for ``dtype``.
    """
    tol = _tolerance(dtype, tolerance)
    groups = ProcessGroups.single() if groups is None else groups
    if small_config.vocab_size != big_config.vocab_size:
        raise ConfigError(
            f"vocab sizes differ: small {small_config.vocab_size}, big {big_config.vocab_size}"
        )
    if labels is None:
        labels = torch.roll(tokens, shifts=-1, dims=1)
    small_logits, small_loss = _run(small_state, small_config, tokens, labels, dtype, groups)
    big_logits, big_loss = _run(big_state, big_config, tokens, labels, dtype, groups)
    return PreservationReport(
        max_abs_logits=(big_logits - small_logits).abs().max().item(),
        loss_small=small_loss,
        loss_big=big_loss,
        tolerance=tol,
        dtype=dtype,
    )


def check_function_preservation(
    small_state: Mapping[str, torch.Tensor],
    small_config: ModelConfig,
    big_state: Mapping[str, torch.Tensor],
    big_config: ModelConfig,
    *,
    tokens: torch.Tensor,
    labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    groups: ProcessGroups | None = None,
    tolerance: float | None = None,
) -> PreservationReport:
    """:func:`measure_preservation`, raising :class:`FunctionPreservationError` when
    max |delta logits| or |delta loss| exceeds the tolerance."""
    report = measure_preservation(
        small_state,
        small_config,
        big_state,
        big_config,
        tokens=tokens,
        labels=labels,
        dtype=dtype,
        groups=groups,
        tolerance=tolerance,
    )
    if not report.ok:
        raise FunctionPreservationError(report)
    return report


def _tolerance(dtype: torch.dtype, tolerance: float | None) -> float:
    if tolerance is not None:
        if not tolerance >= 0.0:
            raise ConfigError(f"tolerance must be >= 0, got {tolerance}")
        return tolerance
    if dtype not in TOLERANCES:
        raise ConfigError(
            f"no default tolerance for {dtype}; pass tolerance= (defaults exist for "
            f"{sorted(str(d) for d in TOLERANCES)})"
        )
    return TOLERANCES[dtype]


@torch.no_grad()
def _run(
    state: Mapping[str, torch.Tensor],
    config: ModelConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype,
    groups: ProcessGroups,
) -> tuple[torch.Tensor, float]:
    model = GPTModel.from_canonical(state, config, groups=groups, dtype=dtype).eval()
    shard = model(tokens)
    logits = gather_tensor(shard, dim=shard.dim() - 1, groups=groups)
    loss = model.loss(tokens, labels).item()
    return logits[..., : config.vocab_size].to(torch.float64), loss
