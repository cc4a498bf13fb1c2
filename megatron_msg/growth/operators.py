"""Strictly function-preserving growth of a canonical GPT state dict (MSG).

``grow`` takes a canonical state (DESIGN.md, "Canonical parameter layout"),
the config it was built for and a larger config, and returns the grown state
plus ``maps`` saying where every old entry went. It is pure tensor code: no
model, no process groups, so a 51B checkpoint can be grown offline and the
result loaded at any TP/PP/DP.

Why the result computes exactly what the small model did: every new unit sits
behind a mask that starts at 0 (DESIGN.md, "Masks"). New hidden channels are
zeroed at the embedding output, at every norm output and at the outputs of
attn.proj and mlp.fc2, so they stay 0 in the residual stream and the masked
norm statistics ignore them; new heads' outputs and new FFN activations are
multiplied by 0 before the projection that reads them; a new layer with depth
mask 0 is the identity, ``0*Block(x) + 1*x``. The new weights can therefore be
random (they must be, or new heads and neurons would stay identical), and old
mask values (fractional during a ramp) are kept as they are.

Because growth only ever appends at the end of every canonical axis (the qkv
rows are head-major, so new heads are whole row blocks at the end), the old
entries of every grown tensor are the leading block ``[0:old_size)`` in each
dimension; ``TensorMap.index`` is that block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model.canonical import canonical_specs, layer_parameter_specs, validate_canonical
from megatron_msg.model.init import init_canonical_tensor
from megatron_msg.parallel.random import derive_seed

__all__ = [
    "DEPTH_STRATEGIES",
    "INIT_SCHEMES",
    "GrowthMaps",
    "GrowthPlan",
    "GrowthResult",
    "InitFn",
    "LayerMap",
    "TensorMap",
    "carry_over",
    "grow",
    "is_mask_name",
    "plan_growth",
]

DepthStrategy = Literal["stack", "interleave", "random"]
DEPTH_STRATEGIES: tuple[str, ...] = ("stack", "interleave", "random")
INIT_SCHEMES: tuple[str, ...] = ("normal",)

# init(name, shape, generator) -> tensor of ``shape``: values for a tensor that
# gains new entries (its old entries are written over the result afterwards).
InitFn = Callable[[str, tuple[int, ...], torch.Generator], torch.Tensor]
# fill(name, tensor_map, old_tensor or None) -> tensor of tensor_map.new_shape.
FillFn = Callable[[str, "TensorMap", "torch.Tensor | None"], torch.Tensor]

# Options that change what the network computes or the shape of a fixed axis.
_FIXED_OPTIONS = (
    "vocab_size",
    "head_dim",
    "norm",
    "activation",
    "position_embedding",
    "tie_embeddings",
    "use_bias",
    "norm_eps",
    "rope_base",
)
_GROWN_SIZES = ("hidden_size", "ffn_hidden_size", "num_heads", "num_layers")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorMap:
    """Where the old entries of one grown canonical tensor came from.

    ``source`` is the tensor's name in the old state (a different layer for a
    copied layer) or None for a brand-new tensor, including a mask that was
    folded (all ones, absent) before growth. ``ranges`` holds, per dimension,
    the ``(start, stop)`` of the block of the new tensor that holds the whole
    old tensor; it is empty when ``source`` is None.
    """

    source: str | None
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]

    @property
    def index(self) -> tuple[slice, ...]:
        """``new[map.index]`` is where ``old[source]`` lives."""
        return tuple(slice(start, stop) for start, stop in self.ranges)

    @property
    def grown(self) -> bool:
        return self.source is None or self.old_shape != self.new_shape


@dataclass(frozen=True)
class LayerMap:
    """Origin of one layer of the grown model.

    ``source``: the old layer it was built from (itself, or the layer it copies)
    or None for a freshly initialised layer. ``is_new``: the layer did not exist
    before, so its depth mask starts at 0.
    """

    source: int | None
    is_new: bool


@dataclass(frozen=True)
class GrowthMaps:
    tensors: dict[str, TensorMap]
    layers: tuple[LayerMap, ...]


@dataclass(frozen=True)
class GrowthResult:
    state: dict[str, torch.Tensor]
    maps: GrowthMaps


@dataclass(frozen=True)
class GrowthPlan:
    """What :func:`plan_growth` decided, and the rules that build each grown tensor."""

    old_config: ModelConfig
    new_config: ModelConfig
    maps: GrowthMaps
    init: str | InitFn
    seed: int

    def build(
        self,
        name: str,
        source: torch.Tensor | None,
        *,
        dtype: torch.dtype,
        consume: bool = False,
    ) -> torch.Tensor:
        """Grown tensor ``name`` from ``source``, the old tensor ``maps.tensors[name].source``
        names (None when that is None). ``dtype``: the old parameters' dtype, used
        for freshly drawn values. Returns a new tensor and leaves ``source`` as it
        is; with ``consume`` the caller gives ``source`` up, and an unchanged
        parameter is returned as ``source`` itself instead of a copy."""
        tmap = self.maps.tensors[name]
        if (source is None) != (tmap.source is None):
            raise ValueError(f"{name}: the map's source is {tmap.source!r}, got source={source!r}")
        if source is not None and tuple(source.shape) != tmap.old_shape:
            raise ValueError(
                f"{name}: source {tmap.source} has shape {tuple(source.shape)}, "
                f"the growth plan expects {tmap.old_shape}"
            )
        if is_mask_name(name):
            return _build_mask(name, tmap, source, self.old_config)
        if source is None:
            return self._draw(name, tmap.new_shape, dtype)
        old = source.detach()
        if tmap.old_shape == tmap.new_shape:
            return old if consume else old.clone()
        out = self._draw(name, tmap.new_shape, dtype).to(old.dtype)
        out[tmap.index] = old
        return out

    def _draw(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not callable(self.init):
            # The model's own rule (and seed derivation), so a grown unit is
            # drawn exactly like the same unit of a freshly initialised model.
            return init_canonical_tensor(name, self.new_config, seed=self.seed, dtype=dtype)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, name))
        values = self.init(name, shape, generator)
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != shape:
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
            raise ValueError(f"init returned {got} for {name}, expected a tensor of shape {shape}")
        return values.to(dtype)


def is_mask_name(name: str) -> bool:
    """Masks are buffers: they are in the canonical state but have no optimizer state."""
    return name.startswith("masks.") or ".masks." in name


def grow(
    state: Mapping[str, torch.Tensor],
    old_config: ModelConfig,
    new_config: ModelConfig,
    *,
    init: str | InitFn = "normal",
    depth_strategy: str = "stack",
    seed: int = 0,
    tp_size: int = 1,
) -> GrowthResult:
    """Grow ``state`` (built for ``old_config``) to ``new_config``, preserving its function.

    ``init``: "normal" draws new entries with the model's own init rule for
    ``new_config`` (N(0, init_std), attn.proj and mlp.fc2 scaled by
    1/sqrt(2 * num_layers) when ``scaled_init``, biases 0, norm weights 1); a
    callable ``init(name, shape, generator)`` returns the values of every tensor
    that gains entries (its old entries are then written over them).
    ``depth_strategy``: "stack" appends copies of layers 0, 1, ... on top,
    "interleave" puts each copy right after its source, "random" appends
    freshly initialised layers. New layers have depth mask 0.
    ``seed``: every tensor draws from its own generator seeded by (seed, name),
    so the result does not depend on the order of the state dict or on TP.
    ``tp_size``: the tensor-parallel size the grown model must fit.

    All checks run before anything is built; the input is never modified and
    the result never aliases it. This is :func:`plan_growth` followed by
    :meth:`GrowthPlan.build` for every tensor (a streaming caller does the same
    one tensor at a time).
    """
    bad = sorted(n for n, t in state.items() if not isinstance(t, torch.Tensor))
    if bad:
        raise ConfigError(f"state values must be tensors; not tensors: {bad[:8]}")
    plan = plan_growth(
        {name: tuple(t.shape) for name, t in state.items()},
        old_config,
        new_config,
        init=init,
        depth_strategy=depth_strategy,
        seed=seed,
        tp_size=tp_size,
    )
    dtype = state["embed.word.weight"].dtype
    grown = {
        name: plan.build(name, None if m.source is None else state[m.source], dtype=dtype)
        for name, m in plan.maps.tensors.items()
    }
    return GrowthResult(state=grown, maps=plan.maps)


def plan_growth(
    shapes: Mapping[str, Sequence[int]],
    old_config: ModelConfig,
    new_config: ModelConfig,
    *,
    init: str | InitFn = "normal",
    depth_strategy: str = "stack",
    seed: int = 0,
    tp_size: int = 1,
) -> GrowthPlan:
    """Everything :func:`grow` decides, from the old tensors' *shapes* alone.

    ``shapes`` maps every canonical name of the old state (parameters and
    unfolded masks) to its shape; the arguments are those of :func:`grow` and
    are checked the same way. The result's ``maps`` lists every tensor of the
    grown state in order; :meth:`GrowthPlan.build` makes one of them from its
    source, so a checkpoint can be grown one tensor at a time.
    """
    _validate(shapes, old_config, new_config, init, depth_strategy, seed, tp_size)
    layers = _layer_plan(old_config.num_layers, new_config.num_layers, depth_strategy)
    mapper = _Mapper(shapes, old_config, new_config)
    for name in _global_names(shapes):
        mapper.map_global(name)
    for index, layer in enumerate(layers):
        mapper.map_layer(index, layer)
    return GrowthPlan(old_config, new_config, GrowthMaps(mapper.maps, layers), init, seed)


def carry_over(
    old: Mapping[str, torch.Tensor],
    maps: GrowthMaps,
    *,
    fill: float | FillFn = 0.0,
) -> dict[str, torch.Tensor]:
    """Apply ``maps`` to a per-parameter dict such as Adam's exp_avg or exp_avg_sq.

    Returns one tensor per grown parameter (masks are skipped: they have no
    optimizer state): old entries are copied from ``old[map.source]``, new
    entries come from ``fill``, a constant or ``fill(name, map, old_tensor)``
    returning a full tensor of the new shape (so a policy can look at the old
    statistics). Brand-new tensors use the dtype of the other entries of ``old``.
    """
    names = [name for name in maps.tensors if not is_mask_name(name)]
    _check_carry_inputs(old, maps, names, fill)
    dtype = next((t.dtype for t in old.values()), torch.float32)
    result: dict[str, torch.Tensor] = {}
    for name in names:
        tmap = maps.tensors[name]
        source = old[tmap.source] if tmap.source is not None else None
        like = source.dtype if source is not None else dtype
        if callable(fill):
            out = fill(name, tmap, source).to(like).clone()
            if tuple(out.shape) != tmap.new_shape:
                raise ValueError(
                    f"fill returned shape {tuple(out.shape)} for {name}, expected {tmap.new_shape}"
                )
        elif source is None:
            out = torch.full(tmap.new_shape, float(fill), dtype=like)
        else:
            out = _filled_around(tmap, float(fill), like)
        if source is not None:
            out[tmap.index] = source
        result[name] = out
    return result


def _filled_around(tmap: TensorMap, value: float, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``tmap.new_shape`` with ``value`` everywhere outside ``tmap.index``.

    The old block is left unwritten (the caller copies the old entries there), so
    each byte is written once: the new entries are, per dim d, the slab whose d-th
    index is past the old size and whose earlier indices are inside it.
    """
    out = torch.empty(tmap.new_shape, dtype=dtype)
    for dim, (_, stop) in enumerate(tmap.ranges):
        slab = (*tmap.index[:dim], slice(stop, None))
        out[slab] = value
    return out


def _check_carry_inputs(
    old: Mapping[str, torch.Tensor], maps: GrowthMaps, names: list[str], fill: object
) -> None:
    if not callable(fill) and not isinstance(fill, int | float):
        raise ValueError(f"fill must be a number or a callable, got {fill!r}")
    missing = sorted({m.source for n in names if (m := maps.tensors[n]).source} - set(old))
    if missing:
        raise ValueError(f"carry_over: old state lacks {len(missing)} source tensor(s): {missing}")
    for name in names:
        tmap = maps.tensors[name]
        if tmap.source is not None and tuple(old[tmap.source].shape) != tmap.old_shape:
            raise ValueError(
                f"carry_over: {tmap.source} has shape {tuple(old[tmap.source].shape)}, "
                f"the growth map expects {tmap.old_shape}"
            )


# ----------------------------------------------------------------- validation


def _validate(
    shapes: Mapping[str, Sequence[int]],
    old: ModelConfig,
    new: ModelConfig,
    init: object,
    depth_strategy: object,
    seed: object,
    tp_size: object,
) -> None:
    if not isinstance(old, ModelConfig) or not isinstance(new, ModelConfig):
        raise ConfigError(
            f"old_config and new_config must be ModelConfig, got "
            f"{type(old).__name__} and {type(new).__name__}"
        )
    if not callable(init) and init not in INIT_SCHEMES:
        raise ConfigError(f"init must be one of {INIT_SCHEMES} or a callable, got {init!r}")
    if depth_strategy not in DEPTH_STRATEGIES:
        raise ConfigError(
            f"depth_strategy must be one of {DEPTH_STRATEGIES}, got {depth_strategy!r}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ConfigError(f"tp_size must be a positive integer, got {tp_size!r}")
    _check_configs(old, new)
    new.validate(tp_size=tp_size)
    _check_shapes(shapes, old)


def _check_configs(old: ModelConfig, new: ModelConfig) -> None:
    for option in _FIXED_OPTIONS:
        if getattr(old, option) != getattr(new, option):
            raise ConfigError(
                f"growth cannot change {option}: {getattr(old, option)!r} -> "
                f"{getattr(new, option)!r}"
            )
    if old.position_embedding == "learned" and old.max_seq_len != new.max_seq_len:
        raise ConfigError(
            f"growth cannot change max_seq_len with learned positions: "
            f"{old.max_seq_len} -> {new.max_seq_len}"
        )
    shrunk = [
        f"{size} {getattr(old, size)} -> {getattr(new, size)}"
        for size in _GROWN_SIZES
        if getattr(new, size) < getattr(old, size)
    ]
    if shrunk:
        raise ConfigError(f"growth cannot shrink the model: {', '.join(shrunk)}")


def _check_shapes(shapes: Mapping[str, Sequence[int]], config: ModelConfig) -> None:
    # Meta tensors: the canonical-table check without touching any data.
    validate_canonical({n: torch.empty(tuple(s), device="meta") for n, s in shapes.items()}, config)


# ------------------------------------------------------------------ building


def _layer_plan(old_layers: int, new_layers: int, strategy: str) -> tuple[LayerMap, ...]:
    added = new_layers - old_layers
    originals = [LayerMap(source=i, is_new=False) for i in range(old_layers)]
    if strategy == "random":
        return (*originals, *[LayerMap(source=None, is_new=True)] * added)
    if strategy == "stack":
        copies = [LayerMap(source=i % old_layers, is_new=True) for i in range(added)]
        return (*originals, *copies)
    # interleave: spread the copies as evenly as possible, lower layers first.
    plan: list[LayerMap] = []
    for i, original in enumerate(originals):
        count = added // old_layers + (1 if i < added % old_layers else 0)
        plan += [original, *[LayerMap(source=i, is_new=True)] * count]
    return tuple(plan)


def _global_names(shapes: Mapping[str, Sequence[int]]) -> list[str]:
    names = [name for name in shapes if _LAYER_RE.match(name) is None]
    if "masks.hidden" not in names:
        names.append("masks.hidden")  # map_global drops it again if still all ones
    return names


def _local_param_names(config: ModelConfig) -> list[str]:
    """Parameter names of one layer without the ``layers.{i}.`` prefix."""
    return [name.split(".", 2)[2] for name in layer_parameter_specs(config, 0)]


def _mask_sizes(config: ModelConfig) -> dict[str, int]:
    return {
        "hidden": config.hidden_size,
        "heads": config.num_heads,
        "ffn": config.ffn_hidden_size,
    }


class _Mapper:
    """Decides, from shapes, every tensor of the grown state and where its old entries are."""

    def __init__(
        self, shapes: Mapping[str, Sequence[int]], old: ModelConfig, new: ModelConfig
    ) -> None:
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.old, self.new = old, new
        self.new_specs = canonical_specs(new)
        self.maps: dict[str, TensorMap] = {}

    def map_global(self, name: str) -> None:
        if name == "masks.hidden":
            self._mask(name, name, "hidden")
        else:
            self._param(name, name)

    def map_layer(self, index: int, layer: LayerMap) -> None:
        prefix = f"layers.{index}."
        if layer.source is None:
            # A fresh layer runs fully (heads and FFN masks folded); its depth mask hides it.
            for name, spec in layer_parameter_specs(self.new, index).items():
                self._put(name, None, spec.shape)
            self._put(prefix + "masks.depth", None, ())
            return
        src = f"layers.{layer.source}."
        for local in _local_param_names(self.old):
            self._param(prefix + local, src + local)
        self._mask(prefix + "masks.heads", src + "masks.heads", "heads")
        self._mask(prefix + "masks.ffn", src + "masks.ffn", "ffn")
        depth = src + "masks.depth"
        if layer.is_new:
            self._put(prefix + "masks.depth", None, ())
        elif depth in self.shapes:
            self._put(prefix + "masks.depth", depth, (), old_shape=())

    def _param(self, name: str, source: str) -> None:
        old_shape = self.shapes[source]
        self._put(name, source, self.new_specs[name].shape, old_shape=old_shape)

    def _mask(self, name: str, source: str, kind: str) -> None:
        old_size, new_size = _mask_sizes(self.old)[kind], _mask_sizes(self.new)[kind]
        present = source in self.shapes
        if new_size == old_size and not present:
            return  # a folded mask stays folded
        self._put(name, source if present else None, (new_size,), old_shape=(old_size,))

    def _put(
        self,
        name: str,
        source: str | None,
        new_shape: tuple[int, ...],
        *,
        old_shape: tuple[int, ...] = (),
    ) -> None:
        if source is None:
            self.maps[name] = TensorMap(None, (), new_shape, ())
        else:
            ranges = tuple((0, size) for size in old_shape)
            self.maps[name] = TensorMap(source, old_shape, new_shape, ranges)


def _build_mask(
    name: str, tmap: TensorMap, source: torch.Tensor | None, old: ModelConfig
) -> torch.Tensor:
    if source is not None and tmap.old_shape == tmap.new_shape:
        return source.detach().clone()
    if source is None and not tmap.new_shape:
        return torch.zeros(())  # the depth mask of a new layer
    # Masks live in fp32 (exact ramp values) unless the old one says otherwise;
    # a folded (absent) old mask was all ones.
    kind = name.rpartition(".")[2]
    kept = source.detach().clone() if source is not None else torch.ones(_mask_sizes(old)[kind])
    return torch.cat([kept, torch.zeros(tmap.new_shape[0] - kept.shape[0], dtype=kept.dtype)])
