"""`megatron-msg plot RUN_DIR`: loss against steps and wall time, growth events marked (PNG)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from megatron_msg.training.metrics import read_jsonl


def plot_run(run_dir: str | Path, *, out: str | Path | None = None) -> Path:
    """Draw ``RUN_DIR/metrics.jsonl`` into a PNG (default ``RUN_DIR/loss.png``); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    log = run / "metrics.jsonl"
    if not log.exists():
        raise FileNotFoundError(f"{log} does not exist; is {run} a training run directory?")
    records = read_jsonl(log)
    steps = [r for r in records if r.get("kind") == "step" and r.get("loss") is not None]
    growths = [r for r in records if r.get("kind") == "growth"]
    if not steps:
        raise ValueError(f"{log} holds no logged steps")
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    loss = [r["loss"] for r in steps]
    by_step.plot([r["step"] for r in steps], loss, lw=1.2)
    by_time.plot([r["elapsed"] / 60.0 for r in steps], loss, lw=1.2)
    for event in growths:
        _mark(by_step, event["step"], event)
        _mark(by_time, event["elapsed"] / 60.0, event)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("wall time (min)")
    for axis in (by_step, by_time):
        axis.set_ylabel("training loss")
        axis.grid(alpha=0.3)
    if growths:
        by_step.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{run.name}: loss (growth events dashed)")
    fig.tight_layout()
    target = Path(out) if out is not None else run / "loss.png"
    tmp = target.with_name(f".{target.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(target)
    return target


def _mark(axis: Any, x: float, event: dict[str, Any]) -> None:
    shape = event.get("shape")
    label = f"grow -> {tuple(shape)}" if shape else "growth"
    axis.axvline(x, color="tab:red", ls="--", lw=0.9, alpha=0.8, label=label)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-msg plot", description=__doc__)
    parser.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, out=args.out)
    except FileNotFoundError as err:
        print(f"megatron-msg plot: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
