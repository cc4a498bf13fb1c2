"""Pipeline parallelism: :class:`TrainEngine`'s public methods over DeepSpeed's
``PipelineEngine`` and our :class:`GPTPipe` (model/pipeline.py).

- The pipeline module gets our grid's topology, so DeepSpeed's groups coincide
  with our :class:`ProcessGroups` (TP inside each stage, DP per stage).
- ``train_step`` is one ``PipelineEngine.train_batch``: micro-batches = grad
  accumulation steps (1F1B schedule), loss by our vocab-parallel cross entropy
  on the last stage; the per-micro-batch losses are broadcast to every stage.
- Canonical state: each stage contributes its layers (TP-gathered), then the
  stages' pieces are broadcast over the pipeline group, so every rank gets the
  full :class:`TrainState`; ``set_state`` loads each stage's slice (and the last
  stage's tied word-embedding copy from ``embed.word.weight``).
- DeepSpeed's pipeline engine supports ZeRO stage 1 only (no ZeRO-2); the
  config check requires it for pp > 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import deepspeed
import torch
import torch.distributed as dist

from megatron_msg.config import ConfigError
from megatron_msg.growth.masks import get_masks
from megatron_msg.model import GPTModel, shard_canonical
from megatron_msg.model.canonical import gather_canonical
from megatron_msg.model.pipeline import GPTPipe
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.training.config import TrainConfig
from megatron_msg.training.engine import (
    MOMENT_KEYS,
    StepResult,
    TrainEngine,
    TrainState,
    build_optimizer,
    deepspeed_config,
)


class PipelineTrainEngine(TrainEngine):
    """A GPTModel split into pipeline stages and driven by DeepSpeed's PipelineEngine."""

    def __init__(self, model: GPTModel, *, config: TrainConfig, groups: ProcessGroups) -> None:
        p = config.parallel
        if p.pp < 2 or groups.pp_size != p.pp:
            raise ConfigError(
                f"PipelineTrainEngine needs pp >= 2 matching the groups: "
                f"parallel.pp ({p.pp}), groups.pp_size ({groups.pp_size})"
            )
        if p.zero_stage != 1:
            raise ConfigError(
                f"pipeline parallelism needs parallel.zero_stage 1, got {p.zero_stage}"
            )
        self.config, self.groups = config, groups
        from deepspeed.utils import groups as ds_groups

        ds_groups.mpu = None  # the pipeline engine uses the module's grid, not a stale mpu
        # PipelineModule talks through deepspeed.comm, which must wrap the torch world first.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        pipe = GPTPipe(model, groups=groups)
        ds_config = deepspeed_config(config)
        ds_config["pipeline"] = {"activation_checkpoint_interval": 0}
        self.engine, _, _, _ = deepspeed.initialize(
            model=pipe,
            optimizer=build_optimizer(pipe, config),
            config=ds_config,
            dist_init_required=False,
        )
        self.zero_stage = p.zero_stage
        self._seq_len = config.data.seq_len

    @property
    def module(self) -> GPTPipe:  # type: ignore[override]
        module = self.engine.module
        assert isinstance(module, GPTPipe)
        return module

    # ---- training ---------------------------------------------------------

    def train_step(
        self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, lr: float
    ) -> tuple[list[torch.Tensor], StepResult]:
        """One optimizer step over ``grad_accum`` micro-batches (see TrainEngine.train_step);
        the returned losses are the last stage's, on every rank."""
        accum = self.config.batch.grad_accum
        if len(micro_batches) != accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches for grad_accum ({accum})")
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.module.recorded_losses = []
        self.engine.train_batch(data_iter=iter(list(micro_batches)))
        losses = self._broadcast_losses(accum)
        norm = self.engine.get_global_grad_norm()
        value = None if norm is None else float(norm)
        return list(losses), StepResult(applied=self.engine.was_step_applied(), grad_norm=value)

    def _broadcast_losses(self, count: int) -> torch.Tensor:
        g = self.groups
        values = torch.zeros(count, dtype=torch.float32)
        if g.is_last_stage:
            values = torch.stack(self.module.recorded_losses).reshape(count).cpu()
        device = self._comm_device()
        values = values.to(device)
        dist.broadcast(values, src=g.pp_ranks[-1], group=g.pp_group)
        return values.cpu()

    def _comm_device(self) -> torch.device:
        if dist.get_backend(self.groups.pp_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean loss of one batch (same shape as a training micro-batch), on every rank."""
        was_training = self.module.training
        self.module.recorded_losses = []
        try:
            self.engine.eval_batch(
                data_iter=iter([(tokens, labels)]), num_micro_batches=1, bcast_loss=False
            )
        finally:
            self.module.train(was_training)
        return float(self._broadcast_losses(1)[0])

    # ---- canonical state --------------------------------------------------

    def get_state(self) -> TrainState:
        """The full canonical training state on every rank; collective over all ranks."""
        config = self.module.config
        if self._optimizer_state_ready():
            self._relink_zero_state()
        local: dict[str, dict[str, torch.Tensor]] = {"weights": {}, **{k: {} for k in MOMENT_KEYS}}
        for name, param in self.module.canonical_parameters().items():
            local["weights"][name] = self._get_fp32(param)
            for key in MOMENT_KEYS:
                local[key][name] = self._get_moment(param, key)
        full = {
            k: self.module.merge_stages(gather_canonical(v, config, groups=self.groups))
            for k, v in local.items()
        }
        return TrainState(
            weights=full["weights"],
            exp_avg=full["exp_avg"],
            exp_avg_sq=full["exp_avg_sq"],
            step=self.adam_step(),
            masks=get_masks(self.module),
        )

    def set_state(self, state: TrainState) -> None:
        """Load this stage's fp32 masters, moments and the Adam step from canonical tensors."""
        params = self.module.canonical_parameters()
        for part, values in (("weights", state.weights), ("exp_avg", state.exp_avg)):
            missing = sorted(set(params) - set(values))
            if missing:
                raise ConfigError(f"training state lacks {part} of {missing[:5]} ({len(missing)})")
        if not self._optimizer_state_ready():
            self._null_step()
        self._relink_zero_state()
        config, tied = self.module.config, self.module.tied_copy()
        wanted = set(params) | ({"embed.word.weight"} if tied is not None else set())
        local = {
            part: shard_canonical(
                {n: t for n, t in getattr(state, part).items() if n in wanted},
                config,
                groups=self.groups,
            )
            for part in ("weights", *MOMENT_KEYS)
        }
        targets = list(params.items()) + ([("embed.word.weight", tied)] if tied is not None else [])
        for name, param in targets:
            self._set_fp32(param, local["weights"][name])
            for key in MOMENT_KEYS:
                self._set_moment(param, key, local[key][name])
        self.set_adam_step(state.step)

    def _null_step(self) -> None:
        """One step with exactly zero gradients at lr 0: creates Adam's state, changes nothing."""
        shape = (self.config.batch.micro_batch_size, self._seq_len)
        device = next(self.module.parameters()).device
        zeros = torch.zeros(shape, dtype=torch.long, device=device)
        self.module.loss_scale = 0.0
        try:
            self.train_step([(zeros, zeros)] * self.config.batch.grad_accum, lr=0.0)
        finally:
            self.module.loss_scale = 1.0
