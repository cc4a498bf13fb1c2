"""Pipeline parallelism (DeepSpeed PipelineEngine, ZeRO-1) on gloo ranks.

At TP x PP x DP = 1x2x2, 2x2x1 and 2x2x2: the canonical state at step 0 is
bitwise the single-process model's; 10 steps give the same losses as a plain
single-process PyTorch loop (same canonical init, same samples, AdamW,
clipping, LR schedule) and the same canonical weights and moments; growth
inside the run keeps the probe loss and every old fp32 weight and moment
bitwise; a checkpoint saved mid-ramp at PP=2 loads back bitwise (state, masks,
ramp, probe loss).

Tolerance: 1e-5 relative on the loss (as tests/distributed/test_train_parallel.py:
sharded sums change the floating point order, which Adam amplifies a little);
weights and moments after 10 steps to rtol 1e-4 (exp_avg_sq: 1e-3, squares
double the relative error); weights also atol 1e-5 (= lr / 300): entries whose
exact gradient is 0 (the key bias: softmax ignores it) are moved by Adam's
normalised rounding noise, about 1e-7 per step here.
"""

from __future__ import annotations

import os

from tests.dist_utils import run_distributed
from tests.distributed.test_train_parallel import BASE as PARALLEL_BASE
from tests.integration.test_train_run import _check_growth_keeps_old_state

STEPS = 10
BASE = [
    o
    for o in PARALLEL_BASE
    if not o.startswith(("growth.", "train.steps", "model.num_layers", "batch.", "checkpoint."))
] + [
    "model.num_layers=4",
    "batch.micro_batch_size=2",
    "batch.global_batch_size=8",
    "parallel.zero_stage=1",
    f"growth.0.start_step={STEPS}",
    "growth.0.hidden_size=48",
    "growth.0.ffn_hidden_size=96",
    "growth.0.num_heads=4",
    "growth.0.num_layers=6",
    "growth.0.ramp_steps=3",
    f"train.steps={STEPS + 4}",
    f"checkpoint.interval={STEPS + 2}",
]
REL = 1e-5


def _reference(config, steps: int):
    """Plain PyTorch in one process: the losses and the canonical state after ``steps``."""
    import torch

    from megatron_msg.model import GPTModel, canonical_specs
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
    initial = {n: t.clone() for n, t in model.to_canonical().items()}
    losses, norms = [], []
    for step in range(steps):
        total = 0.0
        for start in range(step * g, (step + 1) * g, mb):
            rows = torch.stack([torch.from_numpy(data[i]) for i in range(start, start + mb)])
            loss = model.loss(rows[:, :-1], rows[:, 1:]) * (mb / g)
            loss.backward()
            total += float(loss)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_grad)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        norms.append(float(norm))
    names = [n for n in canonical_specs(config.model) if n in dict(model.named_parameters())]
    params = dict(model.named_parameters())
    state = {
        "weights": {n: params[n].detach().clone() for n in names},
        "exp_avg": {n: optimizer.state[params[n]]["exp_avg"].clone() for n in names},
        "exp_avg_sq": {n: optimizer.state[params[n]]["exp_avg_sq"].clone() for n in names},
    }
    return initial, losses, norms, state


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


def _body(rank: int, world_size: int, tmp: str, tp: int, dp: int, extra: list[str]) -> None:
    import torch

    from megatron_msg.training.config import load_config
    from megatron_msg.training.loop import Trainer
    from megatron_msg.training.pipeline import PipelineTrainEngine

    def config():
        sizes = [f"parallel.tp={tp}", "parallel.pp=2", f"parallel.dp={dp}", *extra]
        return load_config(None, [*BASE, f"train.run_dir={os.path.join(tmp, 'run')}", *sizes])

    trainer = Trainer(config())
    g = trainer.groups
    assert (g.tp_size, g.pp_size, g.dp_size) == (tp, 2, dp)
    assert isinstance(trainer.engine, PipelineTrainEngine)
    initial, reference, ref_norms, ref_state = _reference(trainer.config, STEPS)
    start = trainer.engine.get_state()
    assert list(start.weights) == [n for n in initial if ".masks." not in n and n != "masks.hidden"]
    assert all(torch.equal(start.weights[n], initial[n]) for n in start.weights)

    trainer.advance(to=STEPS)
    got = [trainer.summary.losses[s] for s in range(1, STEPS + 1)]
    assert all(_close(a, b) for a, b in zip(got, reference)), (got, reference)
    # DeepSpeed's norm counts the tied copy and TP-replicated tensors once (as clipping needs).
    assert abs(trainer.last_grad_norm - ref_norms[-1]) <= 1e-4 * ref_norms[-1]
    _check_close(trainer.engine.get_state(), ref_state)
    if trainer.config.train.steps == STEPS:
        return

    event = _check_growth_keeps_old_state(trainer)
    assert event["shape"] == [48, 96, 4, 6]
    trainer.advance(to=STEPS + 2)  # mid-ramp (2 of 3 steps); saved here
    assert trainer.ramp is not None and trainer.ramp.steps_done == 2
    saved = trainer.engine.get_state()
    assert set(saved.masks) >= {"masks.hidden", "layers.5.masks.depth"}
    trainer.advance(to=STEPS + 3)
    loss_after = trainer.summary.losses[STEPS + 3]
    trainer.close()

    again = Trainer(config())
    assert again.summary.resumed_from == f"step_{STEPS + 2:08d}" and again.stage == 1
    assert again.ramp is not None and again.ramp.steps_done == 2
    loaded = again.engine.get_state()
    assert loaded.step == saved.step
    for part in ("weights", "exp_avg", "exp_avg_sq", "masks"):
        ours, theirs = getattr(loaded, part), getattr(saved, part)
        assert list(ours) == list(theirs), part
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs), part
    again.advance(to=STEPS + 3)
    assert again.summary.losses[STEPS + 3] == loss_after
    assert again.ramp.done and not again.engine.get_state().masks  # ramp done: all folded


def _check_close(state, reference) -> None:
    import torch

    assert state.step == STEPS
    tolerances = (("weights", 1e-4, 1e-5), ("exp_avg", 1e-4, 1e-6), ("exp_avg_sq", 1e-3, 1e-9))
    for part, rtol, atol in tolerances:
        ours, theirs = getattr(state, part), reference[part]
        assert list(ours) == list(theirs), part
        for name in theirs:
            bad = ~torch.isclose(ours[name], theirs[name], rtol=rtol, atol=atol)
            assert not bool(bad.any()), (part, name, ours[name][bad][:4], theirs[name][bad][:4])


def test_train_pipeline_tp2_pp2_dp2_parity_growth_resume(tmp_path):
    run_distributed(_body, world_size=8, args=(str(tmp_path), 2, 2, []), timeout=500)


def test_train_pipeline_untied_rope_parity(tmp_path):
    """The other head and position paths: own lm_head on the last stage, RoPE in every stage."""
    extra = ["model.tie_embeddings=false", "model.position_embedding=rope", f"train.steps={STEPS}"]
    run_distributed(_body, world_size=2, args=(str(tmp_path), 1, 1, extra), timeout=300)


def test_pipeline_config_errors():
    """pp > 1 needs ZeRO-1 and at least one layer per stage (in every growth stage too)."""
    import pytest

    from megatron_msg.config import ConfigError
    from megatron_msg.training.config import load_config

    def resolve(*extra: str):
        return load_config(None, [*BASE, "train.run_dir=unused", *extra]).resolve(world_size=4)

    assert resolve("parallel.pp=2").parallel.dp == 2
    with pytest.raises(
        ConfigError, match=r"parallel.pp \(2\) > 1 needs parallel.zero_stage 1, got 2"
    ):
        resolve("parallel.pp=2", "parallel.zero_stage=2")
    with pytest.raises(
        ConfigError, match=r"num_layers \(2\) must be >= pipeline parallel size \(4\)"
    ):
        resolve("parallel.pp=4", "model.num_layers=2", "growth.0.num_layers=4")
