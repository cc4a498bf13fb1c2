"""`megatron-msg` command line: one subcommand per module, imported lazily.

Each subcommand lives in its own module exposing ``main(argv: list[str]) -> int``,
so `megatron-msg --help` stays fast and a missing optional dependency of one
subcommand never breaks the others.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_msg.train", "train a GPT with DeepSpeed, growing it on a schedule"),
    "demo": ("megatron_msg.demo", "grow a small GPT along all four dimensions and report"),
    "preprocess": ("megatron_msg.data.preprocess", "tokenise jsonl into .bin/.idx datasets"),
    "merge-datasets": ("megatron_msg.data.merge", "concatenate indexed datasets"),
    "train-tokenizer": ("megatron_msg.data.train_tokenizer", "train a SentencePiece model"),
    "plot": ("megatron_msg.plot", "draw a run's loss against steps and wall time (PNG)"),
    "export": ("megatron_msg.export.cli", "write a finished model as a Hugging Face checkpoint"),
    "convert": (
        "megatron_msg.checkpoint.convert_cli",
        "write a training (DeepSpeed) checkpoint as a topology-free canonical checkpoint",
    ),
    "plan": (
        "megatron_msg.growth.planner",
        "parameters, FLOPs, memory per GPU, time and growth I/O of stage configs",
    ),
    "schedule-search": (
        "megatron_msg.training.schedule_search_cli",
        "choose growth stages by measuring candidate shapes' loss per second",
    ),
    "grow": (
        "megatron_msg.growth.grow_cli",
        "grow a canonical checkpoint (weights, Adam state) into the next stage's shape",
    ),
}


def _usage() -> str:
    lines = ["usage: megatron-msg <command> [args...]", "", "commands:"]
    width = max(len(name) for name in SUBCOMMANDS)
    for name, (_, summary) in SUBCOMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {summary}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"megatron-msg: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
