"""Cross entropy over vocabulary-sharded logits, without gathering the vocabulary.

Each TP rank holds logits for a contiguous slice of the (padded) vocabulary.
Three small all-reduces over ``[...]`` (not ``[..., V]``) replace a gather:
the max (for a stable softmax), the target logit (non-zero on the owning rank
only, so the sum is exact) and the sum of exponentials. The padded vocabulary
entries take part in the softmax, as in Megatron. Computed in at least fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_msg.config import ConfigError
from megatron_msg.parallel.groups import ProcessGroups


def _all_reduce(t: torch.Tensor, groups: ProcessGroups, op: Any = dist.ReduceOp.SUM) -> None:
    if groups.tp_size > 1:
        dist.all_reduce(t, op=op, group=groups.tp_group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        groups: ProcessGroups,
        ignore_index: int,
    ) -> torch.Tensor:
        compute = torch.promote_types(logits.dtype, torch.float32)
        x = logits.to(compute)  # [..., v_local]
        v_local = x.shape[-1]
        start = groups.tp_rank * v_local

        x_max = x.max(dim=-1).values
        _all_reduce(x_max, groups, dist.ReduceOp.MAX)
        x = x - x_max.unsqueeze(-1)

        ignored = target == ignore_index
        local_target = target - start
        owned = (local_target >= 0) & (local_target < v_local) & ~ignored
        index = local_target.masked_fill(~owned, 0).unsqueeze(-1)
        target_logit = x.gather(-1, index).squeeze(-1).masked_fill(~owned, 0.0)
        _all_reduce(target_logit, groups)

        probs = x.exp_()
        sum_exp = probs.sum(dim=-1)
        _all_reduce(sum_exp, groups)
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        probs.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(probs, index, owned, ignored)
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        probs, index, owned, ignored = ctx.saved_tensors
        g = grad_loss.to(probs.dtype).masked_fill(ignored, 0.0)
        # d loss / d logits = softmax - onehot(target), the onehot only on the owner.
        grad = probs * g.unsqueeze(-1)
        grad.scatter_add_(-1, index, -(g * owned).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    groups: ProcessGroups,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token loss ``[...]`` from logits ``[..., V/tp]`` (this rank's vocabulary slice).

    Targets equal to ``ignore_index`` get loss 0 and no gradient; for a loss
    mask, multiply the returned per-token loss by it. Any other target must lie
    in ``[0, V)``, V the full (padded) vocabulary. Collective over TP.
    """
    if target.shape != logits_shard.shape[:-1]:
        raise ConfigError(
            f"target shape {tuple(target.shape)} must equal logits shape without the "
            f"vocabulary dim {tuple(logits_shard.shape[:-1])}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ConfigError(f"target must be an integer tensor, got {target.dtype}")
    vocab = logits_shard.shape[-1] * groups.tp_size
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        first = int(target[bad].flatten()[0])
        raise ConfigError(
            f"target id {first} outside the vocabulary [0, {vocab}) "
            f"and not ignore_index ({ignore_index})"
        )
    return _VocabParallelCrossEntropy.apply(logits_shard, target, groups, ignore_index)
