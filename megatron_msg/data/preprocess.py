"""`megatron-msg preprocess` / tools/preprocess_data.py: jsonl -> Megatron .bin/.idx datasets.

Megatron-LM's flags and output names (``{prefix}_{key}_document.bin/.idx``),
but every worker writes its own shard in parallel (Megatron funnels all
tokens through one writer process); the shards are concatenated in input
order at the end, so the output is identical for any number of workers.

Bad input (malformed JSON, missing key, empty document, invalid UTF-8, wrong
value type) stops the run with the file name and line number, or with
``--skip-invalid`` is skipped and counted. Output is written under temporary
names and renamed only when complete: an interrupted run never leaves a
.bin/.idx pair that looks valid.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_msg.data.indexed import IndexedDatasetWriter, best_dtype
from megatron_msg.data.jsonl import CATEGORIES, line_number, plan_chunks
from megatron_msg.data.preprocess_worker import (
    ChunkEncoder,
    ChunkResult,
    ChunkTask,
    EncodeSpec,
    shard_prefix,
)
from megatron_msg.data.tokenizer import TOKENIZER_TYPES, build_tokenizer

__all__ = ["PreprocessError", "PreprocessReport", "main", "output_prefixes", "run_preprocess"]

_MIN_CHUNK = 64 << 10
_MAX_CHUNK = 64 << 20


class PreprocessError(RuntimeError):
    """The input is invalid (message: ``file:line: what``) or the run failed."""


@dataclass
class PreprocessReport:
    outputs: dict[str, str]
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    blank_lines: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def output_prefixes(output_prefix: str, json_keys: Sequence[str]) -> dict[str, str]:
    return {key: f"{output_prefix}_{key}_document" for key in json_keys}


def _resolve_inputs(patterns: Sequence[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise PreprocessError(f"--input {pattern!r}: no such file")
        files.extend(matches)
    return files


def _plan(files: list[str], *, workers: int, partitions: int, chunk_bytes: int | None) -> list:
    if chunk_bytes is None:
        # Several chunks per worker balance the load and keep the progress bar moving.
        total = sum(os.path.getsize(f) for f in files)
        pieces = max(8 * workers, partitions)
        chunk_bytes = min(max(total // pieces, _MIN_CHUNK), _MAX_CHUNK)
    return [
        (path, lo, hi) for path in files for lo, hi in plan_chunks(path, target_bytes=chunk_bytes)
    ]


def _remove_stale_tmp_dirs(output_prefix: str) -> None:
    """Delete temp dirs of earlier runs on this prefix whose process is gone (e.g. killed)."""
    parent, base = os.path.split(os.path.abspath(output_prefix))
    for path in glob.glob(os.path.join(parent, f".{glob.escape(base)}.preprocess-*.tmp")):
        try:
            pid = int(os.path.basename(path).split(".preprocess-")[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    class Bar(tqdm):  # type: ignore[type-arg]
        # No monitor thread: it would outlive the bar and force the next run's
        # pool (in this process) from fork onto the slower spawn.
        monitor_interval = 0

    tty = sys.stderr.isatty()
    return Bar(
        total=total, unit="B", unit_scale=True, file=sys.stderr, desc="preprocess",
        mininterval=0.5 if tty else 30.0, dynamic_ncols=True,
    )  # fmt: skip


class _Progress:
    def __init__(self, total: int) -> None:
        self.bar = _progress_bar(total)
        self.start = time.perf_counter()
        self.docs = 0

    def add(self, nbytes: int, docs: int) -> None:
        self.docs += docs
        self.bar.update(nbytes)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.docs / elapsed:,.0f} docs/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


# Set once in each pool worker process by its initializer (the Pool idiom); the
# driver process never touches it.
_WORKER_STATE: dict[str, Any] = {}


def _init_worker(spec: EncodeSpec, counters: tuple[Any, Any]) -> None:
    _WORKER_STATE["encoder"] = ChunkEncoder(spec)
    _WORKER_STATE["counters"] = counters


def _worker_encode(task: ChunkTask) -> ChunkResult:
    nbytes, ndocs = _WORKER_STATE["counters"]

    def progress(b: int, d: int) -> None:
        with nbytes.get_lock():
            nbytes.value += b
        with ndocs.get_lock():
            ndocs.value += d

    return _WORKER_STATE["encoder"].encode_chunk(task, progress)  # type: ignore[no-any-return]


def _run_in_process(spec: EncodeSpec, tasks: list[ChunkTask], total: int) -> dict[int, ChunkResult]:
    encoder = ChunkEncoder(spec)
    results: dict[int, ChunkResult] = {}
    bar = _Progress(total)
    try:
        for task in tasks:
            results[task.chunk_id] = result = encoder.encode_chunk(task, bar.add)
            if result.error is not None:
                break
    finally:
        bar.close()
    return results


def _pool_context() -> Any:
    """fork when this process has no other threads (cheap start, as Megatron), else spawn."""
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _run_pool(
    spec: EncodeSpec, tasks: list[ChunkTask], total: int, workers: int
) -> dict[int, ChunkResult]:
    ctx = _pool_context()
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    results: dict[int, ChunkResult] = {}
    seen = [0, 0]
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec, counters)) as pool:
        bar = _Progress(total)  # after the fork: tqdm starts a monitor thread
        try:
            pending = {t.chunk_id: pool.apply_async(_worker_encode, (t,)) for t in tasks}
            stop_at: int | None = None  # first failing chunk: earlier chunks still finish
            while pending and not (stop_at is not None and min(pending) > stop_at):
                time.sleep(0.05)
                for cid in [c for c, r in pending.items() if r.ready()]:
                    results[cid] = pending.pop(cid).get()
                    if results[cid].error is not None:
                        stop_at = cid if stop_at is None else min(stop_at, cid)
                now = [counters[0].value, counters[1].value]
                bar.add(now[0] - seen[0], now[1] - seen[1])
                seen = now
        finally:
            bar.close()
            pool.terminate()
    return results


def _raise_first_error(results: dict[int, ChunkResult]) -> None:
    failed = [r for _, r in sorted(results.items()) if r.error is not None]
    if failed:
        offset, _, message = failed[0].error  # type: ignore[misc]
        path = failed[0].path
        raise PreprocessError(
            f"{path}:{line_number(path, offset)}: {message} "
            "(use --skip-invalid to skip invalid records)"
        )


def _merge(
    results: dict[int, ChunkResult], shard_dir: str, outputs: dict[str, str], dtype: np.dtype
) -> None:
    for k, final_prefix in enumerate(outputs.values()):
        with IndexedDatasetWriter(final_prefix, dtype=dtype) as writer:
            for cid in sorted(results):
                writer.add_dataset(shard_prefix(shard_dir, cid, k))


def _summarise(results: dict[int, ChunkResult], report: PreprocessReport) -> None:
    for _, r in sorted(results.items()):
        report.documents += r.documents
        report.tokens += r.tokens
        report.bytes += r.bytes
        report.blank_lines += r.blank_lines
        for category, n in r.counts.items():
            report.skipped[category] = report.skipped.get(category, 0) + n
        for offset, _, message in r.examples:
            if len(report.examples) < 5:
                report.examples.append(f"{r.path}:{line_number(r.path, offset)}: {message}")


def run_preprocess(
    *,
    inputs: Sequence[str],
    json_keys: Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    append_eod: bool = False,
    workers: int = 1,
    partitions: int = 1,
    log_interval: int = 1000,
    skip_invalid: bool = False,
    chunk_bytes: int | None = None,
) -> PreprocessReport:
    """Tokenise ``inputs`` (jsonl files or globs) into one dataset per json key."""
    if workers < 1 or partitions < 1 or log_interval < 1:
        raise PreprocessError(
            f"--workers ({workers}), --partitions ({partitions}) and --log-interval "
            f"({log_interval}) must be >= 1"
        )
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise PreprocessError(f"--json-keys must be distinct and non-empty, got {list(json_keys)}")
    files = _resolve_inputs(inputs)
    try:
        tokenizer = build_tokenizer(
            tokenizer_type, tokenizer_model=tokenizer_model, vocab_size=vocab_size
        )
    except ValueError as e:
        raise PreprocessError(str(e)) from e
    dtype = best_dtype(tokenizer.vocab_size)
    spec = EncodeSpec(
        json_keys=tuple(json_keys), tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model, vocab_size=vocab_size, append_eod=append_eod,
        skip_invalid=skip_invalid, dtype=dtype.str, batch_lines=min(1024, log_interval),
    )  # fmt: skip
    outputs = output_prefixes(output_prefix, json_keys)
    parent = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(parent, exist_ok=True)
    _remove_stale_tmp_dirs(output_prefix)
    shard_dir = tempfile.mkdtemp(
        prefix=f".{os.path.basename(output_prefix)}.preprocess-{os.getpid()}-",
        suffix=".tmp", dir=parent,
    )  # fmt: skip
    chunks = _plan(files, workers=workers, partitions=partitions, chunk_bytes=chunk_bytes)
    tasks = [ChunkTask(i, p, lo, hi, shard_dir) for i, (p, lo, hi) in enumerate(chunks)]
    report = PreprocessReport(outputs=outputs)
    start = time.perf_counter()
    total = sum(hi - lo for _, lo, hi in chunks)
    try:
        if workers == 1 or len(tasks) <= 1:
            results = _run_in_process(spec, tasks, total)
        else:
            results = _run_pool(spec, tasks, total, workers)
        _raise_first_error(results)
        _merge(results, shard_dir, outputs, dtype)
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    _summarise(results, report)
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-msg preprocess",
        description="Tokenise jsonl into Megatron .bin/.idx datasets (Megatron-LM's flags).",
    )
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, nargs="+", help="jsonl file(s) or glob(s)")
    g.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)"
    )
    g.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip invalid records and report counts, instead of stopping",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="SentencePiece .model file")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer vocabulary size")
    g.add_argument(
        "--append-eod", action="store_true", help="append the eod token to each document"
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only mmap exists")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="processes that tokenise and write")
    g.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="minimum number of input chunks (inputs are always chunked)",
    )
    g.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="refresh progress at least every N documents per worker",
    )
    g.add_argument(
        "--chunk-size-mb",
        type=float,
        default=None,
        help="input chunk size (default: ~8 chunks per worker, 64 KiB to 64 MiB)",
    )
    g.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="accepted for compatibility: output order always follows the input",
    )
    for flag in ("--split-sentences", "--keep-newlines"):
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--lang", help=argparse.SUPPRESS)
    return p  # fmt: skip


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.split_sentences or args.keep_newlines or args.lang:
        print("preprocess: error: --split-sentences/--keep-newlines/--lang (NLTK sentence "
              "splitting) are not supported", file=sys.stderr)  # fmt: skip
        return 2
    chunk = None if args.chunk_size_mb is None else int(args.chunk_size_mb * (1 << 20))
    try:
        report = run_preprocess(
            inputs=args.input, json_keys=args.json_keys, output_prefix=args.output_prefix,
            tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
            vocab_size=args.vocab_size, append_eod=args.append_eod, workers=args.workers,
            partitions=args.partitions, log_interval=args.log_interval,
            skip_invalid=args.skip_invalid, chunk_bytes=chunk,
        )  # fmt: skip
    except PreprocessError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 1
    _print_report(report)
    return 0


def _print_report(report: PreprocessReport) -> None:
    mb = report.bytes / 1e6
    secs = max(report.seconds, 1e-9)
    print(
        f"preprocess: {report.documents} documents, {report.tokens} tokens, {mb:.1f} MB in "
        f"{report.seconds:.1f}s ({report.documents / secs:,.0f} docs/s, {mb / secs:.1f} MB/s, "
        f"{report.tokens / secs:,.0f} tokens/s)",
        file=sys.stderr,
    )
    if report.skipped:
        counts = ", ".join(f"{c}={report.skipped[c]}" for c in CATEGORIES if c in report.skipped)
        print(f"preprocess: skipped {sum(report.skipped.values())} invalid records ({counts})",
              file=sys.stderr)  # fmt: skip
        for example in report.examples:
            print(f"  {example}", file=sys.stderr)
    for key, prefix in report.outputs.items():
        print(f"preprocess: {key} -> {prefix}.bin / {prefix}.idx", file=sys.stderr)
