"""Masked norms: fused kernels when built, PyTorch reference otherwise.

Public signatures (DESIGN.md, "Public entry points"):
    masked_layer_norm(x, weight, bias, mask=None, eps=1e-5)
    masked_rms_norm(x, weight, mask=None, eps=1e-5)

Both normalise over the last dimension of x (any shape; a non-contiguous x is
copied). ``weight``/``bias`` are [hidden] in float32 or x's dtype; ``mask`` is
a floating-point [hidden] buffer with sum(mask) > 0, or None for the plain
norm. x, weight and bias get gradients, the mask does not; the fused path
gives first derivatives only (a double backward raises). Which path runs is
chosen per call (see ``_dispatch``; ``MEGATRON_MSG_NORM_IMPL`` forces one);
``fused_norm_available(device, dtype)`` tells which one a call would take.
"""

from __future__ import annotations

import torch

from megatron_msg.ops._dispatch import check_norm_inputs, fused_norm_available, select_kernel
from megatron_msg.ops.fused import fused_masked_norm
from megatron_msg.ops.reference import reference_masked_layer_norm, reference_masked_rms_norm

__all__ = ["fused_norm_available", "masked_layer_norm", "masked_rms_norm"]


def masked_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    check_norm_inputs(x, weight, bias, mask, eps)
    ext = select_kernel(x)
    if ext is None:
        return reference_masked_layer_norm(x, weight, bias, mask, eps)
    return fused_masked_norm(ext, x, weight, bias, mask, eps, rms=False)


def masked_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    check_norm_inputs(x, weight, None, mask, eps)
    ext = select_kernel(x)
    if ext is None:
        return reference_masked_rms_norm(x, weight, mask, eps)
    return fused_masked_norm(ext, x, weight, None, mask, eps, rms=True)
