"""Configuration dataclasses, YAML loading and validation.

Validation happens before any work starts and every error names the offending
values, e.g. "num_heads (6) must be divisible by tensor parallel size (4)".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

NormKind = Literal["layernorm", "rmsnorm"]
ActivationKind = Literal["gelu", "swiglu"]
PositionKind = Literal["learned", "rope"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu", "swiglu"),
    "position_embedding": ("learned", "rope"),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the values."""


def pad_vocab_size(vocab_size: int, *, tp_size: int, multiple: int = 128) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of ``multiple * tp_size``."""
    step = multiple * tp_size
    return ((vocab_size + step - 1) // step) * step


@dataclass(frozen=True)
class ModelConfig:
    """Shape and variant of a GPT model. Sizes are canonical (topology-free)."""

    vocab_size: int  # unpadded; the embedding is padded by pad_vocab_size
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_layers: int
    head_dim: int = 64  # fixed, decoupled from hidden_size so heads grow alone
    max_seq_len: int = 1024
    norm: NormKind = "layernorm"
    activation: ActivationKind = "gelu"
    position_embedding: PositionKind = "learned"
    tie_embeddings: bool = True
    use_bias: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # GPT-2 / Megatron: attn.proj and mlp.fc2 weights get std / sqrt(2 * num_layers).
    scaled_init: bool = True
    rope_base: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, *, tp_size: int = 1, pp_size: int = 1) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "ffn_hidden_size",
            "num_heads",
            "num_layers",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim < 1 or (self.position_embedding == "rope" and self.head_dim % 2):
            raise ConfigError(f"head_dim ({self.head_dim}) must be positive (and even for rope)")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not self.init_std > 0.0 or not self.norm_eps > 0.0:
            raise ConfigError(
                f"init_std ({self.init_std}) and norm_eps ({self.norm_eps}) must be positive"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if tp_size < 1 or pp_size < 1:
            raise ConfigError(f"parallel sizes must be >= 1, got tp={tp_size} pp={pp_size}")
        if self.num_heads % tp_size:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be divisible by tensor parallel size ({tp_size})"
            )
        if self.ffn_hidden_size % tp_size:
            raise ConfigError(
                f"ffn_hidden_size ({self.ffn_hidden_size}) must be divisible by "
                f"tensor parallel size ({tp_size})"
            )
        if self.padded_vocab_size() % tp_size:
            # The canonical vocabulary is padded independently of TP (so the loss
            # does not depend on TP); every TP size must divide it.
            raise ConfigError(
                f"padded vocab size ({self.padded_vocab_size()}) must be divisible by "
                f"tensor parallel size ({tp_size})"
            )
        if self.num_layers < pp_size:
            raise ConfigError(
                f"num_layers ({self.num_layers}) must be >= pipeline parallel size ({pp_size})"
            )

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        return pad_vocab_size(self.vocab_size, tp_size=tp_size)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; known options: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
