"""PyTorch reference implementations of the masked norms (DESIGN.md, "Masks").

These are composed from plain tensor ops, so autograd differentiates them
exactly; the fused kernels are checked against them.

Masked LayerNorm with mask c (values in [0, 1]):
    mu  = sum(c*x)/sum(c);  var = sum(c*(x-mu)^2)/sum(c)
    y   = c * (w*(x-mu)/sqrt(var+eps) + b)
Masked RMSNorm:
    rms = sqrt(sum(c*x^2)/sum(c) + eps);  y = c * w * x / rms
With mask None both are the plain norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_masked_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    if mask is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    # Statistics in at least fp32, as the fused kernels compute them.
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute_dtype)
    c = mask.to(compute_dtype)
    n = c.sum()
    mu = (xf * c).sum(-1, keepdim=True) / n
    centred = xf - mu
    var = (c * centred * centred).sum(-1, keepdim=True) / n
    y = centred * torch.rsqrt(var + eps) * weight.to(compute_dtype)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return (c * y).to(x.dtype)


def reference_masked_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute_dtype)
    if mask is None:
        ms = (xf * xf).mean(-1, keepdim=True)
        return (xf * torch.rsqrt(ms + eps) * weight.to(compute_dtype)).to(x.dtype)
    c = mask.to(compute_dtype)
    ms = (c * xf * xf).sum(-1, keepdim=True) / c.sum()
    y = xf * torch.rsqrt(ms + eps) * weight.to(compute_dtype)
    return (c * y).to(x.dtype)
