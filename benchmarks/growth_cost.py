"""What a growth event costs: seconds of wall (and CPU) time lost, as a fraction of one
stage's training time, for the demo's schedule (``make demo``: (64,128,2,2) ->
hidden+ffn (96,256,2,2) -> heads (96,256,3,2) -> layers (96,256,3,4)).

The real trainer runs the demo's config in this process; the loop here calls
``Trainer.maybe_grow`` and ``Trainer.advance`` itself so each is timed alone:

- growth: the whole ``maybe_grow`` (probe loss before, canonical state out of the
  engine, growth operators, moment policy, new DeepSpeed engine, state in, probe
  loss after);
- after-growth warm-up: the first 3 steps of the new stage minus 3 median steps
  of that stage (first-touch allocations, new engine's first step);
- stage time: the sum of the stage's step times.

    python benchmarks/growth_cost.py [--steps-per-stage 250] [--data demo_out/data]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_msg.demo import demo_config
from megatron_msg.demo_corpus import prepare_data

WARM = 3  # steps after a growth counted as its warm-up


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps-per-stage", type=int, default=250)
    p.add_argument("--data", default="demo_out/data")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megatron_msg.training.config import TrainConfig
    from megatron_msg.training.engine import init_distributed
    from megatron_msg.training.loop import Trainer

    data = prepare_data(Path(args.data), max_bytes=3_000_000, vocab_size=2048, workers=2)
    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        values = demo_config(
            data, run_dir=Path(tmp), steps_per_stage=args.steps_per_stage, seq_len=128,
            batch=8, lr=3e-3,
        )  # fmt: skip
        values["logging"].update(progress_bar=False)
        values["checkpoint"].update(interval=0, resume=False)
        trainer = Trainer(TrainConfig.from_dict(values))
        steps: dict[int, list[tuple[float, float]]] = {}
        growths: dict[int, tuple[float, float]] = {}
        try:
            total = trainer.config.train.steps
            for step in range(total - 1):  # the last step would also save a checkpoint
                if trainer.config.stage_at(trainer.step) > trainer.stage:
                    start = clocks()
                    trainer.maybe_grow()
                    growths[trainer.stage] = since(start)
                start = clocks()
                trainer.advance(to=step + 1)
                steps.setdefault(trainer.stage, []).append(since(start))
        finally:
            trainer.close()
    report(steps, growths, args.steps_per_stage)
    return 0


def report(
    steps: dict[int, list[tuple[float, float]]],
    growths: dict[int, tuple[float, float]],
    per_stage: int,
) -> None:
    print(f"demo schedule, {per_stage} steps per stage; seconds (wall / CPU)")
    print("| growth into stage | growth event | warm-up excess | stage time | lost / stage time |")
    print("|---|---|---|---|---|")
    for stage, grow in sorted(growths.items()):
        times = steps[stage]
        cells = []
        for k in (0, 1):
            median = statistics.median(t[k] for t in times)
            warm = sum(t[k] for t in times[:WARM]) - WARM * median
            stage_time = sum(t[k] for t in times)
            cells.append((grow[k], warm, stage_time, (grow[k] + max(warm, 0.0)) / stage_time))
        (gw, ww, sw, fw), (gc, wc, sc, fc) = cells
        print(
            f"| {stage} | {gw:.2f} / {gc:.2f} | {ww:+.2f} / {wc:+.2f} | {sw:.1f} / {sc:.1f} | "
            f"{100 * fw:.2f}% / {100 * fc:.2f}% |"
        )


if __name__ == "__main__":
    sys.exit(main())
