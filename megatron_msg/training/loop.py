"""The training loop: steps, in-run growth, non-finite steps, logs and checkpoints.

One loop iteration is one optimizer step over ``grad_accum`` micro-batches.
The step counter drives everything that is scheduled: the data position, the
learning rate, growth stages, the mask ramp and checkpoints. A skipped step
(non-finite loss or gradient norm) still uses its data and its slot in the
schedules, so a run's schedule does not depend on where skips happen.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_msg.checkpoint.resume import load_canonical_into, open_canonical_start
from megatron_msg.config import ConfigError
from megatron_msg.growth.masks import MaskRamp
from megatron_msg.model import GPTModel
from megatron_msg.model.block import set_recompute
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.training import checkpoint as ckpt
from megatron_msg.training.config import TrainConfig, write_resolved
from megatron_msg.training.data import build_train_dataset, probe_batch, step_micro_batches
from megatron_msg.training.engine import TrainEngine, create_engine
from megatron_msg.training.grow import grow_engine
from megatron_msg.training.lr import LRSchedule
from megatron_msg.training.metrics import (
    Console,
    JsonlLog,
    TensorBoardLog,
    default_peak_flops,
    format_step,
    mfu,
    training_flops_per_token,
)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


@dataclass
class RunSummary:
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> DP-mean loss
    growth_events: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    resumed_from: str | None = None
    last_checkpoint: str | None = None


class Trainer:
    """Holds the engine and run state of one training run (see :func:`train`)."""

    def __init__(self, config: TrainConfig) -> None:
        world = dist.get_world_size()
        self.config = config.resolve(world_size=world)
        p = self.config.parallel
        self.groups = ProcessGroups.from_grid(tp=p.tp, pp=p.pp, dp=p.dp)
        self.rank0 = dist.get_rank() == 0
        self.device = _device()
        self.dtype = torch.bfloat16 if self.config.train.dtype == "bf16" else torch.float32
        self.run_dir = Path(self.config.train.run_dir)
        if self.rank0:
            write_resolved(self.config, self.run_dir)
        self.dataset = build_train_dataset(self.config)
        self.probe = probe_batch(
            self.dataset, size=self.config.batch.micro_batch_size, device=self.device
        )
        s = self.config.lr
        self.lr = LRSchedule(
            peak_lr=self.config.optimizer.lr,
            min_lr=s.min_lr,
            warmup_steps=s.warmup_steps,
            decay_steps=s.decay_steps,
            decay_style=s.decay_style,
            rewarmup_steps=s.rewarmup_steps,
        )
        self.summary = RunSummary()
        self.ramp: MaskRamp | None = None
        self.step, self.stage, self.skipped, self.nonfinite_in_row = 0, 0, 0, 0
        self.last_grad_norm: float | None = None
        self.elapsed, self.tokens = 0.0, 0
        tag = ckpt.latest_tag(self.config.checkpoint_dir) if self.config.checkpoint.resume else None
        # A checkpoint of this run wins over checkpoint.load (a restarted job resumes).
        self.engine = self._resume(tag) if tag else self._start()
        self._open_logs(resumed=tag is not None)
        if self.summary.resumed_from is not None:
            source = "checkpoint" if tag else "canonical checkpoint"
            self.console.message(
                f"continuing from {source} {self.summary.resumed_from} at step {self.step} "
                f"(stage {self.stage})"
            )

    # ---- setup --------------------------------------------------------------

    def _new_engine(self, stage: int, *, init_seed: int | None) -> TrainEngine:
        model_config = self.config.stage_models()[stage]
        model = GPTModel(
            model_config,
            groups=self.groups,
            dtype=self.dtype,
            device=self.device,
            init_seed=init_seed,
        )
        engine = create_engine(model, config=_stage_config(self.config, stage), groups=self.groups)
        set_recompute(engine.module, self.config.train.recompute)
        return engine

    def _start(self) -> TrainEngine:
        """A new run: from the canonical store ``checkpoint.load`` if given, else from init."""
        if not self.config.checkpoint.load:
            return self._fresh_engine()
        start = open_canonical_start(self.config.checkpoint.load, self.config)
        try:
            engine = self._new_engine(start.stage, init_seed=None)
            load_canonical_into(engine, start, groups=self.groups, seed=self.config.train.seed)
        finally:
            start.reader.close()
        if start.ramp is not None:
            self.ramp = MaskRamp.from_state_dict(start.ramp)
            self.ramp.apply(engine.module)
        if start.lr:
            self.lr.load_state_dict(start.lr)
        self.step, self.stage = start.step, start.stage
        c = start.counters
        self.skipped = int(c.get("skipped_steps", 0))
        self.nonfinite_in_row = int(c.get("nonfinite_in_row", 0))
        self.elapsed, self.tokens = float(c.get("elapsed", 0.0)), int(c["tokens"])
        self.summary.resumed_from = str(start.path)
        return engine

    def _fresh_engine(self) -> TrainEngine:
        return self._new_engine(0, init_seed=self.config.train.seed)

    def _resume(self, tag: str) -> TrainEngine:
        directory = self.config.checkpoint_dir
        run = ckpt.load_run_state(directory, tag)
        _check_resumable(self.config, run, tag)
        engine = self._new_engine(run.stage, init_seed=None)
        if run.ramp is not None:
            self.ramp = MaskRamp.from_state_dict(run.ramp)
            self.ramp.apply(engine.module)  # the saved module holds exactly these masks
        engine.load_native(str(directory), tag=tag)
        ckpt.load_rng(directory, tag, engine)
        self.lr.load_state_dict(run.lr)
        self.step, self.stage, self.skipped = run.step, run.stage, run.skipped_steps
        self.nonfinite_in_row, self.elapsed, self.tokens = (
            run.nonfinite_in_row,
            run.elapsed,
            run.tokens,
        )
        self.summary.resumed_from = tag
        return engine

    def _open_logs(self, *, resumed: bool) -> None:
        lg = self.config.logging
        self.jsonl = (
            JsonlLog(self.run_dir / "metrics.jsonl", resume_step=self.step if resumed else None)
            if self.rank0
            else None
        )
        self.tensorboard = TensorBoardLog(
            self.run_dir / "tensorboard", enabled=self.rank0 and lg.tensorboard
        )
        self.console = Console(
            total=self.config.train.steps,
            initial=self.step,
            enabled=self.rank0,
            progress_bar=lg.progress_bar,
        )
        self.peak_flops = lg.peak_flops or default_peak_flops(device=self.device, dtype=self.dtype)

    # ---- the loop -----------------------------------------------------------

    def run(self) -> RunSummary:
        """Train to ``train.steps`` (saving on the way and at the end), then close the logs."""
        try:
            self.advance(to=self.config.train.steps)
        finally:
            self.close()
        return self.summary

    def advance(self, *, to: int) -> None:
        """Train until ``to`` optimizer steps are done (growing and saving as scheduled)."""
        if not self.step <= to <= self.config.train.steps:
            raise ValueError(
                f"cannot advance from step {self.step} to {to} (train.steps = {self.config.train.steps})"
            )
        window: list[float] = []
        window_start = time.perf_counter()
        while self.step < to:
            if self.maybe_grow() is not None:
                window_start = time.perf_counter()  # growth time is not step time
            window.append(self._train_one_step())
            if self.step % self.config.logging.interval == 0:
                self._log(window, time.perf_counter() - window_start)
                window, window_start = [], time.perf_counter()
            if self._checkpoint_due():
                self._save()

    def _train_one_step(self) -> float:
        start = time.perf_counter()
        batches = step_micro_batches(
            self.dataset, step=self.step, config=self.config, groups=self.groups, device=self.device
        )
        losses, result = self.engine.train_step(batches, lr=self.lr.lr_at(self.step))
        if self.ramp is not None and not self.ramp.done:
            self.ramp.step(self.engine.module)
        self.step += 1
        self.tokens += self.config.batch.global_batch_size * self.config.data.seq_len
        loss = self._dp_mean(torch.stack(losses).mean())
        self.last_grad_norm = result.grad_norm
        if result.applied:
            self.nonfinite_in_row = 0
            self.summary.losses[self.step] = loss
        else:
            self._count_skip(loss)
        self.elapsed += time.perf_counter() - start
        return loss

    def _count_skip(self, loss: float) -> None:
        self.skipped += 1
        self.nonfinite_in_row += 1
        self.summary.skipped_steps = self.skipped
        self.console.message(f"step {self.step}: non-finite loss/gradient ({loss}); update skipped")
        limit = self.config.train.max_nonfinite_in_row
        if self.nonfinite_in_row >= limit:
            raise TrainingError(
                f"stopping at step {self.step}: {self.nonfinite_in_row} consecutive steps had a "
                f"non-finite loss or gradient norm (train.max_nonfinite_in_row = {limit}); "
                f"last checkpoint: {self.summary.last_checkpoint or self.summary.resumed_from}"
            )

    def _dp_mean(self, loss: torch.Tensor) -> float:
        value = loss.detach().to(torch.float64).reshape(1)
        if self.groups.dp_size > 1:
            dist.all_reduce(value, group=self.groups.dp_group)
            value /= self.groups.dp_size
        return float(value)

    # ---- growth -------------------------------------------------------------

    def maybe_grow(self) -> dict[str, Any] | None:
        """Apply the growth stage that starts at the current step, if any; returns its event."""
        if self.config.stage_at(self.step) <= self.stage:
            return None
        new_stage = self.stage + 1
        stage_cfg = self.config.growth[new_stage - 1]
        new_model = self.config.stage_models()[new_stage]
        before = self.engine.eval_loss(*self.probe)
        outcome = grow_engine(
            self.engine,
            config=self.config,
            stage=stage_cfg,
            new_model=new_model,
            groups=self.groups,
            seed=self.config.train.seed + new_stage,
        )
        self.engine, self.ramp, self.stage = outcome.engine, outcome.ramp, new_stage
        set_recompute(self.engine.module, self.config.train.recompute)
        after = self.engine.eval_loss(*self.probe)
        if self.config.lr.rewind_on_growth:
            self.lr.rewind(step=self.step)
        self.elapsed += outcome.seconds
        shape = [
            new_model.hidden_size,
            new_model.ffn_hidden_size,
            new_model.num_heads,
            new_model.num_layers,
        ]
        event: dict[str, Any] = {
            "kind": "growth",
            "step": self.step,
            "stage": new_stage,
            "shape": shape,
            "loss_before": before,
            "loss_after": after,
            "seconds": outcome.seconds,
            "elapsed": self.elapsed,
        }
        self.summary.growth_events.append(event)
        self._write(event)
        rel = abs(after - before) / max(abs(before), 1e-12)
        self.console.message(
            f"growth at step {self.step} -> stage {new_stage} {tuple(shape)}: "
            f"probe loss {before:.6f} -> {after:.6f} (rel {rel:.1e}), {outcome.seconds:.1f}s"
        )
        return event

    # ---- logs and checkpoints -----------------------------------------------

    def _log(self, window: list[float], seconds: float) -> None:
        finite = [v for v in window if math.isfinite(v)]
        loss = sum(finite) / len(finite) if finite else float("nan")
        steps = len(window)
        tokens_per_s = (
            steps
            * self.config.batch.global_batch_size
            * self.config.data.seq_len
            / max(seconds, 1e-9)
        )
        flops = training_flops_per_token(
            self.engine.module.config, seq_len=self.config.data.seq_len
        )
        record: dict[str, Any] = {
            "kind": "step",
            "step": self.step,
            "loss": loss,
            "lr": self.lr.lr_at(self.step - 1),
            "grad_norm": self.last_grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(
                tokens_per_s=tokens_per_s,
                flops_per_token=flops,
                peak_flops=self.peak_flops,
                devices=self.groups.world_size,
            ),
            "stage": self.stage,
            "skipped": self.skipped,
            "elapsed": self.elapsed,
            "tokens": self.tokens,
        }
        if self.ramp is not None and not self.ramp.done:
            record["ramp"] = self.ramp.steps_done / self.ramp.ramp_steps
        self._write(record)
        self.tensorboard.write(
            self.step,
            {k: float(v) for k, v in record.items() if k not in ("kind", "step") and v is not None},
        )
        self.console.step(format_step(record))
        for _ in range(steps - 1):
            self.console.step(None)

    def _write(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(record)

    def _checkpoint_due(self) -> bool:
        interval = self.config.checkpoint.interval
        return self.step == self.config.train.steps or (interval > 0 and self.step % interval == 0)

    def _save(self) -> None:
        run = ckpt.RunState(
            step=self.step,
            stage=self.stage,
            consumed_samples=self.step * self.config.batch.global_batch_size,
            lr=self.lr.state_dict(),
            ramp=None if self.ramp is None else self.ramp.state_dict(),
            skipped_steps=self.skipped,
            nonfinite_in_row=self.nonfinite_in_row,
            elapsed=self.elapsed,
            tokens=self.tokens,
            config=self.config.to_dict(),
        )
        tag = ckpt.save_checkpoint(
            self.engine, run, directory=self.config.checkpoint_dir, keep=self.config.checkpoint.keep
        )
        self.summary.last_checkpoint = tag

    def close(self) -> None:
        self.console.close()
        self.tensorboard.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _check_resumable(config: TrainConfig, run: ckpt.RunState, tag: str) -> None:
    """The checkpoint's shape and data position must mean the same under this config."""
    models = config.stage_models()
    if run.stage >= len(models):
        raise ConfigError(
            f"checkpoint {tag} is at growth stage {run.stage} but the config has only "
            f"{len(models) - 1} growth stage(s)"
        )
    shape = ("hidden_size", "ffn_hidden_size", "num_heads", "num_layers")
    saved = tuple(
        getattr(TrainConfig.from_dict(run.config).stage_models()[run.stage], k) for k in shape
    )
    expected = tuple(getattr(models[run.stage], k) for k in shape)
    if saved != expected:
        raise ConfigError(
            f"checkpoint {tag} holds growth stage {run.stage} of shape (hidden, ffn, heads, "
            f"layers) {saved} but this config's stage {run.stage} is {expected}"
        )
    batch = config.batch.global_batch_size
    if run.consumed_samples != run.step * batch:
        raise ConfigError(
            f"checkpoint {tag} consumed {run.consumed_samples} samples in {run.step} steps, "
            f"which does not match batch.global_batch_size ({batch})"
        )


def _stage_config(config: TrainConfig, stage: int) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(config, model=config.stage_models()[stage])


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train(config: TrainConfig) -> RunSummary:
    """Run (or resume) training as ``config`` says; torch.distributed must be initialised."""
    return Trainer(config).run()
