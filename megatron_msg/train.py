"""`megatron-msg train --config FILE.yaml [key=value ...]` (also `python -m megatron_msg.train`).

Launch one process per device with ``deepspeed`` (hostfile, multi-node) or
``torchrun``; started as a plain process it trains as a world of one. On a
machine without GPUs set ``DS_ACCELERATOR=cpu`` (done here when CUDA is absent)
and the ranks talk over gloo.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_msg.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-msg train", description=__doc__)
    parser.add_argument("--config", default=None, help="run config (YAML); see examples/")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. optimizer.lr=3e-4 growth.0.start_step=200",
    )
    # Set by the deepspeed launcher; the rank comes from the environment anyway.
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_msg.training.accelerator import default_to_cpu_accelerator

    default_to_cpu_accelerator()
    from megatron_msg.training.config import load_config
    from megatron_msg.training.engine import init_distributed
    from megatron_msg.training.loop import TrainingError, train

    try:
        config = load_config(args.config, args.overrides)
        init_distributed()
        summary = train(config)
    except (ConfigError, TrainingError) as err:
        if os.environ.get("RANK", "0") == "0":  # every rank hits it; say it once
            print(f"megatron-msg train: {err}", file=sys.stderr)
        return 1
    if summary.losses and os.environ.get("RANK", "0") == "0":
        last = max(summary.losses)
        print(
            f"done: step {last}, loss {summary.losses[last]:.4f}, checkpoint {summary.last_checkpoint}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
