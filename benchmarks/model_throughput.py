"""Training-step throughput of our GPT at TP=1 vs transformers' GPT2LMHeadModel,
and the cost of active MSG masks vs the same model with masks folded.

All models train side by side in one process, interleaved step by step (the
order rotates every round), so machine noise hits them alike; ratios are the
median of per-round time ratios. Same shape for all: 6 layers, hidden 384,
6 heads of 64, ffn 1536, vocab 8192, seq 256, batch 8, AdamW, fp32, dropout 0.

    python benchmarks/model_throughput.py [--rounds 8] [--threads 2]

Our model runs with the PyTorch reference masked norms and, when the fused
kernel is built, also with it (``MEGATRON_MSG_NORM_IMPL`` switched per step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.growth.masks import set_masks
from megatron_msg.model import GPTModel
from megatron_msg.ops import fused_norm_available
from megatron_msg.ops._dispatch import ENV_VAR
from megatron_msg.parallel.groups import ProcessGroups

LAYERS, HIDDEN, HEADS, HEAD_DIM, VOCAB, SEQ, BATCH = 6, 384, 6, 64, 8192, 256, 8

# One training step; returns (wall seconds, process CPU seconds).
Step = Callable[[], tuple[float, float]]


def our_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_hidden_size=4 * HIDDEN,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_layers=LAYERS,
        max_seq_len=SEQ,
    )


def active_masks(config: ModelConfig) -> dict[str, torch.Tensor | float]:
    """All four kinds unfolded at fractional values, as midway through a ramp."""
    gen = torch.Generator().manual_seed(0)
    masks: dict[str, torch.Tensor | float] = {
        "masks.hidden": 0.5 + 0.5 * torch.rand(config.hidden_size, generator=gen)
    }
    for i in range(config.num_layers):
        masks[f"layers.{i}.masks.heads"] = 0.5 + 0.5 * torch.rand(config.num_heads, generator=gen)
        masks[f"layers.{i}.masks.ffn"] = 0.5 + 0.5 * torch.rand(
            config.ffn_hidden_size, generator=gen
        )
        masks[f"layers.{i}.masks.depth"] = 0.75
    return masks


def ours(*, masked: bool, norm_impl: str) -> Step:
    """Our model; ``norm_impl`` ("reference" or "auto") picks the masked-norm path."""
    config = our_config()
    model = GPTModel(config, groups=ProcessGroups.single(), init_seed=0)
    if masked:
        set_masks(model, active_masks(config))
    step = _trainer(lambda tokens: model.loss(tokens[:, :-1], tokens[:, 1:]), model)

    def run() -> tuple[float, float]:
        os.environ[ENV_VAR] = norm_impl  # read by megatron_msg.ops on every call
        return step()

    return run


def gpt2() -> Step:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=4 * HIDDEN,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    # Both run SEQ positions through the model; GPT-2 shifts labels inside (SEQ-1 targets).
    return _trainer(lambda t: model(input_ids=t[:, :-1], labels=t[:, :-1]).loss, model)


def _trainer(loss_fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module) -> Step:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)

    def step() -> tuple[float, float]:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        start, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss_fn(tokens).backward()
        opt.step()
        return time.perf_counter() - start, time.process_time() - cpu

    return step


def measure(
    steps: dict[str, Step], *, rounds: int, warmup: int
) -> dict[str, list[tuple[float, float]]]:
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(steps[name]())
    return times


def ratio(times: dict[str, list[tuple[float, float]]], slow: str, fast: str, clock: int) -> float:
    """Median over rounds of time(slow) / time(fast); clock 0 = wall, 1 = process CPU."""
    return statistics.median(a[clock] / b[clock] for a, b in zip(times[slow], times[fast]))


def best_ratio(times: dict[str, list[tuple[float, float]]], slow: str, fast: str) -> float:
    """min CPU time(slow) / min CPU time(fast): the least-disturbed step of each."""
    return min(t[1] for t in times[slow]) / min(t[1] for t in times[fast])


def _report(times: dict[str, list[tuple[float, float]]], fused: bool) -> None:
    tokens = BATCH * SEQ
    for name, ts in times.items():
        wall = statistics.median(t[0] for t in ts)
        cpu = statistics.median(t[1] for t in ts)
        print(f"{name:18s} median step {wall * 1e3:8.1f} ms wall ({cpu * 1e3:8.1f} ms CPU)  "
              f"{tokens / wall:7.0f} tokens/s")  # fmt: skip
    print("ratios: median of per-round ratios (wall, CPU time), and best-of CPU time")
    pairs = [("ours (reference norms) vs gpt2 speed", "gpt2", "ours_folded", 0.0)]
    pairs.append(("active-mask overhead, reference norms", "ours_masked", "ours_folded", 1.0))
    if fused:
        pairs.append(("ours (fused norms) vs gpt2 speed", "gpt2", "ours_folded_fused", 0.0))
        pairs.append(("active-mask overhead, fused norms", "ours_masked_fused", "ours_folded_fused", 1.0))  # fmt: skip
    for label, slow, fast, offset in pairs:
        wall, cpu = (ratio(times, slow, fast, clock) - offset for clock in (0, 1))
        best = best_ratio(times, slow, fast) - offset
        if offset:
            print(f"  {label:40s} {100 * wall:+6.1f}% {100 * cpu:+6.1f}% {100 * best:+6.1f}%"
                  "   (goal < 15%)")  # fmt: skip
        else:
            print(f"  {label:40s} {wall:6.3f}x {cpu:6.3f}x {best:6.3f}x   (goal >= 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fused = fused_norm_available("cpu", torch.float32)
    steps = {
        "gpt2": gpt2(),
        "ours_folded": ours(masked=False, norm_impl="reference"),
        "ours_masked": ours(masked=True, norm_impl="reference"),
    }
    if fused:
        steps["ours_folded_fused"] = ours(masked=False, norm_impl="auto")
        steps["ours_masked_fused"] = ours(masked=True, norm_impl="auto")
    times = measure(steps, rounds=args.rounds, warmup=args.warmup)
    print(f"threads={args.threads} rounds={args.rounds} fused norm kernel built: {fused}")
    _report(times, fused)


if __name__ == "__main__":
    main()
