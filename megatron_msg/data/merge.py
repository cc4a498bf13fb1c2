"""`megatron-msg merge-datasets` / tools/merge_datasets.py: concatenate indexed datasets.

Megatron-LM's ``--input DIR`` (every complete .bin/.idx pair in DIR, in sorted
order) and ``--output-prefix``; ``--input`` also takes explicit prefixes. All
inputs must share a dtype. The output is written under temporary names and
renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from megatron_msg.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    bin_path,
    idx_path,
)

__all__ = ["find_prefixes", "main", "merge_datasets"]


def find_prefixes(directory: str) -> list[str]:
    """Prefixes of the .bin/.idx pairs in ``directory``, sorted; a lone half is an error."""
    names = os.listdir(directory)
    stems = {n[:-4] for n in names if n.endswith((".bin", ".idx")) and not n.startswith(".")}
    prefixes = []
    for stem in sorted(stems):
        prefix = os.path.join(directory, stem)
        missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
        if missing:
            raise IndexedDatasetError(f"{missing[0]}: missing (its pair partner exists)")
        prefixes.append(prefix)
    if not prefixes:
        raise IndexedDatasetError(f"{directory}: no .bin/.idx pairs found")
    return prefixes


def merge_datasets(*, inputs: Sequence[str], output_prefix: str) -> IndexedDataset:
    """Concatenate datasets ``inputs`` (prefixes) into ``output_prefix``; returns the result."""
    if not inputs:
        raise ValueError("no input datasets to merge")
    datasets = [IndexedDataset(p) for p in inputs]  # validates every input before writing
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        detail = ", ".join(f"{ds.prefix}: {ds.dtype}" for ds in datasets)
        raise IndexedDatasetError(f"inputs have different dtypes ({detail})")
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in inputs):
        raise ValueError(f"output prefix {output_prefix} is also an input")
    with IndexedDatasetWriter(output_prefix, dtype=datasets[0].dtype) as writer:
        for prefix in inputs:
            writer.add_dataset(prefix)
    return IndexedDataset(output_prefix)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="megatron-msg merge-datasets", description=__doc__.split("\n")[0]
    )
    p.add_argument("--input", required=True, nargs="+",
                   help="a directory of .bin/.idx pairs, or dataset prefixes")  # fmt: skip
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--multimodal", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.multimodal:
        print("merge-datasets: error: --multimodal datasets are not supported", file=sys.stderr)
        return 2
    try:
        if len(args.input) == 1 and os.path.isdir(args.input[0]):
            inputs = find_prefixes(args.input[0])
        else:
            inputs = list(args.input)
        merged = merge_datasets(inputs=inputs, output_prefix=args.output_prefix)
    except (ValueError, OSError) as e:
        print(f"merge-datasets: error: {e}", file=sys.stderr)
        return 1
    print(
        f"merge-datasets: {len(inputs)} datasets -> {args.output_prefix} "
        f"({merged.num_documents} documents, {merged.num_tokens} tokens)",
        file=sys.stderr,
    )
    return 0
