"""`megatron-msg demo`: grow a small GPT along all four dimensions while it trains.

A short, readable tour of Masked Structural Growth on CPU (well under a minute):

1. build a tiny GPT and train it a few dozen AdamW steps on a synthetic but
   learnable token stream (a fixed random Markov chain: each token has a few
   likely successors, so the loss can fall from ln(V) towards the chain's
   entropy);
2. grow it (hidden + FFN, then heads + layers, then all four at once): the
   canonical state goes through ``growth.grow`` and the optimizer's Adam
   moments through ``growth.carry_over``; the new units sit behind masks at 0,
   so the grown model's logits and loss equal the small model's (the table
   shows max |delta logits| against the fp32 tolerance of 1e-5);
3. ramp the new masks linearly to 1 over some optimizer steps while training
   on, and repeat.

Exit status 1 if any growth was not function-preserving.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.growth.masks import MaskRamp, present_masks
from megatron_msg.growth.operators import GrowthMaps, carry_over, grow
from megatron_msg.growth.verify import TOLERANCES, PreservationReport, measure_preservation
from megatron_msg.model.gpt import GPTModel
from megatron_msg.parallel.groups import ProcessGroups

VOCAB, SEQ, BATCH, SUCCESSORS = 64, 32, 16, 3
# (hidden, ffn, heads, layers) per stage: hidden + ffn, heads + layers, then all four.
STAGES = [(32, 64, 2, 2), (48, 128, 2, 2), (48, 128, 4, 4), (64, 192, 6, 5)]


@dataclass(frozen=True)
class StageReport:
    stage: int
    shape: tuple[int, int, int, int]  # (h, f, n, L)
    params: int
    loss_before: float  # small model on the eval batch, just before growth
    loss_after: float  # grown model, same batch, right after growth
    max_abs_logits: float  # max |delta logits| between the two
    trained_loss: float  # eval loss after this stage's training


class MarkovStream:
    """Token sequences from a fixed random Markov chain over ``VOCAB`` tokens."""

    def __init__(self, *, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        weights = torch.zeros(VOCAB, VOCAB)
        for token in range(VOCAB):
            successors = torch.randperm(VOCAB, generator=gen)[:SUCCESSORS]
            weights[token, successors] = torch.rand(SUCCESSORS, generator=gen) + 0.2
        self.transition = weights / weights.sum(dim=1, keepdim=True)
        self.gen = gen

    def entropy(self) -> float:
        """Mean next-token entropy (nats, uniform over states): roughly the best loss reachable."""
        p = self.transition
        return float(-(p * p.clamp_min(1e-12).log()).sum(dim=1).mean())

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, labels)``, each [BATCH, SEQ]; labels are the next tokens."""
        seq = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=self.gen)
        for t in range(SEQ):
            seq[:, t + 1] = torch.multinomial(self.transition[seq[:, t]], 1, generator=self.gen)[
                :, 0
            ]
        return seq[:, :-1], seq[:, 1:]


def stage_config(shape: tuple[int, int, int, int]) -> ModelConfig:
    h, f, n, layers = shape
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=h,
        ffn_hidden_size=f,
        num_heads=n,
        num_layers=layers,
        head_dim=16,
        max_seq_len=SEQ,
        norm="rmsnorm",
        activation="swiglu",
        position_embedding="rope",
    )


def make_optimizer(model: GPTModel, *, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)


def carry_optimizer(
    old_model: GPTModel,
    old_opt: torch.optim.AdamW,
    new_model: GPTModel,
    maps: GrowthMaps,
    *,
    lr: float,
) -> torch.optim.AdamW:
    """A new AdamW for ``new_model`` holding the old moments at the old entries.

    New entries start with zero moments and the source tensor's step count (the
    MSG reference policy; brand-new tensors start fresh).
    """
    names = {id(p): n for n, p in old_model.named_parameters()}
    moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    steps: dict[str, torch.Tensor] = {}
    for param, state in old_opt.state.items():
        name = names[id(param)]
        steps[name] = state["step"]
        for key, table in moments.items():
            table[name] = state[key]
    carried = {key: carry_over(table, maps, fill=0.0) for key, table in moments.items()}
    new_opt = make_optimizer(new_model, lr=lr)
    for name, param in new_model.named_parameters():
        source = maps.tensors[name].source
        if source is None or source not in steps:
            continue
        new_opt.state[param] = {
            "step": steps[source].clone(),
            "exp_avg": carried["exp_avg"][name],
            "exp_avg_sq": carried["exp_avg_sq"][name],
        }
    return new_opt


@torch.no_grad()
def eval_loss(model: GPTModel, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    loss = model.loss(*batch).item()
    model.train()
    return loss


def train(
    model: GPTModel,
    opt: torch.optim.AdamW,
    data: MarkovStream,
    *,
    steps: int,
    ramp: MaskRamp | None,
    log_every: int,
) -> None:
    for step in range(1, steps + 1):
        loss = model.loss(*data.batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ramp is not None:
            ramp.step(model)  # once per optimizer step
        if log_every and (step % log_every == 0 or step == steps):
            ramping = (
                ""
                if ramp is None or ramp.done
                else f"  masks at {ramp.steps_done}/{ramp.ramp_steps}"
            )
            print(f"    step {step:4d}  train loss {loss.item():.4f}{ramping}")


def param_count(model: GPTModel) -> int:
    return sum(p.numel() for p in model.parameters())


def grow_model(
    model: GPTModel,
    opt: torch.optim.AdamW,
    new_config: ModelConfig,
    *,
    seed: int,
    eval_batch: tuple[torch.Tensor, torch.Tensor],
    lr: float,
) -> tuple[GPTModel, torch.optim.AdamW, PreservationReport]:
    """Grow through canonical space: weights via ``grow``, Adam moments via its maps."""
    small_state = model.to_canonical()
    result = grow(small_state, model.config, new_config, depth_strategy="stack", seed=seed)
    tokens, labels = eval_batch
    check = measure_preservation(
        small_state, model.config, result.state, new_config, tokens=tokens, labels=labels
    )
    grown = GPTModel.from_canonical(result.state, new_config, groups=model.groups).train()
    return grown, carry_optimizer(model, opt, grown, result.maps, lr=lr), check


def run_demo(
    *, steps: int, ramp_steps: int, seed: int, lr: float = 3e-3, log_every: int = 20
) -> list[StageReport]:
    """Train, grow, ramp, repeat; returns one report per stage (stage 0 has no growth)."""
    torch.manual_seed(seed)
    data = MarkovStream(seed=seed)
    eval_batch = data.batch()
    model = GPTModel(stage_config(STAGES[0]), groups=ProcessGroups.single(), init_seed=seed)
    opt = make_optimizer(model, lr=lr)
    print(
        f"MSG demo: Markov-chain tokens, vocab {VOCAB}, entropy {data.entropy():.3f} nats "
        f"(uniform: {math.log(VOCAB):.3f})"
    )
    loss0 = eval_loss(model, eval_batch)
    print(f"stage 0 {STAGES[0]}: {param_count(model):,} params, eval loss {loss0:.4f}")
    train(model, opt, data, steps=steps, ramp=None, log_every=log_every)
    trained = eval_loss(model, eval_batch)
    reports = [StageReport(0, STAGES[0], param_count(model), loss0, loss0, 0.0, trained)]
    for stage, shape in enumerate(STAGES[1:], start=1):
        model, opt, check = grow_model(
            model, opt, stage_config(shape), seed=seed + stage, eval_batch=eval_batch, lr=lr
        )
        ramp = MaskRamp.from_model(model, ramp_steps=ramp_steps)
        masks = len(present_masks(model))
        print(f"stage {stage} {shape}: grown; {masks} masks ramp to 1 over {ramp_steps} steps")
        train(model, opt, data, steps=steps, ramp=ramp, log_every=log_every)
        trained = eval_loss(model, eval_batch)
        reports.append(
            StageReport(
                stage=stage,
                shape=shape,
                params=param_count(model),
                loss_before=check.loss_small,
                loss_after=check.loss_big,
                max_abs_logits=check.max_abs_logits,
                trained_loss=trained,
            )
        )
    return reports


def format_table(reports: list[StageReport]) -> str:
    header = (
        f"{'stage':>5}  {'(h, f, n, L)':<18}{'params':>9}  {'loss before':>11}  "
        f"{'loss after':>10}  {'max|dlogits|':>12}  {'trained loss':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in reports:
        if r.stage == 0:  # the initial model: nothing grown yet
            before = after = delta = "-"
        else:
            before, after = f"{r.loss_before:.6f}", f"{r.loss_after:.6f}"
            delta = f"{r.max_abs_logits:.2e}"
        lines.append(
            f"{r.stage:>5}  {r.shape!s:<18}{r.params:>9,}  {before:>11}  "
            f"{after:>10}  {delta:>12}  {r.trained_loss:>12.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-msg demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="AdamW steps per stage (default 60)")
    parser.add_argument(
        "--ramp-steps", type=int, default=20, help="optimizer steps for masks 0 -> 1"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.ramp_steps < 1:
        parser.error(f"--steps ({args.steps}) and --ramp-steps ({args.ramp_steps}) must be >= 1")
    reports = run_demo(steps=args.steps, ramp_steps=args.ramp_steps, seed=args.seed, lr=args.lr)
    tolerance = TOLERANCES[torch.float32]
    print()
    print(format_table(reports))
    worst = max(max(r.max_abs_logits, abs(r.loss_after - r.loss_before)) for r in reports)
    verdict = "function-preserving" if worst <= tolerance else "NOT function-preserving"
    print(f"\nevery growth {verdict}: worst |delta| {worst:.2e} (fp32 tolerance {tolerance:.0e})")
    return 0 if worst <= tolerance else 1
