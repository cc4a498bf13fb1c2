"""Our canonical GPT tensors as Hugging Face GPT-2 or Llama (Mistral) checkpoints.

Which family computes our model exactly:

- **GPT-2** (``GPT2LMHeadModel``) for LayerNorm + GELU + learned positions.
  Our GELU is the tanh form, which transformers calls ``gelu_pytorch_tanh``
  (the same ``F.gelu(approximate="tanh")`` call). GPT-2 derives the head size
  from the width, so it needs ``num_heads * head_dim == hidden_size``. It always
  has biases: a model without ``use_bias`` exports zeros, which is exact.
- **Llama** (``LlamaForCausalLM``) for RMSNorm + SwiGLU + RoPE, with an explicit
  ``head_dim`` (MSG grows heads apart from the width) and ``attention_bias`` /
  ``mlp_bias`` from ``use_bias``. Both use rotate-half RoPE with
  ``inv_freq = 1 / base^(2i/d)`` and ``rms = sqrt(mean(x^2) + eps)``.
  transformers 5 refuses a ``LlamaConfig`` whose ``hidden_size`` is not a
  multiple of ``num_attention_heads`` even with an explicit ``head_dim``; such
  a model is written as ``MistralForCausalLM`` instead, the same decoder
  (no sliding window) that takes any ``head_dim`` but has no biases.

Vocabulary: our embedding (and untied head) are padded to a multiple of 128;
only the first ``vocab_size`` rows are exported, so the exported logits equal
ours over the real vocabulary (the padded ids are never produced by the
tokenizer; softmax probabilities are renormalised over the real ids).

Layout changes: our qkv rows are head-major (head j owns rows [3dj, 3d(j+1)) as
q, k, v); GPT-2's ``c_attn`` wants all q, then all k, then all v, and stores
weights as ``[in, out]`` (Conv1D); Llama wants separate q/k/v projections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_msg.config import ModelConfig

GetTensor = Callable[[str], torch.Tensor]
Tensors = Iterator[tuple[str, torch.Tensor]]

FAMILY_VARIANTS = {
    "gpt2": ("layernorm", "gelu", "learned"),
    "llama": ("rmsnorm", "swiglu", "rope"),
}


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message names the values."""


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the HF config records (None where the tokenizer has none)."""

    bos: int | None = None
    eos: int | None = None
    pad: int | None = None


@dataclass(frozen=True)
class Family:
    """A target family: HF ``model_type`` and architecture class name."""

    model_type: str  # "gpt2" | "llama" | "mistral"
    architecture: str


def choose_family(config: ModelConfig) -> Family:
    """The HF family that computes ``config`` exactly, or ExportError saying why none does."""
    variant = (config.norm, config.activation, config.position_embedding)
    n, d, h = config.num_heads, config.head_dim, config.hidden_size
    if variant == FAMILY_VARIANTS["gpt2"]:
        if n * d != h:
            raise ExportError(
                f"GPT-2 needs num_heads * head_dim == hidden_size; this model has num_heads "
                f"({n}) * head_dim ({d}) = {n * d} != hidden_size ({h})"
            )
        return Family("gpt2", "GPT2LMHeadModel")
    if variant == FAMILY_VARIANTS["llama"]:
        if h % n == 0:
            return Family("llama", "LlamaForCausalLM")
        if not config.use_bias:
            return Family("mistral", "MistralForCausalLM")
        raise ExportError(
            f"Llama (transformers 5) needs hidden_size ({h}) to be a multiple of num_heads "
            f"({n}), and Mistral, which does not, has no biases (use_bias is True)"
        )
    raise ExportError(
        f"no Hugging Face family computes norm={config.norm}, activation={config.activation}, "
        f"position_embedding={config.position_embedding} exactly: GPT-2 needs "
        f"layernorm+gelu+learned, Llama needs rmsnorm+swiglu+rope"
    )


def hf_config(config: ModelConfig, family: Family, *, special: SpecialIds) -> Any:
    """The transformers config object (validated by transformers) of ``family``."""
    if family.model_type == "gpt2":
        return gpt2_config(config, special=special)
    return llama_config(config, family=family, special=special)


def hf_tensors(config: ModelConfig, family: Family, get: GetTensor) -> Tensors:
    """(HF name, tensor) pairs, one canonical tensor read at a time through ``get``."""
    if family.model_type == "gpt2":
        return gpt2_tensors(config, get)
    return llama_tensors(config, get)


def _split_qkv(tensor: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Head-major qkv rows (weight [n*3*d, h] or bias [n*3*d]) -> q, k, v, each [n*d, ...]."""
    n, d = config.num_heads, config.head_dim
    per_head = tensor.reshape(n, 3, d, *tensor.shape[1:])
    return tuple(per_head[:, i].reshape(n * d, *tensor.shape[1:]) for i in range(3))


def _vocab_rows(tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    return tensor[: config.vocab_size].clone()


# ----------------------------------------------------------------------------- GPT-2


def gpt2_config(config: ModelConfig, *, special: SpecialIds) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_seq_len,
        n_embd=config.hidden_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_inner=config.ffn_hidden_size,
        activation_function="gelu_pytorch_tanh",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        initializer_range=config.init_std,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=special.bos,
        eos_token_id=special.eos,
        pad_token_id=special.pad,
        architectures=["GPT2LMHeadModel"],
    )


def _gpt2_bias(get: GetTensor, name: str, config: ModelConfig, size: int) -> torch.Tensor:
    # GPT-2 always has biases; zeros compute exactly what a bias-free model does.
    return get(name) if config.use_bias else torch.zeros(size, dtype=torch.float32)


def gpt2_tensors(config: ModelConfig, get: GetTensor) -> Tensors:
    h, f = config.hidden_size, config.ffn_hidden_size
    yield "transformer.wte.weight", _vocab_rows(get("embed.word.weight"), config)
    yield "transformer.wpe.weight", get("embed.pos.weight")
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}", f"transformer.h.{i}"
        yield f"{hf}.ln_1.weight", get(f"{ours}.norm1.weight")
        yield f"{hf}.ln_1.bias", _gpt2_bias(get, f"{ours}.norm1.bias", config, h)
        # Conv1D stores [in, out]; c_attn's outputs are all q, then all k, then all v.
        qkv = torch.cat(_split_qkv(get(f"{ours}.attn.qkv.weight"), config), dim=0)
        yield f"{hf}.attn.c_attn.weight", qkv.t().contiguous()
        bias = _gpt2_bias(get, f"{ours}.attn.qkv.bias", config, 3 * h)
        yield f"{hf}.attn.c_attn.bias", torch.cat(_split_qkv(bias, config))
        yield f"{hf}.attn.c_proj.weight", get(f"{ours}.attn.proj.weight").t().contiguous()
        yield f"{hf}.attn.c_proj.bias", _gpt2_bias(get, f"{ours}.attn.proj.bias", config, h)
        yield f"{hf}.ln_2.weight", get(f"{ours}.norm2.weight")
        yield f"{hf}.ln_2.bias", _gpt2_bias(get, f"{ours}.norm2.bias", config, h)
        yield f"{hf}.mlp.c_fc.weight", get(f"{ours}.mlp.fc1.weight").t().contiguous()
        yield f"{hf}.mlp.c_fc.bias", _gpt2_bias(get, f"{ours}.mlp.fc1.bias", config, f)
        yield f"{hf}.mlp.c_proj.weight", get(f"{ours}.mlp.fc2.weight").t().contiguous()
        yield f"{hf}.mlp.c_proj.bias", _gpt2_bias(get, f"{ours}.mlp.fc2.bias", config, h)
    yield "transformer.ln_f.weight", get("final_norm.weight")
    yield "transformer.ln_f.bias", _gpt2_bias(get, "final_norm.bias", config, h)
    if not config.tie_embeddings:
        yield "lm_head.weight", _vocab_rows(get("lm_head.weight"), config)


# ----------------------------------------------------------------------------- Llama


def llama_config(config: ModelConfig, *, family: Family, special: SpecialIds) -> Any:
    from transformers import LlamaConfig, MistralConfig

    common: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "initializer_range": config.init_std,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "architectures": [family.architecture],
    }
    if family.model_type == "mistral":
        return MistralConfig(**common, sliding_window=None)
    return LlamaConfig(**common, attention_bias=config.use_bias, mlp_bias=config.use_bias)


def llama_tensors(config: ModelConfig, get: GetTensor) -> Tensors:
    yield "model.embed_tokens.weight", _vocab_rows(get("embed.word.weight"), config)
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        yield f"{hf}.input_layernorm.weight", get(f"{ours}.norm1.weight")
        suffixes = ("weight", "bias") if config.use_bias else ("weight",)
        for suffix in suffixes:
            q, k, v = _split_qkv(get(f"{ours}.attn.qkv.{suffix}"), config)
            yield f"{hf}.self_attn.q_proj.{suffix}", q.contiguous()
            yield f"{hf}.self_attn.k_proj.{suffix}", k.contiguous()
            yield f"{hf}.self_attn.v_proj.{suffix}", v.contiguous()
        for suffix in suffixes:
            yield f"{hf}.self_attn.o_proj.{suffix}", get(f"{ours}.attn.proj.{suffix}")
        yield f"{hf}.post_attention_layernorm.weight", get(f"{ours}.norm2.weight")
        # Ours: act = silu(gate x) * fc1 x, so fc1 is Llama's up_proj.
        for ours_name, hf_name in (("gate", "gate_proj"), ("fc1", "up_proj"), ("fc2", "down_proj")):
            for suffix in suffixes:
                yield f"{hf}.mlp.{hf_name}.{suffix}", get(f"{ours}.mlp.{ours_name}.{suffix}")
    yield "model.norm.weight", get("final_norm.weight")
    if not config.tie_embeddings:
        yield "lm_head.weight", _vocab_rows(get("lm_head.weight"), config)
