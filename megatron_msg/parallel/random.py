"""TP-invariant initialisation, canonical <-> shard slicing, and per-rank RNG streams.

Initialisation draws the *full* canonical tensor from a seed with a private CPU
``torch.Generator`` (the global RNG is never touched) and keeps this rank's
contiguous slice, so TP=1 and TP=N start from bitwise identical canonical
weights. Costs the full tensor in CPU memory once per rank, as Megatron's
``use_cpu_initialization`` does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_msg.config import ConfigError
from megatron_msg.parallel.groups import ProcessGroups

# Fills a full (canonical) tensor in place, drawing only from the generator.
InitMethod = Callable[[torch.Tensor, torch.Generator], None]


def normal_init(std: float = 0.02) -> InitMethod:
    """N(0, std), the GPT default for weights."""

    def init(t: torch.Tensor, gen: torch.Generator) -> None:
        t.normal_(0.0, std, generator=gen)

    return init


def scaled_normal_init(std: float, *, num_layers: int) -> InitMethod:
    """N(0, std / sqrt(2 * num_layers)) for residual output projections (GPT-2, Megatron)."""
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    return normal_init(std / (2.0 * num_layers) ** 0.5)


def zeros_init() -> InitMethod:
    def init(t: torch.Tensor, gen: torch.Generator) -> None:
        t.zero_()

    return init


def derive_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed per (seed, tensor name), independent of creation order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def init_full(
    shape: Sequence[int],
    *,
    seed: int,
    init_method: InitMethod,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The full canonical tensor drawn from ``seed`` on CPU (drawn in fp32, then cast)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    full = torch.empty(tuple(shape), dtype=torch.float32)
    init_method(full, gen)
    return full.to(dtype)


def _check_divisible(size: int, dim: int, groups: ProcessGroups) -> None:
    if size % groups.tp_size:
        raise ConfigError(
            f"dimension {dim} of size {size} is not divisible by "
            f"tensor parallel size ({groups.tp_size})"
        )


def shard_tensor(full: torch.Tensor, *, dim: int | None, groups: ProcessGroups) -> torch.Tensor:
    """This rank's contiguous slice of ``full`` along ``dim`` (a copy; None = replicated)."""
    if dim is None or groups.tp_size == 1:
        return full.clone()
    _check_divisible(full.shape[dim], dim, groups)
    return full.chunk(groups.tp_size, dim=dim)[groups.tp_rank].clone()


def gather_tensor(shard: torch.Tensor, *, dim: int | None, groups: ProcessGroups) -> torch.Tensor:
    """Concatenate every TP rank's slice along ``dim`` (collective over TP; no autograd)."""
    if dim is None or groups.tp_size == 1:
        return shard.detach().clone()
    shard = shard.detach().contiguous()
    parts = [torch.empty_like(shard) for _ in range(groups.tp_size)]
    dist.all_gather(parts, shard, group=groups.tp_group)
    return torch.cat(parts, dim=dim)


def init_shard(
    shape: Sequence[int],
    *,
    dim: int | None,
    seed: int,
    groups: ProcessGroups,
    init_method: InitMethod,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """This rank's slice of the canonical tensor ``shape`` drawn from ``seed``."""
    if dim is not None:
        _check_divisible(shape[dim], dim, groups)
    full = init_full(shape, seed=seed, init_method=init_method, dtype=dtype)
    return shard_tensor(full, dim=dim, groups=groups)


# Megatron's offsets: the TP stream differs per tp rank, the default stream
# differs per pipeline stage but is shared by TP ranks (replicated activations
# must get the same dropout mask on every TP rank).
_TP_SEED_OFFSET = 2718
_PP_SEED_STRIDE = 100


class ParallelRNG:
    """Named per-rank random streams for dropout (Megatron's RNG tracker, as an object).

    ``"default"`` is identical across TP ranks (dropout on replicated
    activations); ``"tp"`` differs per TP rank (dropout inside a TP region, e.g.
    attention probabilities of this rank's heads). Nothing global is read or
    changed; the states go into checkpoints through ``state_dict``.
    """

    STREAMS = ("default", "tp")

    def __init__(
        self, *, seed: int, groups: ProcessGroups, device: torch.device | str = "cpu"
    ) -> None:
        base = seed + _PP_SEED_STRIDE * groups.pp_rank
        self.device = torch.device(device)
        self._gens: dict[str, torch.Generator] = {}
        for name, stream_seed in (
            ("default", base),
            ("tp", base + _TP_SEED_OFFSET + groups.tp_rank),
        ):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(stream_seed)
            self._gens[name] = gen

    def generator(self, stream: str) -> torch.Generator:
        if stream not in self._gens:
            raise ConfigError(f"unknown RNG stream {stream!r}; known: {self.STREAMS}")
        return self._gens[stream]

    def dropout(self, x: torch.Tensor, p: float, *, stream: str, training: bool) -> torch.Tensor:
        """Inverted dropout with a mask drawn from ``stream``."""
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout probability must be in [0, 1), got {p}")
        if not training or p == 0.0:
            return x
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=self.generator(stream))
        return x * keep / (1.0 - p)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: gen.get_state() for name, gen in self._gens.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self._gens):
            raise ConfigError(f"RNG state streams {sorted(state)} != {sorted(self._gens)}")
        for name, gen in self._gens.items():
            gen.set_state(state[name])

    @contextmanager
    def replaying(self, state: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run a block from an earlier ``state_dict()``, then continue where we were.

        For activation recomputation: take ``state_dict()`` before the block's
        forward, wrap the recomputation in ``replaying(state)`` and it draws the
        same dropout masks without disturbing the streams' current position.
        """
        current = self.state_dict()
        self.load_state_dict(state)
        try:
            yield
        finally:
            self.load_state_dict(current)
