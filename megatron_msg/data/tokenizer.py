"""Tokenizers with Megatron-LM's interface and ids.

- ``SentencePieceTokenizer``: Megatron-LM's ``_SentencePieceTokenizer``. The
  special tokens <CLS>, <SEP>, <EOD>, <MASK> (and pad/bos/eos pieces when the
  model lacks them) are appended after the model's pieces, so ``vocab_size`` is
  larger than the model's and ``eod`` is the appended <EOD>. Special-token
  strings inside the text map to their ids, as in Megatron.
- ``GPTSentencePieceTokenizer``: Megatron-LM's ``_GPTSentencePieceTokenizer``:
  the model's own vocabulary, ``eod`` = the model's eos id.
- ``NullTokenizer``: pre-tokenised input ("12 7 9" or a list of ints); ids must
  be below ``vocab_size``; ``eod`` = vocab_size, so ``.vocab_size`` is one more
  than the given size (Megatron's convention).

Every tokenizer exposes ``vocab_size``, ``vocab``, ``inv_vocab``, ``tokenize``,
``detokenize``, ``eod``, ``bos``, ``eos``, ``pad``, ``cls``, ``sep``, ``mask``
(-1 where absent), plus ``tokenize_batch`` for throughput.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = [
    "TOKENIZER_TYPES",
    "GPTSentencePieceTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
]


class Tokenizer:
    """Base of the tokenizers; ids default to -1 (absent)."""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def vocab(self) -> dict[str, int]:
        raise NotImplementedError(f"{type(self).__name__} has no string vocabulary")

    @property
    def inv_vocab(self) -> dict[int, str]:
        raise NotImplementedError(f"{type(self).__name__} has no string vocabulary")

    def tokenize(self, text: Any) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[Any]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    eod = property(lambda self: -1)
    bos = property(lambda self: -1)
    eos = property(lambda self: -1)
    pad = property(lambda self: -1)
    cls = property(lambda self: -1)
    sep = property(lambda self: -1)
    mask = property(lambda self: -1)


def _load_sentencepiece(model_file: str) -> Any:
    import sentencepiece

    if not os.path.isfile(model_file):
        raise ValueError(f"tokenizer model {model_file!r} does not exist")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{model_file}: not a SentencePiece model ({e})") from e


def _piece_or(sp: Any, piece_id: int, fallback: str) -> str:
    # Megatron's rule: a disabled id (-1) or one out of range gets a placeholder piece.
    if 0 <= piece_id < sp.get_piece_size():
        return str(sp.id_to_piece(piece_id))
    return fallback


class GPTSentencePieceTokenizer(Tokenizer):
    """The model's own ids; ``eod`` is the model's eos."""

    def __init__(self, model_file: str) -> None:
        self.model_file = model_file
        self.sp = _load_sentencepiece(model_file)
        self._vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        self._inv_vocab = {i: p for p, i in self._vocab.items()}

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    def tokenize(self, text: Any) -> list[int]:
        return list(self.sp.encode(text))

    def tokenize_batch(self, texts: Sequence[Any]) -> list[list[int]]:
        # One C++ call for the batch; one thread, the caller parallelises by process.
        return [list(ids) for ids in self.sp.encode(list(texts), num_threads=1)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.sp.decode([int(i) for i in ids]))

    eod = property(lambda self: int(self.sp.eos_id()))
    eos = property(lambda self: int(self.sp.eos_id()))
    bos = property(lambda self: int(self.sp.bos_id()))
    pad = property(lambda self: int(self.sp.pad_id()))


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """Megatron-LM's ``SentencePieceTokenizer`` with its appended special tokens."""

    def __init__(self, model_file: str, *, vocab_extra_ids: int = 0) -> None:
        super().__init__(model_file)
        self._special: dict[str, int] = {}
        self._cls = self._add_special("<CLS>")
        self._sep = self._add_special("<SEP>")
        self._eod = self._add_special("<EOD>")
        self._mask = self._add_special("<MASK>")
        self._pad = self._add_special(_piece_or(self.sp, self.sp.pad_id(), "<PAD>"))
        self._bos = self._add_special(_piece_or(self.sp, self.sp.bos_id(), "<BOS>"))
        self._eos = self._add_special(_piece_or(self.sp, self.sp.eos_id(), "<EOS>"))
        self._extra = [self._add_special(f"<extra_id_{i}>") for i in range(vocab_extra_ids)]
        self._inv_special = {i: t for t, i in self._special.items()}

    def _add_special(self, token: str) -> int:
        if token not in self._vocab:
            new_id = len(self._vocab)
            self._vocab[token] = new_id
            self._inv_vocab[new_id] = token
        self._special[token] = self._vocab[token]
        return self._vocab[token]

    def tokenize(self, text: Any) -> list[int]:
        # Megatron: split at the earliest special-token string, encode the pieces between.
        ids: list[int] = []
        idx = 0
        while True:
            found = {t: text.find(t, idx) for t in self._special}
            found = {t: i for t, i in found.items() if i >= 0}
            if not found:
                break
            token = min(found, key=lambda t: found[t])
            ids.extend(self.sp.encode(text[idx : found[token]]))
            ids.append(self._special[token])
            idx = found[token] + len(token)
        ids.extend(self.sp.encode(text[idx:]))
        return ids

    def tokenize_batch(self, texts: Sequence[Any]) -> list[list[int]]:
        plain = [i for i, t in enumerate(texts) if not any(s in t for s in self._special)]
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, super().tokenize_batch([texts[i] for i in plain])):
            out[i] = ids
        plain_set = set(plain)
        for i, text in enumerate(texts):
            if i not in plain_set:
                out[i] = self.tokenize(text)
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        text, last = "", 0
        ids = [int(i) for i in ids]
        for i, token_id in enumerate(ids):
            if token_id in self._inv_special:
                text += str(self.sp.decode(ids[last:i])) + " "
                text += self._inv_special[token_id] + " "
                last = i + 1
        return text + str(self.sp.decode(ids[last:]))

    eod = property(lambda self: self._eod)
    eos = property(lambda self: self._eos)
    bos = property(lambda self: self._bos)
    pad = property(lambda self: self._pad)
    cls = property(lambda self: self._cls)
    sep = property(lambda self: self._sep)
    mask = property(lambda self: self._mask)

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return list(self._extra)


class NullTokenizer(Tokenizer):
    """Pre-tokenised ids; ``eod`` is ``vocab_size`` and ``.vocab_size`` counts it."""

    def __init__(self, vocab_size: int) -> None:
        if int(vocab_size) < 1:
            raise ValueError(f"NullTokenizer needs a positive vocab size, got {vocab_size}")
        self._size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._size + 1

    def tokenize(self, text: Any) -> list[int]:
        if isinstance(text, str):
            try:
                ids = [int(tok) for tok in text.split()]
            except ValueError:
                raise ValueError(
                    "pre-tokenised text must be integers separated by spaces"
                ) from None
        elif isinstance(text, list) and all(type(t) is int for t in text):
            ids = list(text)
        else:
            raise ValueError(
                f"expected a string of ids or a list of ints, got {type(text).__name__}"
            )
        bad = [i for i in ids if not 0 <= i < self._size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} outside [0, {self._size}) (vocab size {self._size})"
            )
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    eod = property(lambda self: self._size)


TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "NullTokenizer")


def build_tokenizer(
    tokenizer_type: str,
    *,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    vocab_extra_ids: int = 0,
) -> Tokenizer:
    """Megatron's ``build_tokenizer`` for the types we support (TOKENIZER_TYPES)."""
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if not tokenizer_model:
            raise ValueError(f"{tokenizer_type} needs --tokenizer-model (a .model file)")
        if tokenizer_type == "GPTSentencePieceTokenizer":
            return GPTSentencePieceTokenizer(tokenizer_model)
        return SentencePieceTokenizer(tokenizer_model, vocab_extra_ids=vocab_extra_ids)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    raise ValueError(
        f"tokenizer type {tokenizer_type!r} is not supported; choose from {TOKENIZER_TYPES}"
    )
