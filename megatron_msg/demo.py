"""`megatron-msg demo` (`make demo`): the embedded default, end to end, on CPU.

No download, nothing to configure:

1. **data** (``demo_corpus.py``): the Python standard library's modules (source,
   docstrings, comments) become a jsonl corpus of a few MB; the project's data
   tools train a SentencePiece BPE tokenizer on it and preprocess it, with
   parallel workers, into an indexed dataset (.bin/.idx). Cached under
   ``OUT/data`` and reused by later runs.
2. **training**: the real trainer (``megatron-msg train``: DeepSpeed engine,
   fp32, one process) trains a tiny GPT that grows three times during the run,
   covering all four dimensions:

       stage 0  (h, f, n, L) = ( 64, 128, 2, 2)
       stage 1  hidden + FFN  ( 96, 256, 2, 2)
       stage 2  heads         ( 96, 256, 3, 2)
       stage 3  layers        ( 96, 256, 3, 4)

   Each growth adds units behind masks at 0 (the probe loss right after equals
   the loss right before), then ramps the masks to 1 while training goes on.
   The run is retrained from scratch each time (``OUT/run`` is replaced).
3. **report**: a table per stage (shape, parameters, probe loss before/after
   its growth, training loss at the stage's start and end, tokens/s) and the
   loss plot ``OUT/run/loss.png`` (``megatron-msg plot``).

Exit status 1 if a growth changed the probe loss by more than the fp32
tolerance or the loss did not fall.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_msg.demo_corpus import DemoData, prepare_data

BASE = (64, 128, 2, 2)  # (hidden, ffn, heads, layers); head_dim 32
GROWTH = [  # one or two dimensions at a time, so every kind of growth shows in the table
    {"hidden_size": 96, "ffn_hidden_size": 256},
    {"num_heads": 3},
    {"num_layers": 4},
]
PRESERVE_RTOL = 1e-5  # DESIGN.md: fp32 function preservation, relative


@dataclass(frozen=True)
class StageRow:
    stage: int
    shape: tuple[int, int, int, int]
    params: int
    start_step: int
    probe_before: float | None  # probe loss of the smaller model just before this growth
    probe_after: float | None  # the grown model's, right after
    first_loss: float  # training loss of the stage's first logged step
    last_loss: float  # ... and of its last
    tokens_per_s: float  # mean over the stage's logged steps
    grow_seconds: float


def demo_config(
    data: DemoData, *, run_dir: Path, steps_per_stage: int, seq_len: int, batch: int, lr: float
) -> dict[str, Any]:
    """The run's config as the dict a YAML file would hold (written to run_dir/config.yaml)."""
    h, f, n, layers = BASE
    ramp = max(1, steps_per_stage // 3)
    total = steps_per_stage * (len(GROWTH) + 1)
    return {
        "model": {
            "vocab_size": data.vocab_size, "hidden_size": h, "ffn_hidden_size": f,
            "num_heads": n, "head_dim": 32, "num_layers": layers, "max_seq_len": seq_len,
            "norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
            "use_bias": False,
        },
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 0},
        "optimizer": {"lr": lr, "betas": [0.9, 0.95], "weight_decay": 0.01, "clip_grad": 1.0},
        "lr": {"warmup_steps": max(1, total // 20), "decay_style": "cosine", "min_lr": lr / 10},
        "batch": {"micro_batch_size": batch, "global_batch_size": batch},
        "data": {"source": "indexed", "prefixes": [str(data.prefix)], "split": "98,2,0",
                 "seq_len": seq_len, "seed": 1234},
        "growth": [
            {"start_step": steps_per_stage * (i + 1), "ramp_steps": ramp, **grow}
            for i, grow in enumerate(GROWTH)
        ],
        "checkpoint": {"interval": 0, "keep": 1},
        "logging": {"interval": max(1, steps_per_stage // 10), "tensorboard": False},
        "train": {"steps": total, "seed": 1234, "run_dir": str(run_dir)},
    }  # fmt: skip


def train_run(values: dict[str, Any]) -> Any:
    """Train with the real trainer in this process (a world of one); returns its RunSummary."""
    from megatron_msg.training.accelerator import default_to_cpu_accelerator

    default_to_cpu_accelerator()
    from megatron_msg.training.config import TrainConfig
    from megatron_msg.training.engine import init_distributed
    from megatron_msg.training.loop import train

    config = TrainConfig.from_dict(values)
    init_distributed()
    return train(config)


def stage_rows(config: dict[str, Any], records: list[dict[str, Any]]) -> list[StageRow]:
    """One row per stage from the run's metrics.jsonl records."""
    from megatron_msg.growth.planner import count_parameters
    from megatron_msg.training.config import TrainConfig

    models = TrainConfig.from_dict(config).stage_models()
    growths = {r["stage"]: r for r in records if r.get("kind") == "growth"}
    rows = []
    for stage, model in enumerate(models):
        steps = [r for r in records if r.get("kind") == "step" and r["stage"] == stage]
        if not steps:
            raise RuntimeError(f"the run logged no steps for stage {stage}")
        event = growths.get(stage, {})
        rows.append(
            StageRow(
                stage=stage,
                shape=(model.hidden_size, model.ffn_hidden_size, model.num_heads, model.num_layers),
                params=count_parameters(model),
                start_step=event.get("step", 0),
                probe_before=event.get("loss_before"),
                probe_after=event.get("loss_after"),
                first_loss=steps[0]["loss"],
                last_loss=steps[-1]["loss"],
                tokens_per_s=sum(r["tokens_per_s"] for r in steps) / len(steps),
                grow_seconds=event.get("seconds", 0.0),
            )
        )
    return rows


def format_table(rows: list[StageRow]) -> str:
    header = (
        f"{'stage':>5}  {'(h, f, n, L)':<18}{'params':>10}  {'step':>5}  {'probe before':>12}  "
        f"{'probe after':>12}  {'loss first':>10}  {'loss last':>9}  {'tokens/s':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        before = "-" if r.probe_before is None else f"{r.probe_before:.6f}"
        after = "-" if r.probe_after is None else f"{r.probe_after:.6f}"
        lines.append(
            f"{r.stage:>5}  {r.shape!s:<18}{r.params:>10,}  {r.start_step:>5}  {before:>12}  "
            f"{after:>12}  {r.first_loss:>10.4f}  {r.last_loss:>9.4f}  {r.tokens_per_s:>8.0f}"
        )
    return "\n".join(lines)


def verdict(rows: list[StageRow]) -> tuple[bool, str]:
    """Every growth preserved the probe loss, and the loss fell over the run."""
    worst = max(
        abs(r.probe_after - r.probe_before) / abs(r.probe_before)
        for r in rows
        if r.probe_before is not None and r.probe_after is not None
    )
    fell = rows[-1].last_loss < rows[0].first_loss
    ok = worst <= PRESERVE_RTOL and fell
    text = (
        f"growth {'preserved' if worst <= PRESERVE_RTOL else 'DID NOT preserve'} the loss "
        f"(worst relative change {worst:.1e}, tolerance {PRESERVE_RTOL:.0e}); loss "
        f"{rows[0].first_loss:.3f} -> {rows[-1].last_loss:.3f}"
        f"{'' if fell else ' (DID NOT FALL)'}"
    )
    return ok, text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-msg demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--steps-per-stage", type=int, default=250, help="optimizer steps per stage")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=2048,
        help="SentencePiece pieces (256 of them are byte fallbacks)",
    )
    p.add_argument("--corpus-mb", type=float, default=3.0, help="corpus size cap (MB of text)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer/preprocessing workers")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    minimum = {"steps_per_stage": 3, "seq_len": 8, "batch": 1, "lr": 1e-9, "vocab_size": 384,
               "corpus_mb": 0.01, "workers": 1}  # fmt: skip
    bad = {k: getattr(args, k) for k, low in minimum.items() if not getattr(args, k) >= low}
    if bad:
        parser.error(f"values too small: {bad} (minimum {[minimum[k] for k in bad]})")
    start = time.perf_counter()
    out = Path(args.out)
    data = prepare_data(
        out / "data",
        max_bytes=int(args.corpus_mb * 1e6),
        vocab_size=args.vocab_size,
        workers=args.workers,
    )
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # retrain from scratch; the data cache stays
    config = demo_config(
        data, run_dir=run_dir, steps_per_stage=args.steps_per_stage, seq_len=args.seq_len,
        batch=args.batch, lr=args.lr,
    )  # fmt: skip
    train_run(config)
    from megatron_msg.plot import plot_run
    from megatron_msg.training.metrics import read_jsonl

    rows = stage_rows(config, read_jsonl(run_dir / "metrics.jsonl"))
    plot = plot_run(run_dir)
    ok, text = verdict(rows)
    print()
    print(format_table(rows))
    print(f"\n{text}")
    print(f"plot: {plot}   total time {time.perf_counter() - start:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
