"""The container that holds a module's unfolded MSG masks as persistent buffers.

A folded (all-ones) mask is simply absent: ``get`` returns None and the layer
runs its plain path with no multiply. Masks are kept in fp32 (exact ramp
values) and cast to the activation dtype where they are applied.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_msg.config import ConfigError


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
