"""TP-invariant initialisation of canonical tensors from a seed.

Each canonical tensor is drawn in full from its own seed, derived from
``(seed, name)``, so a tensor's values depend neither on the TP size nor on
which other tensors exist or in which order they are built. Growth operators
reuse :func:`init_canonical_tensor` for the weights of new units.

Rules: weights N(0, init_std) (``attn.proj`` and ``mlp.fc2`` with
std / sqrt(2 * num_layers) when ``config.scaled_init``), biases 0, norm weights 1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_msg.config import ModelConfig
from megatron_msg.model.canonical import CanonicalStateError, TensorSpec, parameter_specs
from megatron_msg.parallel.random import (
    InitMethod,
    derive_seed,
    init_full,
    normal_init,
    scaled_normal_init,
    zeros_init,
)

_NORMS = ("norm1", "norm2", "final_norm")
_RESIDUAL_OUTPUTS = ("attn.proj.weight", "mlp.fc2.weight")


def _ones_init(t: torch.Tensor, gen: torch.Generator) -> None:
    t.fill_(1.0)


def init_method_for(name: str, config: ModelConfig) -> InitMethod:
    """How the canonical parameter ``name`` is initialised under ``config``."""
    if name not in parameter_specs(config):
        raise CanonicalStateError(f"{name!r} is not a parameter of this model config")
    return _method(name, config)


def _method(name: str, config: ModelConfig) -> InitMethod:
    module, _, leaf = name.rpartition(".")
    if leaf == "bias":
        return zeros_init()
    if module.rpartition(".")[2] in _NORMS:
        return _ones_init
    if config.scaled_init and name.endswith(_RESIDUAL_OUTPUTS):
        return scaled_normal_init(config.init_std, num_layers=config.num_layers)
    return normal_init(config.init_std)


def init_canonical_tensor(
    name: str, config: ModelConfig, *, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The full canonical tensor ``name`` drawn from ``seed`` (CPU, drawn in fp32)."""
    specs = parameter_specs(config)
    if name not in specs:
        raise CanonicalStateError(f"{name!r} is not a parameter of this model config")
    return _draw(name, specs[name], config, seed=seed, dtype=dtype)


def _draw(
    name: str, spec: TensorSpec, config: ModelConfig, *, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    method = _method(name, config)
    return init_full(spec.shape, seed=derive_seed(seed, name), init_method=method, dtype=dtype)


def iter_canonical_init(
    config: ModelConfig, *, seed: int, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` one at a time, so only one full tensor is alive at once."""
    for name, spec in parameter_specs(config).items():
        yield name, _draw(name, spec, config, seed=seed, dtype=dtype)


def canonical_init(config: ModelConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """Every canonical parameter of ``config`` drawn from ``seed`` (fp32, CPU, no masks)."""
    return dict(iter_canonical_init(config, seed=seed))
