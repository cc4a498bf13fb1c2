"""Tokenizers: Megatron's ids and interface, trained on a tiny generated corpus."""

from __future__ import annotations

import pytest

from megatron_msg.data.synthetic import synthetic_documents
from megatron_msg.data.tokenizer import (
    GPTSentencePieceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)
from megatron_msg.data.train_tokenizer import train_sentencepiece


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
    return train_sentencepiece(
        texts=iter(list(synthetic_documents(300, seed=11))), model_prefix=prefix, vocab_size=300,
        model_type="bpe", character_coverage=1.0, minloglevel=2, num_threads=1,
    )  # fmt: skip


def test_sentencepiece_tokenizer_megatron_ids(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    n = sp.get_piece_size()
    assert n == 300
    # Megatron appends <CLS>, <SEP>, <EOD>, <MASK>, and <PAD> (the model has no pad)
    assert (tok.cls, tok.sep, tok.eod, tok.mask, tok.pad) == (n, n + 1, n + 2, n + 3, n + 4)
    assert (tok.bos, tok.eos) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    assert tok.vocab_size == n + 5 == len(tok.vocab) == len(tok.inv_vocab)
    assert tok.inv_vocab[tok.eod] == "<EOD>"
    text = "Tra lou<EOD>pai mest"
    ids = tok.tokenize(text)
    assert ids == [*sp.encode("Tra lou"), tok.eod, *sp.encode("pai mest")]
    assert tok.detokenize(ids) == "Tra lou <EOD> pai mest"
    texts = ["Stai ron.", "", "ba<MASK>", "</s>x"]
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    assert tok.tokenize("</s>")[0] == tok.eos


def test_gpt_sentencepiece_tokenizer(sp_model):
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert isinstance(tok, GPTSentencePieceTokenizer)
    assert tok.vocab_size == 300 and tok.eod == tok.eos == 2 and tok.pad == -1 and tok.cls == -1
    text = "Plai stou tren café."
    assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.tokenize_batch([text, "x"]) == [tok.tokenize(text), tok.tokenize("x")]


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tok, NullTokenizer)
    assert tok.vocab_size == 101 and tok.eod == 100
    assert tok.tokenize("5 7  99") == [5, 7, 99]
    assert tok.tokenize([1, 2]) == [1, 2]
    assert tok.detokenize([5, 7]) == "5 7"
    with pytest.raises(ValueError, match=r"token id 100 outside \[0, 100\)"):
        tok.tokenize("1 100")
    with pytest.raises(ValueError, match="integers separated by spaces"):
        tok.tokenize("1 x")


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="'GPT2BPETokenizer' is not supported"):
        build_tokenizer("GPT2BPETokenizer")
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(ValueError, match="does not exist"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "no.model"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "bad.model"))
    with pytest.raises(ValueError, match="needs --vocab-size"):
        build_tokenizer("NullTokenizer")
