"""Growth inside a run: canonical state out of the engine, grow, a new engine, state back in.

Old entries keep their fp32 master weights, Adam moments and Adam step exactly;
new entries get the operator's init and a *moment policy* (``zero``, the
default, or ``mean_sq``). The policies, the default (``DEFAULT_MOMENT_POLICY``,
shared with the offline growth tool) and the measurement that chose it are
documented in ``growth/optimizer_state.py``; the figures are in
benchmarks/RESULTS.md (``benchmarks/moment_policy.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.growth.masks import MaskRamp
from megatron_msg.growth.net2net import net2net_grow
from megatron_msg.growth.operators import grow
from megatron_msg.growth.optimizer_state import carry_moments
from megatron_msg.model import GPTModel
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.training.config import GrowthStage, TrainConfig
from megatron_msg.training.engine import TrainEngine, TrainState, create_engine


@dataclass
class GrowthOutcome:
    engine: TrainEngine
    ramp: MaskRamp
    seconds: float


def grow_engine(
    engine: TrainEngine,
    *,
    config: TrainConfig,
    stage: GrowthStage,
    new_model: ModelConfig,
    groups: ProcessGroups,
    seed: int,
) -> GrowthOutcome:
    """Replace ``engine`` by one holding the grown model; collective over all ranks.

    ``config`` is the run's config; its ``model`` is replaced by ``new_model``
    for the new engine. The caller must drop its reference to the old engine.
    """
    start = time.perf_counter()
    old_model = engine.module.config
    state = engine.get_state()
    operator = net2net_grow if stage.operator == "net2net" else grow
    result = operator(
        {**state.weights, **state.masks},
        old_model,
        new_model,
        init=stage.init,
        depth_strategy=stage.depth_strategy,
        seed=seed,
        tp_size=groups.tp_size,
    )
    exp_avg, exp_avg_sq = carry_moments(
        state.exp_avg, state.exp_avg_sq, result.maps, policy=stage.moment_policy
    )
    grown = TrainState(
        weights={n: t for n, t in result.state.items() if n in exp_avg},
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        step=state.step,
        masks={n: t for n, t in result.state.items() if n not in exp_avg},
    )
    device = next(engine.module.parameters()).device
    engine.destroy()
    del engine, state  # the old engine's memory can go before the new one is built
    dtype = torch.bfloat16 if config.train.dtype == "bf16" else torch.float32
    model = GPTModel.from_canonical(
        result.state, new_model, groups=groups, dtype=dtype, device=device
    )
    new_engine = create_engine(model, config=_with_model(config, new_model), groups=groups)
    new_engine.set_state(grown)
    ramp = MaskRamp.from_model(new_engine.module, ramp_steps=max(1, stage.ramp_steps))
    if stage.ramp_steps == 0:
        # The "No Mask" ablation (MSG paper): the new units are switched fully on at
        # once, so the grown model no longer computes what the small one did. (The
        # net2net operator builds no masks: this only marks its empty ramp done.)
        ramp.steps_done = ramp.ramp_steps
        ramp.apply(new_engine.module)  # done: every mask is 1, i.e. folded away
    return GrowthOutcome(engine=new_engine, ramp=ramp, seconds=time.perf_counter() - start)


def _with_model(config: TrainConfig, model: ModelConfig) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(config, model=model)
