"""LayerNorm / RMSNorm with an optional MSG hidden mask (masked statistics and output)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_msg.config import NormKind
from megatron_msg.ops import masked_layer_norm, masked_rms_norm


class Norm(nn.Module):
    """Pre-LN norm over the hidden dim; replicated across TP ranks.

    ``forward(x, mask)`` with ``mask`` None runs the plain norm; otherwise
    statistics are taken over masked channels and the output is masked
    (DESIGN.md, "Masks"). LayerNorm has a bias only with ``use_bias``.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        kind: NormKind,
        eps: float,
        use_bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.bias: nn.Parameter | None = None
        if kind == "layernorm" and use_bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "layernorm":
            return masked_layer_norm(x, self.weight, self.bias, mask, self.eps)
        return masked_rms_norm(x, self.weight, mask, self.eps)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"
