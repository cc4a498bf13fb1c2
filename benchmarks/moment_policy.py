"""Which Adam-moment policy should new entries get at a growth event? Measured.

The real trainer (DeepSpeed engine, fp32, one process) trains the demo's model on
the demo's dataset (the standard library corpus, ``make demo``'s cache), grows it
once (hidden 64 -> 96, ffn 128 -> 256, heads 2 -> 3) at step ``--grow-at`` with a
mask ramp, and trains on. Per run, with everything but the policy equal (same
seed, same data order, same weights up to the growth):

- the mean training loss over the steps after growth (the first ``--window``
  steps and all of them to the end), paired across policies: same batches;
- the size of the first updates after growth: mean |delta w| / lr of the new
  entries and of the old entries, over each of the first ``--probe`` steps.

Runs interleave policies inside each (seed, beta2) cell so machine load hits
them alike (it does not matter much here: the figures are losses, not times).

    python benchmarks/moment_policy.py [--seeds 0 1] [--beta2 0.95 0.999]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_msg.demo import demo_config  # noqa: E402
from megatron_msg.demo_corpus import prepare_data  # noqa: E402

POLICIES = ("zero", "mean_sq")


def run_config(
    data: Any, *, policy: str, seed: int, beta2: float, args: argparse.Namespace, run_dir: Path
) -> dict[str, Any]:
    values = demo_config(
        data, run_dir=run_dir, steps_per_stage=args.grow_at, seq_len=64, batch=8, lr=args.lr
    )
    values["growth"] = [
        {
            "start_step": args.grow_at,
            "hidden_size": 96,
            "ffn_hidden_size": 256,
            "num_heads": 3,
            "ramp_steps": args.ramp,
            "moment_policy": policy,
        }
    ]
    values["optimizer"]["betas"] = [0.9, beta2]
    values["lr"] = {"warmup_steps": 20, "decay_style": "cosine", "min_lr": args.lr / 10}
    values["train"].update(steps=args.steps, seed=seed)
    values["data"]["seed"] = seed
    values["logging"] = {"interval": 1, "tensorboard": False, "progress_bar": False}
    values["checkpoint"] = {"interval": 0, "keep": 1, "resume": False}
    return values


def new_entry_masks(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict:
    """True where an entry of a grown tensor is new (old entries are the leading block)."""
    masks = {}
    for name, tensor in after.items():
        new = torch.ones_like(tensor, dtype=torch.bool)
        if name in before:
            new[tuple(slice(0, s) for s in before[name].shape)] = False
        masks[name] = new
    return masks


def update_sizes(
    w0: dict[str, torch.Tensor], w1: dict[str, torch.Tensor], new: dict, lr: float
) -> tuple[float, float]:
    """Mean |delta w| / lr over new entries and over old entries, all tensors together."""
    sums, counts = [0.0, 0.0], [0, 0]
    for name, mask in new.items():
        delta = (w1[name] - w0[name]).abs()
        for i, sel in enumerate((mask, ~mask)):
            sums[i] += float(delta[sel].double().sum())
            counts[i] += int(sel.sum())
    return sums[0] / max(counts[0], 1) / lr, sums[1] / max(counts[1], 1) / lr


def one_run(values: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from megatron_msg.training.config import TrainConfig
    from megatron_msg.training.loop import Trainer

    trainer = Trainer(TrainConfig.from_dict(values))
    try:
        trainer.advance(to=args.grow_at)
        small = trainer.engine.get_state().weights
        event = trainer.maybe_grow()
        assert event is not None
        state = trainer.engine.get_state().weights
        new = new_entry_masks(small, state)
        sizes = []
        for k in range(args.probe):
            lr = trainer.lr.lr_at(trainer.step)
            trainer.advance(to=args.grow_at + k + 1)
            nxt = trainer.engine.get_state().weights
            sizes.append(update_sizes(state, nxt, new, lr))
            state = nxt
        trainer.advance(to=args.steps)
    finally:
        trainer.close()
    losses = trainer.summary.losses
    after = [losses[s] for s in range(args.grow_at + 1, args.steps + 1)]
    return {
        "window": statistics.fmean(after[: args.window]),
        "all": statistics.fmean(after),
        "final": statistics.fmean(after[-10:]),
        "sizes": sizes,
        "rel": abs(event["loss_after"] - event["loss_before"]) / event["loss_before"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--beta2", type=float, nargs="+", default=[0.95, 0.999])
    p.add_argument("--grow-at", type=int, default=100)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--ramp", type=int, default=20)
    p.add_argument("--window", type=int, default=30, help="steps right after growth")
    p.add_argument("--probe", type=int, default=5, help="first updates measured")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data", default="demo_out/data")
    p.add_argument("--out", default="/tmp/moment_policy_runs")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megatron_msg.training.engine import init_distributed

    data = prepare_data(Path(args.data), max_bytes=3_000_000, vocab_size=2048, workers=2)
    init_distributed()
    results: dict[tuple[float, int, str], dict[str, Any]] = {}
    for beta2 in args.beta2:
        for seed in args.seeds:
            for policy in POLICIES if seed % 2 == 0 else POLICIES[::-1]:
                run_dir = Path(args.out) / f"b{beta2}_s{seed}_{policy}"
                values = run_config(
                    data, policy=policy, seed=seed, beta2=beta2, args=args, run_dir=run_dir
                )
                results[beta2, seed, policy] = r = one_run(values, args)
                print(
                    f"beta2 {beta2} seed {seed} {policy:8s} loss after growth: first "
                    f"{args.window} {r['window']:.4f}, all {r['all']:.4f}, last 10 "
                    f"{r['final']:.4f}; growth rel {r['rel']:.1e}; first updates |dw|/lr "
                    f"new/old: " + " ".join(f"{n:.3f}/{o:.3f}" for n, o in r["sizes"]),
                    flush=True,
                )
    report(results, args)
    return 0


def report(results: dict, args: argparse.Namespace) -> None:
    print(
        f"\n| beta2 | seed | policy | mean loss steps {args.grow_at + 1}-"
        f"{args.grow_at + args.window} | mean loss steps {args.grow_at + 1}-{args.steps} | "
        f"new-entry |dw|/lr, first {args.probe} steps | old-entry |dw|/lr |"
    )
    print("|---|---|---|---|---|---|---|")
    for (beta2, seed, policy), r in sorted(results.items()):
        new = " ".join(f"{n:.2f}" for n, _ in r["sizes"])
        old = statistics.fmean(o for _, o in r["sizes"])
        print(
            f"| {beta2} | {seed} | {policy} | {r['window']:.4f} | {r['all']:.4f} | {new} | "
            f"{old:.3f} |"
        )
    for key in ("window", "all"):
        diffs = [
            100 * (results[b, s, "zero"][key] / results[b, s, "mean_sq"][key] - 1)
            for b in args.beta2
            for s in args.seeds
        ]
        print(
            f"zero vs mean_sq, {key}: loss difference per cell (%): "
            + ", ".join(f"{d:+.2f}" for d in diffs)
            + f"; mean {statistics.fmean(diffs):+.2f}%"
        )


if __name__ == "__main__":
    sys.exit(main())
