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
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_msg.data import gpt_dataset as gd
from megatron_msg.data.blended import build_blending_indices_cpp, build_blending_indices_python
from megatron_msg.data.indexed import IndexedDatasetWriter, best_dtype
from megatron_msg.data.preprocess import run_preprocess
from megatron_msg.data.synthetic import write_synthetic_jsonl
from megatron_msg.data.tokenizer import build_tokenizer
from megatron_msg.data.train_tokenizer import iter_texts, train_sentencepiece


class MegatronEncoder:
    """Megatron-LM's tools/preprocess_data.py Encoder (no sentence splitting)."""

    def __init__(self, tok: dict, keys: list[str], append_eod: bool) -> None:
        self.tok, self.keys, self.append_eod = tok, keys, append_eod

    def initializer(self) -> None:
        MegatronEncoder.tokenizer = build_tokenizer(**self.tok)  # type: ignore[attr-defined]

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


def _megatron_builder_class():
    """megatron-core's IndexedDatasetBuilder (Megatron's exact writer), or None."""
    try:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    except Exception:
        return None
    return IndexedDatasetBuilder


def single_writer(inp: str, out: str, tok: dict, workers: int) -> float:
    """Megatron's pipeline; returns the CPU seconds the writing main process used."""
    encoder = MegatronEncoder(tok, ["text"], append_eod=True)
    dtype = best_dtype(build_tokenizer(**tok).vocab_size)
    cls = _megatron_builder_class()
    builder = cls(out + ".bin", dtype=dtype.type) if cls else IndexedDatasetWriter(out, dtype=dtype)
    ctx = mp.get_context("fork")  # Megatron's default on Linux
    cpu = time.process_time()
    with (
        open(inp, encoding="utf-8") as fin,
        ctx.Pool(workers, initializer=encoder.initializer) as pool,
    ):
        for doc, lens, _ in pool.imap(encoder.encode, fin, 32):
            if cls:
                builder.add_document(doc["text"], lens["text"])
            else:
                builder.add_document(doc["text"], lengths=lens["text"])
    if cls:
        builder.finalize(out + ".idx")
    else:
        builder.finalize()
    return time.process_time() - cpu


def parallel_writers(inp: str, out: str, tok: dict, workers: int) -> int:
    report = run_preprocess(
        inputs=[inp], json_keys=["text"], output_prefix=out, tokenizer_type=tok["tokenizer_type"],
        tokenizer_model=tok.get("tokenizer_model"), vocab_size=tok.get("vocab_size"),
        append_eod=True, workers=workers,
    )  # fmt: skip
    return report.tokens


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _run_case(tmp: str, inp: str, tok: dict, reps: int, worker_counts: list[int]) -> dict:
    times: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    writer_cpu: list[float] = []
    tokens = 0
    for rep in range(reps):
        for w in worker_counts:
            for name in ("B", "A"):
                out = os.path.join(tmp, f"{name}{w}")
                start, cpu0 = time.perf_counter(), _cpu_seconds()
                if name == "A":
                    tokens = parallel_writers(inp, out, tok, w)
                    out += "_text_document"
                else:
                    writer_cpu.append(single_writer(inp, out, tok, w))
                times.setdefault((name, w), []).append(time.perf_counter() - start)
                cpu.setdefault((name, w), []).append(_cpu_seconds() - cpu0)
                print(f"rep {rep} {name} workers={w}: {times[(name, w)][-1]:.2f}s", file=sys.stderr)
            for ext in (".bin", ".idx"):  # both pipelines wrote the same dataset
                a = Path(os.path.join(tmp, f"A{w}_text_document{ext}")).read_bytes()
                b = Path(os.path.join(tmp, f"B{w}{ext}")).read_bytes()
                assert a == b, f"outputs differ ({ext})"
    return {
        "times": times, "cpu": cpu, "tokens": tokens, "writer_cpu": statistics.median(writer_cpu)
    }  # fmt: skip


def _table(label: str, size: int, docs: int, res: dict, worker_counts: list[int]) -> list[str]:
    tokens, times, cpu = res["tokens"], res["times"], res["cpu"]
    mb = size / 1e6
    cap = mb / res["writer_cpu"]
    lines = [
        "",
        f"{label}: {mb:.1f} MB jsonl, {docs:,} documents, {tokens:,} tokens. Megatron's "
        f"writer process alone needs {res['writer_cpu']:.1f} CPU s for this corpus, capping "
        f"the single-writer design at ~{cap:.0f} MB/s whatever the worker count.",
        "",
        "| workers | B: single writer | A: parallel writers | A/B wall | B CPU s/MB | A CPU s/MB |",
        "|---|---|---|---|---|---|",
    ]
    for w in worker_counts:
        tb, ta = statistics.median(times[("B", w)]), statistics.median(times[("A", w)])
        cb, ca = statistics.median(cpu[("B", w)]) / mb, statistics.median(cpu[("A", w)]) / mb
        lines.append(
            f"| {w} | {mb / tb:.2f} MB/s, {tokens / tb / 1e6:.2f} M tok/s ({tb:.1f}s) "
            f"| {mb / ta:.2f} MB/s, {tokens / ta / 1e6:.2f} M tok/s ({ta:.1f}s) "
            f"| {tb / ta:.2f}x | {cb:.3f} | {ca:.3f} |"
        )
    return lines


def _ids_corpus(path: str, num_docs: int, vocab: int) -> int:
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            ids = rng.zipf(1.3, size=max(1, int(rng.exponential(150)))) % vocab
            f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")
    return os.path.getsize(path)


def bench_preprocess(tmp: str, mb: float, reps: int, worker_counts: list[int]) -> list[str]:
    text = os.path.join(tmp, "text.jsonl")
    docs = int(mb * 1e6 / 780)  # ~780 bytes per record at mean_words=100
    size = write_synthetic_jsonl(text, num_docs=docs, seed=0, mean_words=100, vocab_words=20000)
    model = train_sentencepiece(
        texts=iter_texts([text], json_keys=["text"], skip_invalid=False, skipped=[]),
        model_prefix=os.path.join(tmp, "sp"), vocab_size=8000, input_sentence_size=20000,
        shuffle_input_sentence=True, minloglevel=2, num_threads=2,
    )  # fmt: skip
    sp = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": model}
    writer = "megatron-core's IndexedDatasetBuilder" if _megatron_builder_class() else "our writer"
    lines = [
        "Preprocessing: A = ours (parallel writers), B = Megatron's single-writer pipeline "
        f"(main process writes with {writer}), same tokenizer, --append-eod, median of {reps} "
        "interleaved runs; outputs checked byte-identical.",
    ]
    lines += _table(
        "SentencePieceTokenizer (BPE, 8000 pieces) on synthetic text", size, docs,
        _run_case(tmp, text, sp, reps, worker_counts), worker_counts,
    )  # fmt: skip
    ids = os.path.join(tmp, "ids.jsonl")
    ids_docs = docs * 2
    ids_size = _ids_corpus(ids, ids_docs, 8000)
    null = {"tokenizer_type": "NullTokenizer", "vocab_size": 8000}
    lines += _table(
        "NullTokenizer (pre-tokenised ids, vocab 8000)", ids_size, ids_docs,
        _run_case(tmp, ids, null, reps, worker_counts), worker_counts,
    )  # fmt: skip
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


def bench_blending(reps: int) -> list[str]:
    weights, size = np.array([0.5, 0.3, 0.2]), 200_000
    t = {"python": [], "cpp": []}
    for _ in range(reps):
        for name, fn in (
            ("python", build_blending_indices_python),
            ("cpp", build_blending_indices_cpp),
        ):
            start = time.perf_counter()
            out = fn(weights, size)
            t[name].append(time.perf_counter() - start)
    assert all(
        np.array_equal(a, b) for a, b in zip(out, build_blending_indices_python(weights, size))
    )
    tp, tc = min(t["python"]), min(t["cpp"])
    return [
        "",
        f"Blending index, {size:,} samples over 3 datasets: Python {tp * 1e3:.0f} ms, "
        f"C++ {tc * 1e3:.1f} ms ({tp / tc:.0f}x), identical arrays.",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=32.0, help="corpus size in MB")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--append", help="append the results section to this markdown file")
    args = p.parse_args()
    _megatron_builder_class()  # import megatron-core once, outside the timed runs
    load_before = "/".join(f"{x:.1f}" for x in os.getloadavg())
    if not gd.have_cpp_helpers():
        print("megatron_msg._data_helpers is not built: run `make build`", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        lines = bench_preprocess(tmp, args.mb, args.reps, args.workers)
    lines += bench_sample_index(max(args.reps, 3))
    lines += bench_blending(max(args.reps, 3))
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python benchmarks/data_pipeline.py " + " ".join(sys.argv[1:])
    section = [
        f"## Data pipeline — {datetime.date.today().isoformat()}",
        "",
        "Machine: 2-core CPU VM, no GPU, shared with other engineers while measuring "
        f"(load average {load_before} before, {load} after, 1/5/15 min). "
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
