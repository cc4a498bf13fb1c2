"""`megatron-msg grow` / tools/grow_checkpoint.py: the command line of :mod:`grow_tool`.

    megatron-msg grow --load STAGE_CKPT --save GROWN --target-config next_stage.yaml
    megatron-msg grow --load STAGE_CKPT --save GROWN --hidden 10240 --layers 80 --tp 4

Exit status: 0 grown and verified; 1 bad input or failed verification (a
message names the file or values; nothing is written); 2 bad options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from megatron_msg.checkpoint.canonical import DEFAULT_SHARD_BYTES
from megatron_msg.checkpoint.safetensors_files import CanonicalCheckpointError
from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.grow_tool import (
    DEFAULT_RAMP_STEPS,
    SIZE_OPTIONS,
    GrowOptions,
    grow_checkpoint,
)
from megatron_msg.growth.grow_verify import (
    DEFAULT_MAX_FULL_PARAMS,
    VERIFY_DTYPES,
    VERIFY_MODES,
    GrowthVerificationError,
)
from megatron_msg.growth.operators import DEPTH_STRATEGIES, INIT_SCHEMES
from megatron_msg.growth.optimizer_state import DEFAULT_MOMENT_POLICY, MOMENT_POLICIES
from megatron_msg.growth.plan_config import load_stages

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-msg grow",
        description="Grow a canonical checkpoint (weights, Adam moments and steps) into a larger "
        "shape with MSG: new units behind masks at 0, ramp scheduled, function preserved. "
        "Streams tensor by tensor; the input is never modified.",
    )
    parser.add_argument(
        "--load",
        required=True,
        type=Path,
        help="source: a canonical checkpoint, or a megatron-msg train checkpoint (run "
        "directory, checkpoint directory or tag folder; converted first)",
    )
    parser.add_argument("--tag", help="training checkpoint tag to grow (default: the latest)")
    parser.add_argument("--save", required=True, type=Path, help="where the grown one goes")
    parser.add_argument(
        "--target-config",
        type=Path,
        help="the next stage's training YAML (its model section; its parallel.tp/pp "
        "are checked unless --tp is given)",
    )
    for option, field_name in SIZE_OPTIONS.items():
        parser.add_argument(f"--{option}", type=int, help=f"target {field_name} (no config)")
    parser.add_argument("--init", choices=INIT_SCHEMES, default="normal")
    parser.add_argument("--depth-strategy", choices=DEPTH_STRATEGIES, default="stack")
    parser.add_argument(
        "--moment-policy",
        choices=MOMENT_POLICIES,
        default=DEFAULT_MOMENT_POLICY,
        help="Adam moments of new entries (see megatron_msg.growth.optimizer_state)",
    )
    parser.add_argument(
        "--ramp-steps",
        type=int,
        default=DEFAULT_RAMP_STEPS,
        help="optimizer steps over which the new masks ramp from 0 to 1 (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of new weights and the probe")
    parser.add_argument(
        "--tp",
        type=int,
        help="tensor-parallel size the target must fit (default: the target config's "
        "parallel.tp, else 1)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    parser.add_argument("--no-verify", action="store_true", help="skip the verification gate")
    parser.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="auto",
        help="full models or layer by layer (auto: full below --verify-max-params)",
    )
    parser.add_argument("--verify-max-params", type=int, default=DEFAULT_MAX_FULL_PARAMS)
    parser.add_argument(
        "--verify-dtype",
        choices=tuple(VERIFY_DTYPES),
        default="fp64",
        help="precision of the check (DESIGN.md tolerance: 1e-10 in fp64, 1e-5 in fp32)",
    )
    parser.add_argument(
        "--shard-mb", type=int, default=DEFAULT_SHARD_BYTES >> 20, help="shard file size (MiB)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _options_from_args(args: argparse.Namespace) -> tuple[ModelConfig | None, GrowOptions]:
    target, tp, pp = None, 1, 1
    if args.target_config is not None:
        stage = load_stages(args.target_config)[0]  # the model the next stage starts with
        target, tp, pp = stage.train.model, stage.train.parallel.tp, stage.train.parallel.pp
    options = GrowOptions(
        init=args.init,
        depth_strategy=args.depth_strategy,
        moment_policy=args.moment_policy,
        ramp_steps=args.ramp_steps,
        seed=args.seed,
        tp=tp if args.tp is None else args.tp,
        pp=pp,
        verify="off" if args.no_verify else args.verify,
        verify_dtype=args.verify_dtype,
        max_full_params=args.verify_max_params,
        shard_bytes=args.shard_mb << 20,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        tag=args.tag,
    )
    return target, options


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = {k: getattr(args, k) for k in SIZE_OPTIONS if getattr(args, k) is not None}
    try:
        target, options = _options_from_args(args)
        report = grow_checkpoint(
            load=args.load, save=args.save, target=target, sizes=sizes or None, options=options
        )
    except (
        ConfigError,
        CanonicalCheckpointError,
        GrowthVerificationError,
        OSError,
        yaml.YAMLError,
    ) as err:
        print(f"megatron-msg grow: error: {err}", file=sys.stderr)
        print(f"megatron-msg grow: nothing was written to {args.save}", file=sys.stderr)
        return 1
    print(report)
    return 0
