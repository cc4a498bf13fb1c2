"""Export a finished canonical checkpoint as a Hugging Face ``transformers`` checkpoint.

Every check runs before the first byte is written: the family fits the model
exactly (:func:`megatron_msg.export.hf.choose_family`), every mask is at 1
(:func:`megatron_msg.export.finished.foldable_masks`), the tokenizer's ids fit
the model's vocabulary, and transformers accepts the config. Tensors are then
read from the canonical store one at a time and streamed into the output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_msg.checkpoint.canonical import CanonicalReader
from megatron_msg.config import ModelConfig
from megatron_msg.export.files import DEFAULT_SHARD_BYTES, HFCheckpointWriter
from megatron_msg.export.finished import foldable_masks
from megatron_msg.export.hf import (
    ExportError,
    Family,
    SpecialIds,
    choose_family,
    hf_config,
    hf_tensors,
)
from megatron_msg.export.tokenizer import HFTokenizer, build_hf_tokenizer, save_hf_tokenizer
from megatron_msg.model.canonical import mask_specs

PROVENANCE_FILE = "megatron_msg_export.json"


@dataclass(frozen=True)
class ExportReport:
    path: Path
    family: Family
    tensors: int
    folded_masks: tuple[str, ...]
    tokenizer: bool


def export_hf(
    *,
    load: str | os.PathLike[str],
    out: str | os.PathLike[str],
    tokenizer_model: str | None = None,
    tokenizer_type: str = "GPTSentencePieceTokenizer",
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> ExportReport:
    """Write the model of canonical checkpoint ``load`` to ``out`` (see the module docstring)."""
    if Path(out).resolve() == Path(load).resolve():
        raise ExportError(f"--out ({out}) must not be the checkpoint being exported")
    _refuse_training_checkpoint(Path(load))
    with CanonicalReader(load) as reader:
        meta = reader.meta
        config = meta.model
        family = choose_family(config)
        masks = {n: reader.get(n) for n in mask_specs(config) if reader.has(n)}
        folded = foldable_masks(masks, masks_meta=meta.masks, step=meta.step)
        tok = _tokenizer(tokenizer_model, tokenizer_type, config.vocab_size)
        special = tok.special if tok is not None else SpecialIds()
        hf = _checked_config(config, family, special=special, dtype=dtype)
        count = 0
        with HFCheckpointWriter(
            out, dtype=dtype, shard_bytes=shard_bytes, overwrite=overwrite
        ) as writer:
            for name, tensor in hf_tensors(config, family, reader.get):
                writer.add(name, tensor)
                count += 1
            _write_config(hf, writer.tmp)
            if tok is not None:
                tok.tokenizer.model_max_length = config.max_seq_len
                save_hf_tokenizer(tok, writer.tmp)
            provenance = {
                "source": str(Path(load).resolve()),
                "step": meta.step,
                "stage": meta.stage,
                "model": config.to_dict(),
                "architecture": family.architecture,
                "vocab": f"first {config.vocab_size} rows of {config.padded_vocab_size()}",
                "folded_masks": folded,
            }
            (writer.tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
            path = writer.finalize()
    return ExportReport(path, family, count, tuple(folded), tok is not None)


def _checked_config(
    config: ModelConfig, family: Family, *, special: SpecialIds, dtype: torch.dtype
) -> Any:
    try:
        hf = hf_config(config, family, special=special)
    except ImportError:
        raise
    except Exception as err:  # transformers' own (strict dataclass) validation
        raise ExportError(f"transformers rejects the {family.architecture} config: {err}") from err
    hf.dtype = str(dtype).removeprefix("torch.")  # what from_pretrained loads by default
    return hf


def _refuse_training_checkpoint(path: Path) -> None:
    """A training run's DeepSpeed checkpoint is not canonical; say so instead of "no meta.json"."""
    if (path / "meta.json").exists():
        return
    markers = [m for m in ("latest", "msg_meta.json") if (path / m).exists()]
    if markers:
        raise ExportError(
            f"{path} is a training checkpoint (DeepSpeed's native layout: {', '.join(markers)}), "
            "not a canonical checkpoint; export reads canonical checkpoints only "
            "(meta.json + index.json + safetensors shards)"
        )


def _tokenizer(model_file: str | None, tokenizer_type: str, vocab_size: int) -> HFTokenizer | None:
    if model_file is None:
        return None
    try:
        built = build_hf_tokenizer(model_file=model_file, tokenizer_type=tokenizer_type)
    except (OSError, RuntimeError) as err:  # sentencepiece / protobuf parse failures
        raise ExportError(f"cannot read tokenizer model {model_file}: {err}") from None
    if built.size > vocab_size:
        raise ExportError(
            f"the tokenizer ({tokenizer_type} of {model_file}) has {built.size} ids but the "
            f"model's vocab_size is {vocab_size}: it is not the tokenizer the model was trained with"
        )
    return built


def _write_config(hf: Any, directory: Path) -> None:
    from transformers import GenerationConfig

    hf.save_pretrained(str(directory))
    GenerationConfig.from_model_config(hf).save_pretrained(str(directory))
