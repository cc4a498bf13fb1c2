"""The container that holds a module's unfolded MSG masks as persistent buffers.

A folded (all-ones) mask is simply absent: ``get`` returns None and the layer
runs its plain path with no multiply. Masks are kept in fp32 (exact ramp
values) and cast to the activation dtype where they are applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_msg.config import ConfigError
from megatron_msg.parallel.layers import RowParallelLinear
from megatron_msg.parallel.mappings import reduce_from_tp, scatter_to_tp


class MaskSet(nn.Module):
    """Named mask buffers of one module (``masks.hidden``, ``layers.{i}.masks.*``)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names

    def _check(self, name: str) -> None:
        if name not in self.names:
            raise ConfigError(f"unknown mask {name!r} here; this module holds {self.names}")

    def get(self, name: str) -> torch.Tensor | None:
        self._check(name)
        return self._buffers.get(name)

    def put(self, name: str, value: torch.Tensor) -> None:
        """Set (and unfold if needed) mask ``name`` to this rank's shard ``value``."""
        self._check(name)
        current = self._buffers.get(name)
        if current is not None and current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value)
            return
        self.register_buffer(name, value.detach().to(torch.float32).clone(), persistent=True)

    def fold(self, name: str) -> None:
        """Drop mask ``name``: the module goes back to its plain path."""
        self._check(name)
        self._buffers.pop(name, None)

    def present(self) -> list[str]:
        return [n for n in self.names if self._buffers.get(n) is not None]

    def extra_repr(self) -> str:
        return f"unfolded={self.present()}"


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x * mask`` over the last dim; no-op (no multiply) for a folded mask."""
    return x if mask is None else x * mask.to(x.dtype)


def masked_row_parallel(
    layer: RowParallelLinear,
    x: torch.Tensor,
    *,
    in_mask: torch.Tensor | None,
    out_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``out_mask * layer(in_mask * x)`` with the masks folded into the weight.

    Scaling the weight's columns by ``in_mask`` and its rows and bias by
    ``out_mask`` is the same product, but costs a weight-sized multiply instead
    of two activation-sized ones (activations are batch*seq times larger).
    ``in_mask`` is this rank's slice of the input features; ``out_mask`` is full.
    """
    if in_mask is None and out_mask is None:
        return layer(x)
    weight: torch.Tensor = layer.weight
    bias: torch.Tensor | None = layer.bias
    if in_mask is not None and out_mask is not None:
        weight = weight * torch.outer(out_mask, in_mask).to(weight.dtype)
    elif in_mask is not None:
        weight = weight * in_mask.to(weight.dtype)
    elif out_mask is not None:
        weight = weight * out_mask.to(weight.dtype).unsqueeze(1)
    if not layer.input_is_parallel:
        x = scatter_to_tp(x, layer.groups, dim=-1)
    y = reduce_from_tp(F.linear(x, weight), layer.groups)
    if bias is None:
        return y
    return y + (bias if out_mask is None else bias * out_mask.to(bias.dtype))
