"""`megatron-msg convert --load RUN_DIR_OR_TAG --save CANONICAL_DIR [--tag TAG] [--overwrite]`.

Turns a checkpoint written by ``megatron-msg train`` (DeepSpeed's native files
at any TP/PP/DP, ZeRO 0/1/2, fp32 or bf16) into a topology-free canonical
checkpoint: fp32 weights, Adam moments and steps, masks and ramp, data
position and LR state. The input is only read; the output appears complete
or not at all.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_msg.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-msg convert", description=__doc__)
    parser.add_argument(
        "--load",
        required=True,
        help="run directory, checkpoint directory (with 'latest') or one tag folder",
    )
    parser.add_argument("--save", required=True, help="canonical checkpoint directory to create")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    parser.add_argument(
        "--shard-gb", type=float, default=4.0, help="safetensors shard size limit in GB"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.shard_gb <= 0:
        print(
            f"megatron-msg convert: --shard-gb must be positive, got {args.shard_gb}",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading files needs no device
    from megatron_msg.checkpoint.deepspeed_io import convert_to_canonical

    try:
        report = convert_to_canonical(
            load=args.load,
            save=args.save,
            tag=args.tag,
            overwrite=args.overwrite,
            shard_bytes=int(args.shard_gb * 1e9),
            progress=not args.quiet,
        )
    except (ConfigError, ValueError) as err:
        print(f"megatron-msg convert: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {report.target}: step {report.step}, stage {report.stage}, "
        f"{report.tensors} tensors, {report.nbytes / 1e6:.1f} MB from {report.source} "
        f"({report.layout}) in {report.seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
