"""Causal self-attention with whole heads per TP rank and an MSG per-head mask.

The qkv weight is head-major (DESIGN.md): head j owns rows [3dj, 3d(j+1)) as
q, k, v, so the contiguous row shard of a TP rank is a set of whole heads and
head growth appends rows at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from megatron_msg.config import ModelConfig
from megatron_msg.model.maskset import masked_row_parallel
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_msg.parallel.random import ParallelRNG, zeros_init

Rope = tuple[torch.Tensor, torch.Tensor]


def rope_tables(
    seq_len: int,
    head_dim: int,
    *,
    base: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Rope:
    """``(cos, sin)`` of shape [seq_len, head_dim] (rotate-half convention), computed
    in fp64 and stored in ``dtype``."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


class RopeCache:
    """RoPE tables per (device, seq_len, dtype), shared by the whole model and
    kept outside the module buffers: a cast of the model to bf16 must not
    degrade the angles, so tables are at least fp32."""

    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        self._tables: dict[tuple[torch.device, int, torch.dtype], Rope] = {}

    def get(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> Rope | None:
        c = self._config
        if c.position_embedding != "rope":
            return None
        table_dtype = torch.promote_types(dtype, torch.float32)
        key = (device, seq_len, table_dtype)
        if key not in self._tables:
            self._tables[key] = rope_tables(
                seq_len, c.head_dim, base=c.rope_base, dtype=table_dtype, device=device
            )
        return self._tables[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, n, s, d] by position; ``cos``/``sin`` are [s, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


@contextmanager
def _global_rng_from(gen: torch.Generator) -> Iterator[None]:
    """Let a kernel that only reads the global RNG (SDPA dropout) draw from ``gen``.

    Megatron's RNG-tracker fork: swap ``gen``'s state in, run, store the
    advanced state back into ``gen`` and restore the global state.
    """
    cuda = gen.device.type == "cuda"
    get = (lambda: torch.cuda.get_rng_state(gen.device)) if cuda else torch.get_rng_state
    saved = get()
    if cuda:
        torch.cuda.set_rng_state(gen.get_state(), gen.device)
    else:
        torch.set_rng_state(gen.get_state())
    try:
        yield
    finally:
        gen.set_state(get())
        if cuda:
            torch.cuda.set_rng_state(saved, gen.device)
        else:
            torch.set_rng_state(saved)


class Attention(nn.Module):
    """``hidden_mask * proj(concat_j heads_mask[j] * softmax(q_j k_j^T / sqrt(d)) v_j)``
    over this rank's heads (the masks are applied through proj's weight)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        groups: ProcessGroups,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.local_heads = config.num_heads // groups.tp_size
        self.dropout = config.dropout
        width = config.num_heads * config.head_dim
        bias = config.use_bias
        # Real values come from the model's canonical init (or a canonical load).
        self.qkv = ColumnParallelLinear(
            config.hidden_size,
            3 * width,
            groups=groups,
            bias=bias,
            init_method=zeros_init(),
            dtype=dtype,
            device=device,
        )
        self.proj = RowParallelLinear(
            width,
            config.hidden_size,
            groups=groups,
            bias=bias,
            init_method=zeros_init(),
            dtype=dtype,
            device=device,
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        heads_mask: torch.Tensor | None,
        hidden_mask: torch.Tensor | None,
        rope: Rope | None,
        rng: ParallelRNG | None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        n, d = self.local_heads, self.head_dim
        # [b, s, n*3*d] -> [3, b, n, s, d] (head-major rows: q, k, v per head)
        q, k, v = self.qkv(x).view(b, s, n, 3, d).permute(3, 0, 2, 1, 4).unbind(0)
        if rope is not None:
            cos, sin = rope[0][:s], rope[1][:s]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self._attend(q, k, v, rng)  # [b, n, s, d]
        o = o.transpose(1, 2).reshape(b, s, n * d)
        # Head j's output o_j meets only proj columns [dj, d(j+1)): masking those
        # columns is masking o_j before proj.
        columns = None if heads_mask is None else heads_mask.repeat_interleave(d)
        return masked_row_parallel(self.proj, o, in_mask=columns, out_mask=hidden_mask)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rng: ParallelRNG | None
    ) -> torch.Tensor:
        if not (self.training and self.dropout > 0.0):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if rng is None:
            raise RuntimeError("attention dropout needs the model's ParallelRNG (model.rng)")
        # Each TP rank holds different heads: draw from the per-rank "tp" stream.
        with _global_rng_from(rng.generator("tp")):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout)
