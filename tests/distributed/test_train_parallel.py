"""DeepSpeed training on 2 gloo ranks: TP=2 (ZeRO-1) and DP=2 (ZeRO-2).

Both match a plain single-process PyTorch loop (same canonical init, same
samples, AdamW, clipping, LR schedule) over the steps before growth; growth
inside the run at TP=2 and at DP=2 preserves the probe loss and every old
weight/moment bitwise; after growth the two topologies still agree; a ZeRO-2
checkpoint written by 2 ranks loads back exactly.

Tolerance: 1e-5 relative on the loss. Sharding changes the order of floating
point sums (TP all-reduces partial matmuls, DP averages per-rank gradients,
the reference sums micro-batches in one process), which Adam's normalisation
amplifies a little over a few steps; everything else is the same fp32 math.
"""

from __future__ import annotations

import os

from tests.dist_utils import run_distributed
from tests.integration.test_train_run import _check_growth_keeps_old_state
from tests.tiny_run import TINY_RUN

BASE = [
    *TINY_RUN,
    "lr.warmup_steps=2",
    "lr.min_lr=3e-4",
    "growth.0.start_step=4",
    "growth.0.hidden_size=48",
    "growth.0.ffn_hidden_size=96",
    "growth.0.num_heads=4",
    "growth.0.ramp_steps=2",
    "train.steps=8",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.interval=0",
]
REL = 1e-5


def _reference_losses(config, steps: int) -> list[float]:
    """Plain PyTorch: one process, the whole global batch, torch AdamW + clip_grad_norm_."""
    import torch

    from megatron_msg.model import GPTModel
    from megatron_msg.parallel.groups import ProcessGroups
    from megatron_msg.training.data import SyntheticDataset
    from megatron_msg.training.engine import build_optimizer
    from megatron_msg.training.lr import LRSchedule

    model = GPTModel(config.model, groups=ProcessGroups.single(), init_seed=config.train.seed)
    optimizer = build_optimizer(model, config)
    s = config.lr
    schedule = LRSchedule(
        peak_lr=config.optimizer.lr,
        min_lr=s.min_lr,
        warmup_steps=s.warmup_steps,
        decay_steps=s.decay_steps,
        decay_style=s.decay_style,
    )
    g, mb = config.batch.global_batch_size, config.batch.micro_batch_size
    data = SyntheticDataset(
        vocab_size=config.model.vocab_size,
        seq_len=config.data.seq_len,
        num_samples=g * steps,
        seed=config.data.seed,
    )
    losses = []
    for step in range(steps):
        total = 0.0
        for start in range(step * g, (step + 1) * g, mb):
            rows = torch.stack([torch.from_numpy(data[i]) for i in range(start, start + mb)])
            loss = model.loss(rows[:, :-1], rows[:, 1:]) * (mb / g)
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_grad)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


def _body(rank: int, world_size: int, tmp: str) -> None:
    import torch

    from megatron_msg.training.config import load_config
    from megatron_msg.training.loop import Trainer

    def config(name: str, *extra: str):
        return load_config(None, [*BASE, f"train.run_dir={os.path.join(tmp, name)}", *extra])

    runs = {}
    reference = None
    for name, extra in (
        ("tp2", ["parallel.tp=2", "parallel.zero_stage=1"]),
        ("dp2", ["parallel.dp=2", "parallel.zero_stage=2"]),
    ):
        trainer = Trainer(config(name, *extra))
        assert (trainer.groups.tp_size, trainer.groups.dp_size) == (
            (2, 1) if name == "tp2" else (1, 2)
        )
        if reference is None:
            reference = _reference_losses(trainer.config, 4)
        trainer.advance(to=4)
        got = [trainer.summary.losses[s] for s in range(1, 5)]
        assert all(_close(a, b) for a, b in zip(got, reference)), (name, got, reference)
        event = _check_growth_keeps_old_state(trainer)
        assert event["shape"] == [48, 96, 4, 2]
        trainer.run()  # to step 8, saves there
        runs[name] = trainer
    tp_losses, dp_losses = runs["tp2"].summary.losses, runs["dp2"].summary.losses
    assert all(_close(tp_losses[s], dp_losses[s]) for s in range(5, 9)), (tp_losses, dp_losses)
    assert dp_losses[8] < reference[0]

    saved = runs["dp2"].engine.get_state()
    again = Trainer(config("dp2", "parallel.dp=2", "parallel.zero_stage=2"))
    assert again.summary.resumed_from == "step_00000008" and again.stage == 1
    loaded = again.engine.get_state()
    assert loaded.step == saved.step
    for part in ("weights", "exp_avg", "exp_avg_sq"):
        ours, theirs = getattr(loaded, part), getattr(saved, part)
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs), part


def test_train_tp2_dp2_parity_growth_checkpoint(tmp_path):
    run_distributed(_body, world_size=2, args=(str(tmp_path),), timeout=500)
