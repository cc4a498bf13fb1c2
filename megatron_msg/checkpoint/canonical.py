"""The canonical checkpoint store: topology-free, streamed, memory-mapped.

A store is a directory (DESIGN.md, "Checkpoints")::

    meta.json                              model config, step, stage, masks, data, LR, version
    index.json                             every tensor: file, shape, dtype, byte size
    weights-00001-of-00003.safetensors     fp32 master weights and mask values
    exp_avg-00001-of-00003.safetensors     Adam first moments (same canonical names)
    exp_avg_sq-00001-of-00003.safetensors  Adam second moments

Three tensor *kinds* share the canonical names of ``megatron_msg.model.canonical``.
Masks are canonical tensors of kind ``weights`` (present only while unfolded)
and have no moments.

Why it is written the way it is:

- :class:`CanonicalWriter` streams: each tensor's bytes go straight to the open
  shard file (``safetensors_files.ShardWriter`` fills the header in last), so
  memory use is one tensor, not one shard or the model. A shard is closed when
  the next tensor would exceed the size limit.
- Atomic: everything is written under a temporary sibling directory, fsync'd,
  and renamed onto the target only in :meth:`CanonicalWriter.finalize`; any
  error before that removes the temporary directory, so a target either is a
  complete store or does not exist. A process killed outright leaves only a
  ``.NAME.tmp-*`` sibling behind, never a half-written target.
- :class:`CanonicalReader` checks the whole store on open (cheap: headers and
  sizes only) and then hands out one tensor, or one slice of a tensor, at a time
  from the memory map. Returned tensors are copies: safetensors' views alias a
  private mapping, so an in-place edit by a caller would otherwise change what
  later reads return.
- Nothing is ever unpickled: tensors are safetensors, metadata is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_msg.checkpoint.safetensors_files import (
    DTYPE_NAMES,
    DTYPE_SIZES,
    CanonicalCheckpointError,
    ShardWriter,
    fsync_dir,
    install_dir,
    open_shard,
    read_json,
    refuse_existing,
    temp_sibling,
    write_json,
)
from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model.canonical import mask_specs, validate_canonical

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "KINDS",
    "META_FILE",
    "MOMENT_KINDS",
    "CanonicalCheckpointError",
    "CanonicalMeta",
    "CanonicalReader",
    "CanonicalState",
    "CanonicalWriter",
    "TensorEntry",
    "check_store_consistency",
    "load_canonical",
    "save_canonical",
]

FORMAT_VERSION = 1
KINDS: tuple[str, ...] = ("weights", "exp_avg", "exp_avg_sq")
MOMENT_KINDS: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
META_FILE = "meta.json"
INDEX_FILE = "index.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3
_MAX_NAME_LEN = 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what it is (one row of ``index.json``)."""

    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "F32"
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class CanonicalMeta:
    """Everything besides tensors that resuming or growing a run needs.

    ``adam_step`` holds per-tensor Adam steps where they differ from ``step``
    (a tensor absent from it has taken ``step`` steps). ``masks``, ``data`` and
    ``lr`` are owned by the mask schedule, the data loader and the LR scheduler
    respectively and stored as they give them (JSON values); the mask *values*
    are tensors of kind ``weights``.
    """

    model: ModelConfig
    step: int = 0
    stage: int = 0
    adam_step: dict[str, int] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    lr: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"meta.model must be a ModelConfig, got {type(self.model).__name__}")
        for name in ("step", "stage"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"meta.{name} must be a non-negative integer, got {value!r}")
        bad = {k: v for k, v in self.adam_step.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ConfigError(f"meta.adam_step values must be non-negative integers: {bad}")
        for name in ("masks", "data", "lr", "extra"):
            try:
                json.dumps(getattr(self, name), allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"meta.{name} is not JSON-serialisable: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return {"format_version": FORMAT_VERSION, **out}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CanonicalMeta:
        values = dict(values)
        values.pop("format_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown meta field(s) {unknown}; known: {sorted(known)}")
        if "model" not in values:
            raise ConfigError("meta has no 'model' section")
        return cls(**{**values, "model": ModelConfig.from_dict(values["model"])})


@dataclass
class CanonicalState:
    """A whole store in memory (small models, tests): tensors per kind plus meta."""

    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    meta: CanonicalMeta


def check_store_consistency(
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]], meta: CanonicalMeta
) -> None:
    """Raise ConfigError unless ``shapes[kind][name]`` fits the model and each other.

    Weights must be exactly the model's canonical table (masks optional);
    moments cover the same parameters in both kinds with the weight's shape.
    """
    weights = {n: torch.empty(s, device="meta") for n, s in shapes.get("weights", {}).items()}
    validate_canonical(weights, meta.model)
    masks = mask_specs(meta.model)
    avg, avg_sq = shapes.get("exp_avg", {}), shapes.get("exp_avg_sq", {})
    if set(avg) != set(avg_sq):
        diff = sorted(set(avg) ^ set(avg_sq))[:8]
        raise ConfigError(f"exp_avg and exp_avg_sq cover different tensors, e.g. {diff}")
    for name, shape in avg.items():
        if name in masks or name not in weights:
            raise ConfigError(f"optimizer moments for {name!r}, which is not a stored parameter")
        if tuple(shape) != tuple(weights[name].shape) or tuple(avg_sq[name]) != tuple(shape):
            raise ConfigError(
                f"moments of {name} have shapes {tuple(shape)} / {tuple(avg_sq[name])}, "
                f"the weight has {tuple(weights[name].shape)}"
            )
    stray = sorted(set(meta.adam_step) - set(avg))
    if stray:
        raise ConfigError(f"meta.adam_step names tensors without moments: {stray[:8]}")


# ----------------------------------------------------------------------------- writing


class CanonicalWriter:
    """Stream canonical tensors into a new store; nothing appears at ``path`` until finalize.

    Use as a context manager: an exception inside the block (or leaving it
    without :meth:`finalize`) removes everything written so far.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
    ) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors is little-endian; this host is big-endian")
        if not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        self.path = Path(path)
        self.shard_bytes = shard_bytes
        self.overwrite = overwrite
        refuse_existing(self.path, overwrite=overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_sibling(self.path, "tmp")
        self._tmp.mkdir()
        self._open: dict[str, ShardWriter | None] = dict.fromkeys(KINDS)
        self._files: dict[str, list[tuple[Path, int]]] = {k: [] for k in KINDS}
        self._tensors: dict[str, dict[str, tuple[int, dict[str, Any]]]] = {k: {} for k in KINDS}
        self._state = "open"

    def __enter__(self) -> CanonicalWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._state != "open":
            return
        self.abort()
        if exc_type is None:
            raise CanonicalCheckpointError(
                f"{self.path}: writer closed without finalize(); nothing was written"
            )

    def add(self, name: str, tensor: torch.Tensor, *, kind: str = "weights") -> None:
        """Append one tensor of ``kind``; its bytes are on disk when this returns."""
        self._check_open()
        _check_add(name, tensor, kind, self._tensors)
        data = tensor.detach().to("cpu").contiguous()
        try:
            shard = self._open[kind]
            if shard is not None and not shard.fits(name, data):
                self._close_shard(kind)
                shard = None
            if shard is None:
                number = len(self._files[kind]) + 1
                shard = ShardWriter(self._tmp / f"{kind}-{number:05d}.part", limit=self.shard_bytes)
                self._open[kind] = shard
            entry = shard.write(name, data)
            # The open shard becomes file number len(files) when it closes.
            self._tensors[kind][name] = (len(self._files[kind]), entry)
        except BaseException:
            self.abort()
            raise

    def finalize(self, meta: CanonicalMeta) -> Path:
        """Check consistency, write index and meta, and move the store into place."""
        self._check_open()
        try:
            for kind in KINDS:
                self._close_shard(kind)
            shapes = {
                k: {n: tuple(e["shape"]) for n, (_, e) in t.items()}
                for k, t in self._tensors.items()
            }
            check_store_consistency(shapes, meta)
            index = self._name_files()
            write_json(self._tmp / INDEX_FILE, index)
            write_json(self._tmp / META_FILE, meta.to_dict())
            fsync_dir(self._tmp)
            install_dir(self._tmp, self.path, overwrite=self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._state = "done"
        return self.path

    def abort(self) -> None:
        """Discard everything written; the target is left as it was."""
        for kind in KINDS:
            shard = self._open[kind]
            if shard is not None:
                shard.abort()
            self._open[kind] = None
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._state = "aborted"

    def _check_open(self) -> None:
        if self._state != "open":
            raise CanonicalCheckpointError(f"{self.path}: writer is already {self._state}")

    def _close_shard(self, kind: str) -> None:
        shard = self._open[kind]
        if shard is not None:
            self._files[kind].append((shard.path, shard.close()))
            self._open[kind] = None

    def _name_files(self) -> dict[str, Any]:
        """Rename ``.part`` files to their final ``-NNNNN-of-MMMMM`` names; build the index."""
        files: dict[str, Any] = {}
        tensors: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            parts = self._files[kind]
            names = [
                f"{kind}-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))
            ]
            for (part, size), final in zip(parts, names):
                part.rename(self._tmp / final)
                files[final] = {"kind": kind, "nbytes": size}
            tensors[kind] = {
                name: TensorEntry(names[i], tuple(e["shape"]), e["dtype"], _nbytes(e)).to_dict()
                for name, (i, e) in self._tensors[kind].items()
            }
        return {"format_version": FORMAT_VERSION, "files": files, "tensors": tensors}


def _nbytes(entry: Mapping[str, Any]) -> int:
    begin, end = entry["data_offsets"]
    return int(end - begin)


def _check_add(
    name: str, tensor: torch.Tensor, kind: str, seen: Mapping[str, Mapping[str, Any]]
) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME_LEN or name == "__metadata__":
        raise ValueError(f"invalid tensor name {name!r}")
    if name in seen[kind]:
        raise ValueError(f"{kind} tensor {name!r} was already added")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{kind} {name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"{kind} {name}: dtype {tensor.dtype} cannot be stored")


# ----------------------------------------------------------------------------- reading


class CanonicalReader:
    """Open a store, check it, and read tensors (or slices) one at a time.

    On open: both JSON files parse and carry a known format version; every
    shard the index lists exists with the recorded size; each shard's
    safetensors header lists exactly the index's tensors with the same shapes
    and dtypes; the weights form the canonical table of ``meta.model`` and the
    moments match them. Any failure raises :class:`CanonicalCheckpointError`
    naming the file and what is wrong.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CanonicalCheckpointError(f"{self.path}: no canonical checkpoint directory here")
        self._handles: dict[str, Any] = {}
        meta_raw = read_json(self.path / META_FILE, version=FORMAT_VERSION)
        try:
            self.meta = CanonicalMeta.from_dict(meta_raw)
        except (ConfigError, TypeError) as err:
            raise CanonicalCheckpointError(f"{self.path / META_FILE}: {err}") from None
        self._entries, self._files = _parse_index(self.path / INDEX_FILE)
        self._check_files()
        shapes = {k: {n: e.shape for n, e in t.items()} for k, t in self._entries.items()}
        try:
            check_store_consistency(shapes, self.meta)
        except ConfigError as err:
            raise CanonicalCheckpointError(f"{self.path / INDEX_FILE}: {err}") from None

    def __enter__(self) -> CanonicalReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()  # drops the memory maps

    def names(self, kind: str = "weights") -> list[str]:
        return list(self._kind(kind))

    def has(self, name: str, *, kind: str = "weights") -> bool:
        return name in self._kind(kind)

    def entry(self, name: str, *, kind: str = "weights") -> TensorEntry:
        entries = self._kind(kind)
        if name not in entries:
            raise KeyError(f"{self.path}: no {kind} tensor named {name!r}")
        return entries[name]

    def nbytes(self, kind: str | None = None) -> int:
        """Bytes of tensor data in ``kind`` (all kinds when None)."""
        kinds = KINDS if kind is None else (kind,)
        return sum(e.nbytes for k in kinds for e in self._kind(k).values())

    def get(self, name: str, *, kind: str = "weights") -> torch.Tensor:
        """The full tensor, as a fresh CPU tensor."""
        return self._view(name, kind).clone()

    def get_slice(
        self, name: str, *, dim: int, start: int, stop: int, kind: str = "weights"
    ) -> torch.Tensor:
        """``tensor[..., start:stop, ...]`` along ``dim``; only the pages of the slice are read."""
        view = self._view(name, kind)
        if not -view.dim() <= dim < view.dim():
            raise ValueError(f"{kind} {name} has shape {tuple(view.shape)}; no dim {dim}")
        size = view.shape[dim]
        if not 0 <= start <= stop <= size:
            raise ValueError(
                f"{kind} {name}: slice [{start}:{stop}] out of range for dim {dim} of size {size}"
            )
        return view.narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)

    def get_shard(
        self, name: str, *, dim: int, rank: int, world: int, kind: str = "weights"
    ) -> torch.Tensor:
        """The ``rank``-th of ``world`` equal contiguous chunks along ``dim`` (a TP slice)."""
        shape = self.entry(name, kind=kind).shape
        if not 0 <= rank < world or not -len(shape) <= dim < len(shape) or shape[dim] % world:
            raise ValueError(
                f"{kind} {name}: cannot take chunk {rank} of {world} along dim {dim} "
                f"of shape {shape}"
            )
        step = shape[dim] // world
        return self.get_slice(name, dim=dim, start=rank * step, stop=(rank + 1) * step, kind=kind)

    def iter_tensors(self, kind: str = "weights") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._kind(kind):
            yield name, self.get(name, kind=kind)

    def _kind(self, kind: str) -> dict[str, TensorEntry]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return self._entries[kind]

    def _view(self, name: str, kind: str) -> torch.Tensor:
        entry = self.entry(name, kind=kind)
        return self._handles[entry.file].get_tensor(name)

    def _check_files(self) -> None:
        by_file: dict[str, dict[str, TensorEntry]] = {f: {} for f in self._files}
        for kind, entries in self._entries.items():
            for name, entry in entries.items():
                if entry.file not in by_file:
                    raise CanonicalCheckpointError(
                        f"{self.path / INDEX_FILE}: {kind} {name} is in {entry.file}, "
                        "which the index does not list"
                    )
                by_file[entry.file][name] = entry
        for file, expected in by_file.items():
            self._handles[file] = open_shard(
                self.path / file,
                size=self._files[file],
                expected={n: (e.shape, e.dtype) for n, e in expected.items()},
                index=INDEX_FILE,
            )


def _parse_index(path: Path) -> tuple[dict[str, dict[str, TensorEntry]], dict[str, int]]:
    raw = read_json(path, version=FORMAT_VERSION)
    try:
        files = {str(f): int(v["nbytes"]) for f, v in raw["files"].items()}
        entries = {
            kind: {
                name: TensorEntry(
                    str(e["file"]),
                    tuple(int(s) for s in e["shape"]),
                    str(e["dtype"]),
                    int(e["nbytes"]),
                )
                for name, e in raw["tensors"].get(kind, {}).items()
            }
            for kind in KINDS
        }
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CanonicalCheckpointError(f"{path}: malformed index ({err!r})") from None
    for kind, table in entries.items():
        for name, e in table.items():
            size = DTYPE_SIZES.get(e.dtype)
            numel = int(torch.Size(e.shape).numel())
            if size is None or e.nbytes != numel * size or Path(e.file).name != e.file:
                raise CanonicalCheckpointError(f"{path}: bad entry for {kind} {name}: {e}")
    return entries, files


# ----------------------------------------------------------------------------- helpers


def save_canonical(
    path: str | os.PathLike[str],
    *,
    weights: Mapping[str, torch.Tensor],
    meta: CanonicalMeta,
    exp_avg: Mapping[str, torch.Tensor] | None = None,
    exp_avg_sq: Mapping[str, torch.Tensor] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a model's ``to_canonical()`` dict (plus Adam moments) as a store.

    Everything is checked before the first byte is written.
    """
    groups = {"weights": weights, "exp_avg": exp_avg or {}, "exp_avg_sq": exp_avg_sq or {}}
    shapes = {k: {n: tuple(t.shape) for n, t in g.items()} for k, g in groups.items()}
    check_store_consistency(shapes, meta)
    with CanonicalWriter(path, shard_bytes=shard_bytes, overwrite=overwrite) as writer:
        for kind, tensors in groups.items():
            for name, tensor in tensors.items():
                writer.add(name, tensor, kind=kind)
        return writer.finalize(meta)


def load_canonical(path: str | os.PathLike[str]) -> CanonicalState:
    """Read a whole store into memory (for models that fit; large ones use the reader)."""
    with CanonicalReader(path) as reader:
        kinds = {kind: dict(reader.iter_tensors(kind)) for kind in KINDS}
        return CanonicalState(meta=reader.meta, **kinds)
