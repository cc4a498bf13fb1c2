"""Feed-forward block (GELU or SwiGLU) with the MSG ffn mask after the activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_msg.config import ModelConfig
from megatron_msg.model.maskset import masked_row_parallel
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_msg.parallel.random import zeros_init


class MLP(nn.Module):
    """``hidden_mask * fc2(ffn_mask * act(x))``: GELU ``act = gelu(fc1 x)`` (tanh form, as GPT-2),
    SwiGLU ``act = silu(gate x) * fc1 x``. fc1/gate are column-, fc2 row-parallel,
    so the ffn mask is this rank's [f/tp] slice."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        groups: ProcessGroups,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        h, f, bias = config.hidden_size, config.ffn_hidden_size, config.use_bias
        self.swiglu = config.activation == "swiglu"

        def column() -> ColumnParallelLinear:
            # Real values come from the model's canonical init (or a canonical load).
            return ColumnParallelLinear(
                h, f, groups=groups, bias=bias, init_method=zeros_init(), dtype=dtype, device=device
            )

        self.fc1 = column()
        self.gate = column() if self.swiglu else None
        self.fc2 = RowParallelLinear(
            f, h, groups=groups, bias=bias, init_method=zeros_init(), dtype=dtype, device=device
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        ffn_mask: torch.Tensor | None,
        hidden_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.gate is not None:
            act = F.silu(self.gate(x)) * self.fc1(x)
        else:
            act = F.gelu(self.fc1(x), approximate="tanh")
        # Masking fc2's columns (ffn) and rows (hidden) = masking act and the output.
        return masked_row_parallel(self.fc2, act, in_mask=ffn_mask, out_mask=hidden_mask)
