"""`megatron-msg export`: write a finished model as a Hugging Face checkpoint.

    megatron-msg export --load CKPT --out DIR --format hf [--tokenizer-model SPM.model]

CKPT is a canonical checkpoint directory (meta.json, index.json, safetensors
shards). The result loads with ``AutoModelForCausalLM.from_pretrained(DIR)``
(and ``AutoTokenizer`` when a tokenizer model is given), offline.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from megatron_msg.checkpoint.safetensors_files import CanonicalCheckpointError
from megatron_msg.config import ConfigError
from megatron_msg.export.convert import export_hf
from megatron_msg.export.tokenizer import TOKENIZER_TYPES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-msg export",
        description="write a finished model as a Hugging Face checkpoint",
    )
    p.add_argument("--load", required=True, help="canonical checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--format", required=True, choices=["hf"], help="output format")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model to export with it")
    p.add_argument("--tokenizer-type", default=TOKENIZER_TYPES[0], choices=TOKENIZER_TYPES)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        print(
            f"megatron-msg export: error: {args.out} exists; pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 1
    try:
        report = export_hf(
            load=args.load,
            out=args.out,
            tokenizer_model=args.tokenizer_model,
            tokenizer_type=args.tokenizer_type,
            dtype=DTYPES[args.dtype],
            overwrite=args.overwrite,
        )
    except (ConfigError, CanonicalCheckpointError, ValueError, OSError) as err:
        print(f"megatron-msg export: error: {err}", file=sys.stderr)
        return 1
    folded = f", folded {len(report.folded_masks)} all-ones mask(s)" if report.folded_masks else ""
    tokenizer = "with tokenizer" if report.tokenizer else "without tokenizer (no --tokenizer-model)"
    print(
        f"megatron-msg export: wrote {report.family.architecture} ({report.tensors} tensors, "
        f"{args.dtype}) {tokenizer}{folded} to {report.path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
