"""tokens/s of the trainer (`megatron-msg train`: DeepSpeed engine, TP=1, DP=1, fp32, CPU)
vs the same GPT-2 shape in `transformers` (GPT2LMHeadModel) trained by a plain PyTorch
AdamW loop, side by side in one process, interleaved step by step.

Each "trainer" step is a whole optimizer step of :class:`megatron_msg.training.loop.Trainer`
(its data loading from the dataset, LR schedule, DeepSpeed forward/backward/step with
gradient clipping, loss bookkeeping); each "transformers" step is zero_grad, forward,
backward, clip_grad_norm_(1.0), AdamW step on a batch of the same size. Same shape for
both: LayerNorm, GELU, learned positions, tied embeddings, biases, dropout 0. The
order alternates every round; the ratio is the median of per-round ratios.

    python benchmarks/train_throughput.py [--rounds 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

LAYERS, HIDDEN, HEADS, HEAD_DIM, VOCAB, SEQ, BATCH = 4, 256, 4, 64, 8192, 256, 8

Step = Callable[[], tuple[float, float]]  # one optimizer step: (wall, process CPU) seconds


def trainer_step(run_dir: str, *, steps: int) -> Step:
    from megatron_msg.training.config import TrainConfig
    from megatron_msg.training.loop import Trainer

    values = {
        "model": {
            "vocab_size": VOCAB, "hidden_size": HIDDEN, "ffn_hidden_size": 4 * HIDDEN,
            "num_heads": HEADS, "head_dim": HEAD_DIM, "num_layers": LAYERS, "max_seq_len": SEQ,
            "norm": "layernorm", "activation": "gelu", "position_embedding": "learned",
            "tie_embeddings": True, "use_bias": True, "dropout": 0.0,
        },
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 0},
        "optimizer": {"lr": 1e-4, "weight_decay": 0.1, "clip_grad": 1.0},
        "batch": {"micro_batch_size": BATCH, "global_batch_size": BATCH},
        "data": {"source": "synthetic", "seq_len": SEQ},
        "checkpoint": {"interval": 0, "resume": False},
        "logging": {"interval": 10_000, "tensorboard": False, "progress_bar": False},
        "train": {"steps": steps + 1, "run_dir": run_dir},  # never reaches the final save
    }  # fmt: skip
    trainer = Trainer(TrainConfig.from_dict(values))

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        trainer.advance(to=trainer.step + 1)
        return time.perf_counter() - start, time.process_time() - cpu

    return step


def transformers_step() -> Step:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
        n_inner=4 * HIDDEN, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        opt.zero_grad(set_to_none=True)
        # SEQ positions in, SEQ targets (labels shifted by us, as the trainer's data does).
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - start, time.process_time() - cpu

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_msg.training.engine import init_distributed

    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        steps = {
            "trainer": trainer_step(tmp, steps=args.rounds + args.warmup),
            "transformers": transformers_step(),
        }
        for _ in range(args.warmup):
            for run in steps.values():
                run()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
        for r in range(args.rounds):
            for name in list(steps)[:: 1 if r % 2 == 0 else -1]:
                times[name].append(steps[name]())
    tokens = BATCH * SEQ
    print(
        f"shape: {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads x {HEAD_DIM}, ffn {4 * HIDDEN}, "
        f"vocab {VOCAB}, seq {SEQ}, batch {BATCH}; threads {args.threads}, rounds {args.rounds}"
    )
    for name, ts in times.items():
        wall, cpu = (statistics.median(t[k] for t in ts) for k in (0, 1))
        print(f"{name:13s} median step {wall * 1e3:7.1f} ms wall, {cpu * 1e3:7.1f} ms CPU, "
              f"{tokens / wall:7.0f} tokens/s")  # fmt: skip
    for k, clock in enumerate(("wall", "CPU")):
        pairs = zip(times["trainer"], times["transformers"], strict=True)
        ratios = [b[k] / a[k] for a, b in pairs]
        best = min(t[k] for t in times["transformers"]) / min(t[k] for t in times["trainer"])
        print(
            f"trainer / transformers tokens/s ({clock} time): median of per-round ratios "
            f"{statistics.median(ratios):.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f}); "
            f"best-of {best:.3f}x   (goal >= 1.0)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
