"""Autograd wrapper of the compiled masked-norm kernels (csrc/masked_norm).

The kernels take x as a contiguous [rows, hidden] matrix, so x of any shape is
flattened (and copied when it is not contiguous). Forward saves the per-row
mean and 1/std (in float32, float64 for float64 inputs); backward computes dx in
one pass and the weight/bias gradients with a deterministic reduction. The mask
is a constant: it gets no gradient.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch.autograd.function import once_differentiable


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class FusedMaskedNorm(torch.autograd.Function):
    """y = c*(w*(x-mu)*rstd + b) over the last dim, LayerNorm or RMSNorm (``rms``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor | None,
        eps: float,
        rms: bool,
        ext: ModuleType,
    ) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1]).contiguous()  # [rows, hidden]
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        y, mean, rstd = ext.forward(x2d, weight, bias, mask, eps, rms)
        ctx.save_for_backward(x2d, weight, mask, mean, rstd)
        ctx.ext, ctx.rms, ctx.has_bias, ctx.x_shape = ext, rms, bias is not None, x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2d, weight, mask, mean, rstd = ctx.saved_tensors
        want_dx, want_dw, want_db = ctx.needs_input_grad[:3]
        dx, dw, db = ctx.ext.backward(
            dy.reshape(x2d.shape).contiguous(),
            x2d,
            weight,
            mask,
            None if ctx.rms else mean,
            rstd,
            ctx.rms,
            want_dw,
            want_db and ctx.has_bias,
        )
        return (dx.view(ctx.x_shape) if want_dx else None, dw, db, None, None, None, None)


def fused_masked_norm(
    ext: ModuleType,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    eps: float,
    *,
    rms: bool,
) -> torch.Tensor:
    """Runs the kernels of ``ext``; inputs already checked by ``check_norm_inputs``."""
    if mask is not None:
        # The kernels read the mask in the statistics type; a [hidden] copy is cheap.
        mask = mask.detach().to(dtype=_acc_dtype(x), memory_format=torch.contiguous_format)
    out: torch.Tensor = FusedMaskedNorm.apply(x, weight, bias, mask, float(eps), rms, ext)
    return out
