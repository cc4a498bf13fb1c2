"""Seeded synthetic text corpora (no downloads) for tests, benchmarks and demos.

Words are built from syllables and drawn with Zipf-like frequencies, so a
SentencePiece model trained on them learns real subwords; a few accented and
CJK words exercise multi-byte UTF-8. Same seed, same corpus, on any platform.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator

__all__ = ["synthetic_documents", "write_synthetic_jsonl"]

_ONSETS = [
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "st",
    "tr",
    "pl",
]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "ng", "ck"]
_EXTRA = ["café", "naïve", "Zürich", "façade", "数据", "模型", "Ελλάδα", "🙂"]


def _lexicon(rng: random.Random, size: int) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        syllables = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables)
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words + _EXTRA


def synthetic_documents(
    num_docs: int, *, seed: int = 0, mean_words: int = 120, vocab_words: int = 2000
) -> Iterator[str]:
    """``num_docs`` documents of sentences; lengths vary (geometric-ish around mean_words)."""
    rng = random.Random(seed)
    words = _lexicon(rng, vocab_words)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf's law
    for _ in range(num_docs):
        n = max(1, int(rng.expovariate(1.0 / mean_words)))
        drawn = rng.choices(words, weights=weights, k=n)
        sentences, start = [], 0
        while start < n:
            stop = min(n, start + rng.randint(4, 18))
            sentence = " ".join(drawn[start:stop])
            sentences.append(sentence[:1].upper() + sentence[1:] + rng.choice([".", ".", "!", "?"]))
            start = stop
        if rng.random() < 0.1:
            sentences.append(str(rng.randint(0, 10**6)))
        yield " ".join(sentences)


def write_synthetic_jsonl(
    path: str | os.PathLike[str],
    *,
    num_docs: int,
    seed: int = 0,
    mean_words: int = 120,
    vocab_words: int = 2000,
    keys: tuple[str, ...] = ("text",),
) -> int:
    """Write ``num_docs`` jsonl records (each key gets its own text); returns the byte size."""
    docs = synthetic_documents(
        num_docs * len(keys), seed=seed, mean_words=mean_words, vocab_words=vocab_words
    )
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_docs):
            record = {"id": i, **{key: next(docs) for key in keys}}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return os.path.getsize(path)
