"""One preprocessing worker: a byte range of a jsonl file -> its own .bin/.idx shard per key.

Each worker writes its shards itself (no single writer process to funnel
through, Megatron's bottleneck); the driver concatenates the shards in input
order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import array
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_msg.data.indexed import IndexedDatasetWriter
from megatron_msg.data.jsonl import InvalidRecord, iter_lines, parse_record
from megatron_msg.data.tokenizer import NullTokenizer, Tokenizer, build_tokenizer

__all__ = ["ChunkEncoder", "ChunkResult", "ChunkTask", "EncodeSpec", "shard_prefix"]

MAX_EXAMPLES = 5  # skipped records remembered (per chunk) for the final report
_TYPECODES = {np.dtype(np.uint16): "H", np.dtype(np.int32): "i"}


@dataclass(frozen=True)
class EncodeSpec:
    """Everything a worker needs; picklable, so workers can be spawned."""

    json_keys: tuple[str, ...]
    tokenizer_type: str
    tokenizer_model: str | None
    vocab_size: int | None
    append_eod: bool
    skip_invalid: bool
    dtype: str
    batch_lines: int = 1024


@dataclass(frozen=True)
class ChunkTask:
    chunk_id: int
    path: str
    start: int
    end: int
    shard_dir: str


@dataclass
class ChunkResult:
    chunk_id: int
    path: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    blank_lines: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    # (byte offset of the line, category, message): the stopping error, or skipped examples
    error: tuple[int, str, str] | None = None
    examples: list[tuple[int, str, str]] = field(default_factory=list)


def shard_prefix(shard_dir: str, chunk_id: int, key_index: int) -> str:
    return os.path.join(shard_dir, f"{chunk_id:07d}_k{key_index}")


class ChunkEncoder:
    """Parses, tokenises and writes chunks; one per worker process."""

    def __init__(self, spec: EncodeSpec, *, tokenizer: Tokenizer | None = None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer or build_tokenizer(
            spec.tokenizer_type, tokenizer_model=spec.tokenizer_model, vocab_size=spec.vocab_size
        )
        self.dtype = np.dtype(spec.dtype)
        self._typecode = _TYPECODES[self.dtype]

    def encode_chunk(
        self, task: ChunkTask, progress: Callable[[int, int], None] | None = None
    ) -> ChunkResult:
        """Encode one chunk; ``progress(bytes, documents)`` is called after each batch."""
        result = ChunkResult(task.chunk_id, task.path)
        writers = [
            IndexedDatasetWriter(shard_prefix(task.shard_dir, task.chunk_id, k), dtype=self.dtype)
            for k in range(len(self.spec.json_keys))
        ]
        try:
            with open(task.path, "rb") as f:
                f.seek(task.start)
                data = f.read(task.end - task.start)
            batch: list[tuple[int, bytes]] = []
            for item in iter_lines(data, task.start):
                batch.append(item)
                if len(batch) >= self.spec.batch_lines:
                    if not self._encode_batch(batch, writers, result, progress):
                        break
                    batch = []
            else:
                if batch:
                    self._encode_batch(batch, writers, result, progress)
            if result.error is None:
                for w in writers:
                    w.finalize()
        finally:
            for w in writers:
                w.abort()  # deletes the temp files of shards that were not finalized
        return result

    def _encode_batch(
        self,
        batch: list[tuple[int, bytes]],
        writers: Sequence[IndexedDatasetWriter],
        result: ChunkResult,
        progress: Callable[[int, int], None] | None,
    ) -> bool:
        records: list[tuple[int, dict[str, Any]]] = []
        for offset, line in batch:
            if not line.strip():
                result.blank_lines += 1
                continue
            try:
                records.append((offset, parse_record(line, self.spec.json_keys)))
            except InvalidRecord as e:
                if not self._invalid(result, offset, e):
                    return False
        encoded = self._tokenize_records(records, result)
        if encoded is None:
            return False
        for k, writer in enumerate(writers):
            tokens, seq_lengths, seqs_per_doc = encoded[k]
            writer.add_documents(tokens, lengths=seq_lengths, sequences_per_document=seqs_per_doc)
            result.tokens += len(tokens)
        documents = len(encoded[0][2]) if encoded else 0
        result.documents += documents
        batch_bytes = sum(len(line) + 1 for _, line in batch)
        result.bytes += batch_bytes
        if progress is not None:
            progress(batch_bytes, documents)
        return True

    def _invalid(self, result: ChunkResult, offset: int, err: InvalidRecord) -> bool:
        """Record a bad line; False means stop (invalid records are not skipped)."""
        if not self.spec.skip_invalid:
            result.error = (offset, err.category, err.message)
            return False
        result.counts[err.category] = result.counts.get(err.category, 0) + 1
        if len(result.examples) < MAX_EXAMPLES:
            result.examples.append((offset, err.category, err.message))
        return True

    def _tokenize_records(
        self, records: list[tuple[int, dict[str, Any]]], result: ChunkResult
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
        """Per key: (flat tokens, sequence lengths, sequences per document) of the valid records."""
        per_key = [
            self._tokenize_values([v[key] for _, v in records]) for key in self.spec.json_keys
        ]
        outputs = [
            (array.array(self._typecode), array.array("q"), array.array("q")) for _ in per_key
        ]
        for r, (offset, _) in enumerate(records):
            docs = [per_key[k][r] for k in range(len(per_key))]
            bad = self._problem(docs)
            if bad is not None:
                if not self._invalid(result, offset, bad):
                    return None
                continue
            for (tokens, lengths, counts), sentences in zip(outputs, docs):
                assert not isinstance(sentences, InvalidRecord)
                self._append_document(tokens, lengths, counts, sentences)
        return [
            (
                np.frombuffer(t, dtype=self.dtype),
                np.frombuffer(n, np.int64),
                np.frombuffer(c, np.int64),
            )
            for t, n, c in outputs
        ]

    def _problem(self, docs: list[list[list[int]] | InvalidRecord]) -> InvalidRecord | None:
        """Why a record (its documents, one per key) cannot be written, or None."""
        for k, doc in enumerate(docs):
            if isinstance(doc, InvalidRecord):
                return doc
            if not any(doc):
                key = self.spec.json_keys[k]
                return InvalidRecord("empty_document", f"empty document for key {key!r}")
        return None

    def _append_document(
        self, tokens: array.array, lengths: array.array, counts: array.array, sentences: list
    ) -> None:
        # Megatron: sentences without tokens are dropped; eod goes on the last one.
        kept = [s for s in sentences if s]
        for s in kept:
            tokens.extend(s)
            lengths.append(len(s))
        if self.spec.append_eod:
            tokens.append(self.tokenizer.eod)
            lengths[-1] += 1
        counts.append(len(kept))

    def _tokenize_values(self, values: list[Any]) -> list[list[list[int]] | InvalidRecord]:
        """Each value -> its sentences' ids, or the InvalidRecord explaining why not."""
        texts: list[Any] = []
        owners: list[int] = []
        out: list[list[list[int]] | InvalidRecord] = [[] for _ in values]
        pretokenised = isinstance(self.tokenizer, NullTokenizer)
        for i, value in enumerate(values):
            if isinstance(value, list) and value and type(value[0]) is int:
                if not pretokenised:
                    out[i] = InvalidRecord(
                        "bad_value", "a list of ids needs --tokenizer-type NullTokenizer"
                    )
                    continue
                value = [value]  # one pre-tokenised sentence
            elif isinstance(value, str):
                value = [value]
            texts.extend(value)
            owners.extend([i] * len(value))
        for i, ids in zip(owners, self._tokenize_texts(texts)):
            slot = out[i]
            if isinstance(slot, InvalidRecord):
                continue
            if isinstance(ids, InvalidRecord):
                out[i] = ids
            else:
                slot.append(ids)
        return out

    def _tokenize_texts(self, texts: list[Any]) -> list[list[int] | InvalidRecord]:
        try:
            return list(self.tokenizer.tokenize_batch(texts))
        except ValueError:
            pass  # some text is bad: redo one by one to blame the right record
        out: list[list[int] | InvalidRecord] = []
        for text in texts:
            try:
                out.append(self.tokenizer.tokenize(text))
            except ValueError as e:
                out.append(InvalidRecord("bad_value", str(e)))
        return out
