"""Our GPTModel inside a DeepSpeed engine (ZeRO 0/1/2, fp32 or bf16, accumulation, clipping).

What this adds to ``deepspeed.initialize``:

- the DeepSpeed config is generated from the :class:`TrainConfig`;
- DeepSpeed's view of the topology is ours: with tensor parallelism it gets
  an ``mpu`` built from our :class:`ProcessGroups` (``DeepSpeedMPU``), so it
  reduces gradients over our data-parallel group and sums gradient norms over
  our model-parallel group, counting TP-replicated parameters (those without
  ``tensor_model_parallel``) once;
- the full training state (fp32 master weights, Adam ``exp_avg`` /
  ``exp_avg_sq`` and step) goes in and out in *canonical* form, which is what
  growth and topology-free checkpoints work on. Under ZeRO this uses
  DeepSpeed's ``safe_get/set_full_*`` utilities; at ZeRO-0 in fp32 the module
  parameters are the masters and the optimizer is our own AdamW.

Pipeline parallelism is ``PipelineTrainEngine`` (training/pipeline.py), a
subclass with the same public methods; :func:`create_engine` picks the class.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from megatron_msg.config import ConfigError
from megatron_msg.growth.masks import get_masks
from megatron_msg.model import GPTModel, gather_canonical, shard_canonical
from megatron_msg.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.training.config import TrainConfig

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    """Canonical, topology-free training state (full fp32 tensors on CPU)."""

    weights: dict[str, torch.Tensor]  # canonical parameter name -> fp32 master
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int  # Adam's step count (bias correction)
    masks: dict[str, torch.Tensor]  # unfolded masks only


@dataclass(frozen=True)
class StepResult:
    applied: bool  # False: a non-finite gradient norm, the update was skipped
    grad_norm: float | None


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config dict of a resolved :class:`TrainConfig`."""
    b, p = config.batch, config.parallel
    bf16 = config.train.dtype == "bf16"
    # At ZeRO-0 we clip ourselves (DeepSpeed computes that norm but does not report it).
    clip = config.optimizer.clip_grad if p.zero_stage > 0 else 0.0
    return {
        "train_batch_size": b.global_batch_size,
        "train_micro_batch_size_per_gpu": b.micro_batch_size,
        "gradient_accumulation_steps": b.grad_accum,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with Megatron's split: no weight decay on biases and norm weights (1-D tensors)."""
    o = config.optimizer
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=o.betas, eps=o.eps)


def init_distributed() -> None:
    """Initialise torch.distributed once: from the launcher's env (deepspeed, torchrun),
    or as a world of one when started as a plain process. gloo on CPU, nccl on GPU."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _mpu_of(groups: ProcessGroups) -> Any:
    """DeepSpeed's ``mpu`` for our grid (always, so DeepSpeed never guesses a topology).

    DeepSpeed keeps the last ``mpu`` in a module global (``deepspeed.utils.groups.mpu``)
    and only overwrites it when given a new one: a second engine in the same process
    (growth, tests) would otherwise inherit the first engine's topology.
    """
    from deepspeed.utils import groups as ds_groups

    try:
        mpu = groups.deepspeed_mpu()
    except ConfigError:  # ProcessGroups.single(): no process groups at all
        mpu = None
    ds_groups.mpu = mpu
    return mpu


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_engine(model: GPTModel, *, config: TrainConfig, groups: ProcessGroups) -> TrainEngine:
    """The engine for ``config``: :class:`TrainEngine`, or the pipeline engine for pp > 1."""
    if config.parallel.pp > 1:
        from megatron_msg.training.pipeline import PipelineTrainEngine

        return PipelineTrainEngine(model, config=config, groups=groups)
    return TrainEngine(model, config=config, groups=groups)


class TrainEngine:
    """A GPTModel wrapped by DeepSpeed; see the module docstring."""

    def __init__(self, model: GPTModel, *, config: TrainConfig, groups: ProcessGroups) -> None:
        if config.parallel.pp > 1:
            raise ConfigError(
                f"TrainEngine handles pp == 1, got pp={config.parallel.pp} (use create_engine)"
            )
        self.config, self.groups = config, groups
        mpu = _mpu_of(groups)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, config),
            config=deepspeed_config(config),
            mpu=mpu,
            dist_init_required=False,
        )
        self.zero_stage = config.parallel.zero_stage
        self._names = {id(p): n for n, p in self.module.named_parameters()}

    @property
    def module(self) -> GPTModel:
        module = self.engine.module
        assert isinstance(module, GPTModel)
        return module

    @property
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW holding the state (DeepSpeed's ZeRO wraps it around flat partitions)."""
        opt = self.engine.optimizer
        return opt.optimizer if self.zero_stage > 0 else opt

    # ---- training ---------------------------------------------------------

    def train_step(
        self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, lr: float
    ) -> tuple[list[torch.Tensor], StepResult]:
        """One optimizer step over ``grad_accum`` micro-batches of (tokens, labels).

        Returns the detached local loss of each micro-batch and the step result.
        A non-finite loss is back-propagated as NaN on purpose: every rank then
        sees a non-finite gradient norm and skips the same step.
        """
        if len(micro_batches) != self.config.batch.grad_accum:
            raise ValueError(
                f"got {len(micro_batches)} micro-batches for grad_accum "
                f"({self.config.batch.grad_accum})"
            )
        self.engine.train()
        losses = []
        for index, (tokens, labels) in enumerate(micro_batches):
            logits = self.engine(tokens)
            loss = vocab_parallel_cross_entropy(logits, labels, self.groups).mean()
            if not bool(torch.isfinite(loss)):
                loss = loss * float("nan")
            self.engine.backward(loss)
            losses.append(loss.detach().float())
            if index < len(micro_batches) - 1:
                self.engine.step()  # DeepSpeed counts micro-steps; no update here
        return losses, self._boundary_step(lr)

    def _boundary_step(self, lr: float) -> StepResult:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        if self.zero_stage > 0:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            value = None if norm is None else float(norm)
            return StepResult(applied=self.engine.was_step_applied(), grad_norm=value)
        norm_value = self._grad_norm_stage0()
        applied = math.isfinite(norm_value)
        if not applied:
            # torch's AdamW leaves parameters without gradients untouched.
            for param in self.module.parameters():
                param.grad = None
        elif self.config.optimizer.clip_grad > 0:
            coef = min(1.0, self.config.optimizer.clip_grad / (norm_value + 1e-6))
            for param in self.module.parameters():
                if param.grad is not None:
                    param.grad.mul_(coef)
        self.engine.step()
        return StepResult(applied=applied, grad_norm=norm_value)

    def _grad_norm_stage0(self) -> float:
        """Global 2-norm of the (already data-parallel averaged) gradients."""
        total = torch.zeros((), dtype=torch.float64)
        for param in self.module.parameters():
            if param.grad is None:
                continue
            if getattr(param, "tensor_model_parallel", False) or self.groups.tp_rank == 0:
                total += param.grad.detach().double().pow(2).sum().cpu()
        if self.groups.tp_size > 1:
            dist.all_reduce(total, group=self.groups.tp_group)
        return float(total.sqrt())

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean loss of a batch without touching gradients (e.g. a fixed probe batch)."""
        was_training = self.module.training
        self.module.eval()
        try:
            logits = self.module(tokens)
            loss = vocab_parallel_cross_entropy(logits, labels, self.groups).mean()
        finally:
            self.module.train(was_training)
        return float(loss)

    # ---- canonical state --------------------------------------------------

    def get_state(self) -> TrainState:
        """The full canonical training state; collective over TP and DP."""
        config = self.module.config
        if self._optimizer_state_ready():
            self._relink_zero_state()
        local: dict[str, dict[str, torch.Tensor]] = {"weights": {}, **{k: {} for k in MOMENT_KEYS}}
        for name, param in self.module.named_parameters():
            local["weights"][name] = self._get_fp32(param)
            for key in MOMENT_KEYS:
                local[key][name] = self._get_moment(param, key)
        full = {k: gather_canonical(v, config, groups=self.groups) for k, v in local.items()}
        return TrainState(
            weights=full["weights"],
            exp_avg=full["exp_avg"],
            exp_avg_sq=full["exp_avg_sq"],
            step=self.adam_step(),
            masks=get_masks(self.module),
        )

    def set_state(self, state: TrainState) -> None:
        """Load fp32 masters, moments and step of every parameter from canonical tensors.

        The optimizer state must exist (DeepSpeed creates and links it at the first
        step), so a fresh engine first takes one exact no-op step: zero gradients at
        learning rate 0 leave every weight bitwise as it is.
        """
        names = [n for n, _ in self.module.named_parameters()]
        for part, values in (("weights", state.weights), ("exp_avg", state.exp_avg)):
            missing = sorted(set(names) - set(values))
            if missing:
                raise ConfigError(f"training state lacks {part} of {missing[:5]} ({len(missing)})")
        if not self._optimizer_state_ready():
            self._null_step()
        self._relink_zero_state()
        config = self.module.config
        local = {
            "weights": shard_canonical(state.weights, config, groups=self.groups),
            "exp_avg": shard_canonical(state.exp_avg, config, groups=self.groups),
            "exp_avg_sq": shard_canonical(state.exp_avg_sq, config, groups=self.groups),
        }
        for name, param in self.module.named_parameters():
            self._set_fp32(param, local["weights"][name])
            for key in MOMENT_KEYS:
                self._set_moment(param, key, local[key][name])
        self.set_adam_step(state.step)

    def _get_fp32(self, param: torch.nn.Parameter) -> torch.Tensor:
        value = safe_get_full_fp32_param(param) if self.zero_stage > 0 else None
        if value is None:
            value = param.detach()
        return value.detach().to(device="cpu", dtype=torch.float32).clone()

    def _set_fp32(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value.to(param.dtype))  # the module copy, used until the next step
        if self.zero_stage > 0:
            safe_set_full_fp32_param(param, value.to(device=param.device, dtype=torch.float32))

    def _get_moment(self, param: torch.nn.Parameter, key: str) -> torch.Tensor:
        if self.zero_stage > 0:
            ready = self._optimizer_state_ready()
            value = safe_get_full_optimizer_state(param, key) if ready else None
        else:
            value = self._inner_optimizer.state.get(param, {}).get(key)
        if value is None:  # before the first step Adam's moments are zero
            return torch.zeros(param.shape, dtype=torch.float32)
        return value.detach().to(device="cpu", dtype=torch.float32).clone()

    def _set_moment(self, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
        if self.zero_stage > 0:
            safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)
        else:
            self._inner_optimizer.state[param][key].copy_(value)

    def _optimizer_state_ready(self) -> bool:
        ready = all(len(s) > 0 for s in self._inner_optimizer.state.values())
        return ready and len(self._inner_optimizer.state) > 0

    def _relink_zero_state(self) -> None:
        """Point every parameter's ZeRO fragment at the current Adam state tensors.

        DeepSpeed 0.19 links them once, right after the *first* param group's first
        step, so with two groups (decay / no decay) the second group's parameters
        are left without ``exp_avg``; a checkpoint load also replaces the state
        tensors. Re-linking is cheap (views only) and makes safe_*_optimizer_state
        see the live state.
        """
        zero = self.engine.optimizer
        if self.zero_stage > 0 and hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def adam_step(self) -> int:
        steps = [int(s["step"]) for s in self._inner_optimizer.state.values() if "step" in s]
        return max(steps, default=0)

    def set_adam_step(self, step: int) -> None:
        for state in self._inner_optimizer.state.values():
            if "step" in state:
                state["step"].fill_(float(step))

    def _null_step(self) -> None:
        """One optimizer step with zero gradients at lr 0 (creates Adam's state, changes nothing)."""
        device = next(self.module.parameters()).device
        tokens = torch.zeros((1, 1), dtype=torch.long, device=device)
        for index in range(self.config.batch.grad_accum):
            logits = self.engine(tokens)
            self.engine.backward(logits.float().sum() * 0.0)
            if index < self.config.batch.grad_accum - 1:
                self.engine.step()
        self._boundary_step(0.0)

    # ---- native checkpoints -----------------------------------------------

    def save_native(self, directory: str, *, tag: str) -> None:
        """DeepSpeed's own save (each rank writes its shard); no ``latest`` file."""
        self.engine.save_checkpoint(directory, tag=tag, save_latest=False)

    def load_native(self, directory: str, *, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(
            directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {directory}")

    def destroy(self) -> None:
        """Release the engine (before building the next one at a growth event)."""
        destroy = getattr(self.engine, "destroy", None)
        if callable(destroy):
            destroy()
