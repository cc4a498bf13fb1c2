"""A SentencePiece model as a transformers tokenizer that encodes exactly like ours.

transformers 5's ``LlamaTokenizer`` rebuilds a Llama-style BPE (no normalizer,
byte fallback on) whatever the ``.model`` says, so a model trained with
SentencePiece's defaults (NFKC normalisation, extra-whitespace removal) or as
unigram would tokenise differently. Instead the whole pipeline is built from
the model's own proto with transformers' ``SpmConverter.build_tokenizer_from_spm_proto``
(normaliser spec, dummy prefix, BPE merges ranked by piece score or unigram
scores, byte fallback, user-defined pieces) and saved as ``tokenizer.json``
for the generic ``TokenizersBackend`` class, which ``AutoTokenizer`` loads
offline. The ``.model`` file is copied beside it as ``tokenizer.model``.

Tokenizer types (``megatron_msg.data.tokenizer``):

- ``GPTSentencePieceTokenizer``: the model's own ids; ``eos`` = the model's eos
  (our ``eod``). Special-token strings inside a text are tokenised as text,
  as ``SentencePieceProcessor.encode`` does.
- ``SentencePieceTokenizer``: Megatron's appended specials (<CLS>, <SEP>,
  <EOD>, <MASK>, and pad/bos/eos pieces the model lacks) become added tokens
  with the same ids, matched inside texts as Megatron does; ``eos`` = <EOD>.

Known difference: for a *unigram* model, a control piece's text ("<s>",
"</s>", "<unk>") inside a text encodes to that piece's id, where SentencePiece
spells it out with other pieces (tokenizers' Unigram cannot exclude pieces from
matching). BPE and char models encode exactly; word models are refused.

No BOS/EOS is added on encode (our data pipeline adds none but the ``eod``
after each document).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_msg.data.tokenizer import GPTSentencePieceTokenizer, SentencePieceTokenizer
from megatron_msg.export.hf import ExportError, SpecialIds

TOKENIZER_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer")
# trainer_spec.model_type values whose encoding the conversion reproduces.
_SPM_MODEL_TYPES = {1: "unigram", 2: "bpe", 4: "char"}


@dataclass(frozen=True)
class HFTokenizer:
    """A built transformers tokenizer, its id count and the ids the model config records."""

    tokenizer: Any
    size: int
    special: SpecialIds
    model_file: str


def _optional(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def build_hf_tokenizer(*, model_file: str, tokenizer_type: str) -> HFTokenizer:
    """Build (in memory) the transformers tokenizer of ``model_file`` for ``tokenizer_type``."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ExportError(
            f"tokenizer type must be one of {TOKENIZER_TYPES}, got {tokenizer_type!r}"
        )
    from tokenizers import AddedToken
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    gpt = tokenizer_type == "GPTSentencePieceTokenizer"
    ours = GPTSentencePieceTokenizer(model_file) if gpt else SentencePieceTokenizer(model_file)
    backend, unk = _backend(model_file)
    # SentencePiece encodes "<s>" inside a text as characters (split_special_tokens);
    # Megatron's tokenizer with appended specials matches them, as added tokens do,
    # but not "<unk>", which therefore is no special token there.
    tokenizer = TokenizersBackend(
        tokenizer_object=backend,
        split_special_tokens=gpt,
        **({"unk_token": unk} if gpt and unk else {}),
    )
    if isinstance(ours, SentencePieceTokenizer):
        _add_megatron_specials(tokenizer, ours, AddedToken)
    # Named after the appended tokens exist, so naming one cannot append it out of order.
    names = {"bos_token": ours.bos, "eos_token": ours.eod}
    tokenizer.add_special_tokens({k: ours.inv_vocab[i] for k, i in names.items() if i >= 0})
    return HFTokenizer(
        tokenizer=tokenizer,
        size=len(tokenizer),
        special=SpecialIds(bos=_optional(ours.bos), eos=_optional(ours.eod), pad=None),
        model_file=model_file,
    )


def _backend(model_file: str) -> tuple[Any, str | None]:
    """The ``tokenizers.Tokenizer`` built from the model's proto, and its unk piece."""
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    proto = SentencePieceExtractor(model_file).proto
    spec = proto.trainer_spec
    model_type = _SPM_MODEL_TYPES.get(spec.model_type)
    if model_type is None:
        raise ExportError(
            f"{model_file}: SentencePiece model type {spec.model_type} cannot be exported; "
            f"supported: {sorted(_SPM_MODEL_TYPES.values())}"
        )
    # A dict vocab builds a BPE model, a list of (piece, score) a unigram one.
    vocab: Any = (
        [(p.piece, p.score) for p in proto.pieces]
        if model_type == "unigram"
        else {p.piece: i for i, p in enumerate(proto.pieces)}
    )
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab, legacy=True)
    return backend, (spec.unk_piece if spec.unk_id >= 0 else None)


def _add_megatron_specials(tokenizer: Any, ours: SentencePieceTokenizer, added: Any) -> None:
    """Megatron's special tokens as added tokens; the appended ones keep Megatron's ids."""
    ids = [ours.cls, ours.sep, ours.eod, ours.mask, ours.pad, ours.bos, ours.eos]
    ids += ours.additional_special_tokens_ids
    # Adding in id order appends the new ones in Megatron's order.
    tokens = [ours.inv_vocab[i] for i in sorted(set(ids))]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [added(t, special=True, normalized=False) for t in tokens]}
    )
    wrong = [(t, i, tokenizer.convert_tokens_to_ids(t)) for t, i in ours.vocab.items()]
    wrong = [w for w in wrong if w[1] >= ours.sp.get_piece_size() and w[1] != w[2]]
    if wrong:
        raise ExportError(f"appended special tokens got other ids (token, ours, HF): {wrong[:4]}")


def save_hf_tokenizer(built: HFTokenizer, directory: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (and friends) and tokenizer.model."""
    built.tokenizer.save_pretrained(str(directory))
    shutil.copyfile(built.model_file, directory / "tokenizer.model")
