"""Data pipeline benchmark: preprocessing throughput and sample-index build time.

1. Preprocessing, side by side, interleaved (B then A at each worker count, each
   repetition): A = ours (every worker tokenises and writes its own shard;
   shards concatenated at the end) vs B = Megatron-LM's single-writer design
   (tools/preprocess_data.py: Pool.imap(encode, lines, 32) in workers, the main
   process writes every document through megatron-core's IndexedDatasetBuilder),
   same SentencePiece tokenizer, same output (checked byte for byte).
2. GPT sample-index build for ~100M tokens: C++ (megatron_msg._data_helpers)
   vs NumPy, interleaved.

    python benchmarks/data_pipeline.py [--mb 32] [--reps 3] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_msg.data import gpt_dataset as gd
from megatron_msg.data.indexed import IndexedDatasetWriter, best_dtype
from megatron_msg.data.preprocess import run_preprocess
from megatron_msg.data.synthetic import write_synthetic_jsonl
from megatron_msg.data.tokenizer import build_tokenizer
from megatron_msg.data.train_tokenizer import iter_texts, train_sentencepiece


class MegatronEncoder:
    """Megatron-LM's tools/preprocess_data.py Encoder (no sentence splitting)."""

    def __init__(self, model: str, keys: list[str], append_eod: bool) -> None:
        self.model, self.keys, self.append_eod = model, keys, append_eod

    def initializer(self) -> None:
        MegatronEncoder.tokenizer = build_tokenizer(  # type: ignore[attr-defined]
            "SentencePieceTokenizer", tokenizer_model=self.model
        )

    def encode(self, json_line: str) -> tuple[dict, dict, int]:
        data = json.loads(json_line)
        ids, lens = {}, {}
        tokenizer = MegatronEncoder.tokenizer  # type: ignore[attr-defined]
        for key in self.keys:
            doc_ids = tokenizer.tokenize(data[key])
            sentence_lens = [len(doc_ids)] if doc_ids else []
            if doc_ids and self.append_eod:
                doc_ids.append(tokenizer.eod)
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(json_line)


def _builder(prefix: str, dtype: np.dtype):
    """megatron-core's IndexedDatasetBuilder when importable (Megatron's exact writer)."""
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    except Exception:
        return None
    return IndexedDatasetBuilder(prefix + ".bin", dtype=dtype.type)


def single_writer(inp: str, out: str, model: str, workers: int) -> None:
    encoder = MegatronEncoder(model, ["text"], append_eod=True)
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    dtype = best_dtype(tokenizer.vocab_size)
    builder = _builder(out, dtype)
    ours = None if builder is not None else IndexedDatasetWriter(out, dtype=dtype)
    ctx = mp.get_context("fork")  # Megatron's default on Linux
    with (
        open(inp, encoding="utf-8") as fin,
        ctx.Pool(workers, initializer=encoder.initializer) as pool,
    ):
        for doc, lens, _ in pool.imap(encoder.encode, fin, 32):
            if builder is not None:
                builder.add_document(doc["text"], lens["text"])
            else:
                ours.add_document(doc["text"], lengths=lens["text"])  # type: ignore[union-attr]
    if builder is not None:
        builder.finalize(out + ".idx")
    else:
        ours.finalize()  # type: ignore[union-attr]


def parallel_writers(inp: str, out: str, model: str, workers: int) -> int:
    report = run_preprocess(
        inputs=[inp], json_keys=["text"], output_prefix=out, tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=model, append_eod=True, workers=workers,
    )  # fmt: skip
    return report.tokens


def bench_preprocess(tmp: str, mb: float, reps: int, worker_counts: list[int]) -> list[str]:
    inp = os.path.join(tmp, "corpus.jsonl")
    num_docs = int(mb * 1e6 / 780)  # ~780 bytes per record at mean_words=100
    size = write_synthetic_jsonl(inp, num_docs=num_docs, seed=0, mean_words=100, vocab_words=20000)
    model = train_sentencepiece(
        texts=iter_texts([inp], json_keys=["text"], skip_invalid=False, skipped=[]),
        model_prefix=os.path.join(tmp, "sp"), vocab_size=8000, input_sentence_size=20000,
        shuffle_input_sentence=True, minloglevel=2, num_threads=2,
    )  # fmt: skip
    times: dict[tuple[str, int], list[float]] = {}
    tokens = 0
    for rep in range(reps):
        for w in worker_counts:
            for name in ("B", "A"):
                out = os.path.join(tmp, f"{name}{w}")
                start = time.perf_counter()
                if name == "A":
                    tokens = parallel_writers(inp, out, model, w)
                    out += "_text_document"
                else:
                    single_writer(inp, out, model, w)
                times.setdefault((name, w), []).append(time.perf_counter() - start)
                print(f"rep {rep} {name} workers={w}: {times[(name, w)][-1]:.2f}s", file=sys.stderr)
            for ext in (".bin", ".idx"):  # both pipelines wrote the same dataset
                a = Path(os.path.join(tmp, f"A{w}_text_document{ext}")).read_bytes()
                assert a == Path(os.path.join(tmp, f"B{w}{ext}")).read_bytes(), (
                    f"outputs differ ({ext})"
                )
    writer = (
        "megatron-core IndexedDatasetBuilder"
        if _builder(os.path.join(tmp, "probe"), np.dtype(np.uint16))
        else "our writer"
    )
    lines = [
        f"Corpus: {size / 1e6:.1f} MB synthetic jsonl, {num_docs} documents, {tokens:,} tokens "
        f"(SentencePiece BPE, vocab 8000 + Megatron's 5 specials, --append-eod). Single writer "
        f"= Megatron's pipeline with {writer}. Median of {reps} interleaved runs; identical "
        "output checked byte for byte.",
        "",
        "| workers | single writer (B) | parallel writers (A) | A/B |",
        "|---|---|---|---|",
    ]
    for w in worker_counts:
        tb, ta = statistics.median(times[("B", w)]), statistics.median(times[("A", w)])
        lines.append(
            f"| {w} | {size / 1e6 / tb:.2f} MB/s, {tokens / tb / 1e6:.2f} M tok/s ({tb:.1f}s) "
            f"| {size / 1e6 / ta:.2f} MB/s, {tokens / ta / 1e6:.2f} M tok/s ({ta:.1f}s) "
            f"| {tb / ta:.2f}x |"
        )
    return lines


def bench_sample_index(reps: int) -> list[str]:
    rng = np.random.RandomState(0)
    num_docs = 100_000
    sizes = np.maximum(1, rng.exponential(1000, size=num_docs)).astype(np.int32)
    tokens = int(sizes.sum())
    lines = [
        "",
        f"Sample index, {tokens / 1e6:.0f}M tokens in {num_docs:,} documents, one epoch, "
        f"best of {reps} interleaved:",
        "",
        "| seq_length | samples | NumPy | C++ | NumPy/C++ |",
        "|---|---|---|---|---|",
    ]
    doc_index = gd.build_document_index(np.arange(num_docs), num_epochs=1, rng=rng)
    for seq_length in (2048, 128):
        n = (tokens - 1) // seq_length
        t = {"numpy": [], "cpp": []}
        for _ in range(reps):
            for name, fn in (
                ("numpy", gd.build_sample_index_numpy),
                ("cpp", gd.build_sample_index_cpp),
            ):
                start = time.perf_counter()
                out = fn(sizes, doc_index, seq_length=seq_length, num_samples=n)
                t[name].append(time.perf_counter() - start)
            assert np.array_equal(
                out,
                gd.build_sample_index_numpy(sizes, doc_index, seq_length=seq_length, num_samples=n),
            )
        tn, tc = min(t["numpy"]), min(t["cpp"])
        lines.append(
            f"| {seq_length} | {n:,} | {tn * 1e3:.1f} ms | {tc * 1e3:.1f} ms | {tn / tc:.1f}x |"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=32.0, help="corpus size in MB")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--append", help="append the results section to this markdown file")
    args = p.parse_args()
    if not gd.have_cpp_helpers():
        print("megatron_msg._data_helpers is not built: run `make build`", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        lines = bench_preprocess(tmp, args.mb, args.reps, args.workers)
    lines += bench_sample_index(max(args.reps, 3))
    command = "python benchmarks/data_pipeline.py " + " ".join(sys.argv[1:])
    section = [
        f"## Data pipeline — {datetime.date.today().isoformat()}",
        "",
        f"Machine: 2-core CPU VM, no GPU (shared with other engineers while measuring). "
        f"Command: `{command.strip()}`",
        "",
        *lines,
        "",
    ]
    text = "\n".join(section)
    print(text)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
