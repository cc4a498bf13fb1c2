"""The demo's data, made from text already on the machine: the Python standard library.

``build_corpus`` walks the standard library's ``.py`` files in sorted order
(skipping its test suites and installed third-party packages) and writes one
jsonl record per module, ``{"text": <module source>}``: docstrings, comments
and code. The walk is deterministic, so the same interpreter gives the same
corpus, byte for byte; ``max_bytes`` caps its size. With ``shuffle_seed`` the
modules come in a seeded random order instead, so a capped corpus samples the
whole library and a contiguous validation split (Megatron splits by document
index) is held out from the same distribution as the training split rather than
being the alphabetically last packages.

``prepare_data`` then runs the project's own data tools on it: a SentencePiece
tokenizer (``data.train_tokenizer``) and the indexed dataset
(``data.preprocess``, parallel workers). Everything lands in a cache directory
and is reused when it is already there (a stamp file records what built it).
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_msg.data.preprocess import run_preprocess
from megatron_msg.data.train_tokenizer import iter_texts, train_sentencepiece

# Parts of the standard library that are not "the standard library's text": its own
# test suites (huge, repetitive) and whatever was pip-installed next to it.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_MAX_FILE_BYTES = 200_000  # a few generated tables (e.g. unicode data) would dominate


@dataclass(frozen=True)
class DemoData:
    corpus: Path  # jsonl
    tokenizer_model: Path  # SentencePiece .model
    prefix: Path  # indexed dataset prefix (without .bin/.idx)
    vocab_size: int
    documents: int
    corpus_bytes: int


def stdlib_sources(*, root: Path | None = None) -> Iterator[Path]:
    """The standard library's ``.py`` files, sorted by relative path."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"standard library directory {base} does not exist")
    found: list[Path] = []
    for directory, subdirs, files in os.walk(base):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("."))
        found.extend(Path(directory) / f for f in files if f.endswith(".py"))
    yield from sorted(found, key=lambda p: p.relative_to(base).as_posix())


def build_corpus(
    target: Path, *, max_bytes: int, root: Path | None = None, shuffle_seed: int | None = None
) -> tuple[int, int]:
    """Write the corpus jsonl atomically; returns ``(documents, text bytes)``."""
    if max_bytes < 10_000:
        raise ValueError(f"max_bytes must be >= 10000 to make a usable corpus, got {max_bytes}")
    documents = total = 0
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            sources = list(stdlib_sources(root=root))
            if shuffle_seed is not None:
                random.Random(shuffle_seed).shuffle(sources)
            for path in sources:
                if path.stat().st_size > _MAX_FILE_BYTES:
                    continue
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue  # a few test fixtures are deliberately not UTF-8
                if not text.strip():
                    continue
                out.write(json.dumps({"text": text}) + "\n")
                documents += 1
                total += len(text.encode())
                if total >= max_bytes:
                    break
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return documents, total


def prepare_data(
    cache: Path,
    *,
    max_bytes: int,
    vocab_size: int,
    workers: int,
    root: Path | None = None,
    shuffle_seed: int | None = None,
) -> DemoData:
    """Corpus -> SentencePiece tokenizer -> indexed dataset under ``cache`` (reused if present)."""
    cache.mkdir(parents=True, exist_ok=True)
    corpus, spm_prefix = cache / "stdlib.jsonl", cache / f"spm{vocab_size}"
    prefix = cache / f"stdlib_spm{vocab_size}"
    stamp = cache / f"stamp_{vocab_size}.json"
    wanted = {"max_bytes": max_bytes, "vocab_size": vocab_size, "root": str(root or ""),
              "shuffle_seed": shuffle_seed}  # fmt: skip
    if stamp.exists():
        recorded = json.loads(stamp.read_text())
        built = Path(f"{prefix}_text_document.idx").exists()
        if {k: recorded.get(k) for k in wanted} == wanted and built:
            print(f"data: reusing {cache} ({recorded['documents']} modules)")
            return _data(corpus, spm_prefix, prefix, vocab_size, recorded)
    documents, nbytes = build_corpus(
        corpus, max_bytes=max_bytes, root=root, shuffle_seed=shuffle_seed
    )
    print(f"data: {documents} standard-library modules, {nbytes / 1e6:.1f} MB -> {corpus}")
    texts = iter_texts([str(corpus)], json_keys=["text"], skip_invalid=False, skipped=[])
    train_sentencepiece(
        texts=texts, model_prefix=str(spm_prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, input_sentence_size=200_000,
        shuffle_input_sentence=True, max_sentence_length=4096, num_threads=workers,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    print(f"data: SentencePiece BPE tokenizer, {vocab_size} pieces -> {spm_prefix}.model")
    report = run_preprocess(
        inputs=[str(corpus)], json_keys=["text"], output_prefix=str(prefix),
        tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=f"{spm_prefix}.model",
        append_eod=True, workers=workers, partitions=workers, log_interval=10_000,
    )  # fmt: skip
    done = report.outputs["text"]
    print(f"data: preprocessed with {workers} workers in {report.seconds:.1f}s -> {done}.bin/.idx")
    recorded = {**wanted, "documents": documents, "corpus_bytes": nbytes}
    tmp = stamp.with_name(f".{stamp.name}.tmp")
    tmp.write_text(json.dumps(recorded))
    tmp.replace(stamp)
    return _data(corpus, spm_prefix, prefix, vocab_size, recorded)


def _data(corpus: Path, spm_prefix: Path, prefix: Path, vocab: int, rec: dict) -> DemoData:
    return DemoData(
        corpus=corpus,
        tokenizer_model=Path(f"{spm_prefix}.model"),
        prefix=Path(f"{prefix}_text_document"),
        vocab_size=vocab,
        documents=int(rec["documents"]),
        corpus_bytes=int(rec["corpus_bytes"]),
    )
