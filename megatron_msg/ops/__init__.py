"""Masked norms: fused kernels when built, PyTorch reference otherwise.

Public signatures (DESIGN.md, "Public entry points"):
    masked_layer_norm(x, weight, bias, mask=None, eps=1e-5)
    masked_rms_norm(x, weight, mask=None, eps=1e-5)
"""

from __future__ import annotations

import torch

from megatron_msg.ops.reference import reference_masked_layer_norm, reference_masked_rms_norm

__all__ = ["masked_layer_norm", "masked_rms_norm"]


def masked_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    return reference_masked_layer_norm(x, weight, bias, mask, eps)


def masked_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    return reference_masked_rms_norm(x, weight, mask, eps)
