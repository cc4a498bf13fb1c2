"""`megatron-msg train-tokenizer` / tools/train_tokenizer.py: a SentencePiece model from jsonl.

Reads the json keys of every record (same validation as preprocessing: a bad
record stops with file:line, or is skipped with ``--skip-invalid``), feeds the
text line by line to SentencePiece, and writes ``{prefix}.model`` and
``{prefix}.vocab`` atomically.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_msg.data.jsonl import InvalidRecord, iter_lines, parse_record

__all__ = ["iter_texts", "main", "train_sentencepiece"]


def iter_texts(
    paths: Sequence[str], *, json_keys: Sequence[str], skip_invalid: bool, skipped: list[str]
) -> Iterator[str]:
    """Non-empty text lines of the given keys; invalid records raise ValueError or are skipped."""
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        for number, (_, line) in enumerate(iter_lines(data, 0), start=1):
            if not line.strip():
                continue
            try:
                record = parse_record(line, json_keys)
            except InvalidRecord as e:
                if not skip_invalid:
                    raise ValueError(f"{path}:{number}: {e.message}") from None
                skipped.append(f"{path}:{number}: {e.message}")
                continue
            for value in record.values():
                for text in [value] if isinstance(value, str) else value:
                    if isinstance(text, str):
                        yield from (s for s in text.split("\n") if s.strip())


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def train_sentencepiece(
    *, texts: Iterator[str], model_prefix: str, vocab_size: int, **options: Any
) -> str:
    """Train on ``texts``; write {model_prefix}.model/.vocab; return the .model path."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=texts, model_writer=model, vocab_size=vocab_size, **options
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    )
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    _write_atomic(f"{model_prefix}.vocab", vocab.encode())
    _write_atomic(f"{model_prefix}.model", model.getvalue())
    return f"{model_prefix}.model"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="megatron-msg train-tokenizer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--input", required=True, nargs="+", help="jsonl file(s)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument(
        "--input-sentence-size", type=int, default=0, help="sample this many lines (0: all)"
    )
    p.add_argument(
        "--max-sentence-length", type=int, default=16384, help="bytes; longer lines are dropped"
    )
    p.add_argument("--byte-fallback", action="store_true", help="unknown characters become bytes")
    p.add_argument("--unk-id", type=int, default=0)
    p.add_argument("--bos-id", type=int, default=1)
    p.add_argument("--eos-id", type=int, default=2)
    p.add_argument("--pad-id", type=int, default=-1)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--skip-invalid", action="store_true")
    args = p.parse_args(argv)
    if args.vocab_size < 4:
        print(
            f"train-tokenizer: error: --vocab-size must be >= 4, got {args.vocab_size}",
            file=sys.stderr,
        )
        return 2
    skipped: list[str] = []
    texts = iter_texts(
        args.input, json_keys=args.json_keys, skip_invalid=args.skip_invalid, skipped=skipped
    )
    try:
        path = train_sentencepiece(
            texts=texts, model_prefix=args.model_prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=args.max_sentence_length, byte_fallback=args.byte_fallback,
            unk_id=args.unk_id, bos_id=args.bos_id, eos_id=args.eos_id, pad_id=args.pad_id,
            num_threads=args.num_threads, minloglevel=2,
        )  # fmt: skip
    except (ValueError, RuntimeError, OSError) as e:
        print(f"train-tokenizer: error: {e}", file=sys.stderr)
        return 1
    if skipped:
        print(
            f"train-tokenizer: skipped {len(skipped)} invalid records, first: {skipped[0]}",
            file=sys.stderr,
        )
    print(f"train-tokenizer: wrote {path}", file=sys.stderr)
    return 0
