"""One pre-LN decoder layer with the MSG hidden, head, ffn and depth masks.

Activation recomputation (``Block.recompute``): ``"full"`` keeps only the
block's input and reruns the whole block in backward; ``"selective"`` reruns
only the attention sublayer (norm1, qkv, attention core, proj: where the
s^2-sized attention probabilities of a non-fused kernel live) and keeps the
MLP's activations. (Megatron's selective reruns only the attention core; that
needs the core as its own function in model/attention.py.) The rerun draws the
same dropout masks: the model's :class:`ParallelRNG` streams are captured
before the forward and replayed (:meth:`ParallelRNG.replaying`), so gradients
equal those without recomputation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_msg.config import ModelConfig
from megatron_msg.model.attention import Attention, Rope
from megatron_msg.model.maskset import MaskSet
from megatron_msg.model.mlp import MLP
from megatron_msg.model.norms import Norm
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.parallel.random import ParallelRNG

LAYER_MASKS = ("heads", "ffn", "depth")
RECOMPUTE_MODES = ("none", "selective", "full")


def set_recompute(module: nn.Module, mode: str) -> None:
    """Set the recomputation mode of every :class:`Block` inside ``module``."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
    for sub in module.modules():
        if isinstance(sub, Block):
            sub.recompute = mode


def recomputed(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rng: ParallelRNG | None
) -> torch.Tensor:
    """``fn(x)`` whose activations are recomputed in backward instead of kept.

    The first call is the forward; any later call (the recomputation) replays
    the dropout streams from where the forward started them.
    """
    state = None if rng is None else rng.state_dict()
    calls = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1 or rng is None or state is None:
            return fn(inp)
        with rng.replaying(state):
            return fn(inp)

    out = checkpoint(run, x, use_reentrant=False, preserve_rng_state=True)
    assert isinstance(out, torch.Tensor)
    return out


class Block(nn.Module):
    """``y = c * Block(x) + (1 - c) * x`` with ``c`` the depth mask, where
    ``Block(x) = x + m_h * attn(norm1(x)) ; then + m_h * mlp(norm2(.))`` and the
    norms use the hidden mask ``m_h`` for their statistics and output.

    The layer's own masks (``masks.heads`` [n/tp], ``masks.ffn`` [f/tp],
    ``masks.depth`` []) live in ``self.masks``; the hidden mask is the model's
    and is passed in.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        groups: ProcessGroups,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()

        def norm() -> Norm:
            return Norm(
                config.hidden_size,
                kind=config.norm,
                eps=config.norm_eps,
                use_bias=config.use_bias,
                dtype=dtype,
                device=device,
            )

        self.dropout = config.dropout
        self.norm1 = norm()
        self.attn = Attention(config, groups=groups, dtype=dtype, device=device)
        self.norm2 = norm()
        self.mlp = MLP(config, groups=groups, dtype=dtype, device=device)
        self.masks = MaskSet(LAYER_MASKS)
        self.recompute = "none"  # see the module docstring; GPTModel.set_recompute sets it

    def forward(
        self,
        x: torch.Tensor,
        *,
        hidden_mask: torch.Tensor | None,
        rope: Rope | None,
        rng: ParallelRNG | None,
    ) -> torch.Tensor:
        if self.recompute == "full" and self._recomputing():
            return recomputed(
                lambda t: self._forward(t, hidden_mask=hidden_mask, rope=rope, rng=rng), x, rng
            )
        return self._forward(x, hidden_mask=hidden_mask, rope=rope, rng=rng)

    def _recomputing(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _attention(
        self,
        x: torch.Tensor,
        *,
        hidden_mask: torch.Tensor | None,
        rope: Rope | None,
        rng: ParallelRNG | None,
    ) -> torch.Tensor:
        return self.attn(  # type: ignore[no-any-return]
            self.norm1(x, hidden_mask),
            heads_mask=self.masks.get("heads"),
            hidden_mask=hidden_mask,
            rope=rope,
            rng=rng,
        )

    def _forward(
        self,
        x: torch.Tensor,
        *,
        hidden_mask: torch.Tensor | None,
        rope: Rope | None,
        rng: ParallelRNG | None,
    ) -> torch.Tensor:
        if self.recompute == "selective" and self._recomputing():
            a = recomputed(
                lambda t: self._attention(t, hidden_mask=hidden_mask, rope=rope, rng=rng), x, rng
            )
        else:
            a = self._attention(x, hidden_mask=hidden_mask, rope=rope, rng=rng)
        h = x + self._residual_dropout(a, rng)
        m = self.mlp(
            self.norm2(h, hidden_mask), ffn_mask=self.masks.get("ffn"), hidden_mask=hidden_mask
        )
        out = h + self._residual_dropout(m, rng)
        depth = self.masks.get("depth")
        if depth is None:
            return out
        # c * out + (1 - c) * x in one kernel; exactly x at c = 0.
        return torch.lerp(x, out, depth.to(x.dtype))

    def _residual_dropout(self, x: torch.Tensor, rng: ParallelRNG | None) -> torch.Tensor:
        if not (self.training and self.dropout > 0.0):
            return x
        if rng is None:
            raise RuntimeError("residual dropout needs the model's ParallelRNG (model.rng)")
        # The residual stream is replicated over TP: the same mask on every TP rank.
        return rng.dropout(x, self.dropout, stream="default", training=True)
