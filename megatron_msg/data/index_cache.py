"""On-disk cache of dataset index arrays, built once by one rank and memory-mapped by all.

A cache entry is a set of ``.npy`` files plus a ``description.json`` written
last. Its file names carry a hash of the description, which holds everything
that determines the arrays (parameters and a digest of the token counts), so a
changed input can never hit a stale entry. Every file is written under a
temporary name and renamed, so an interrupted build leaves no partial entry.

With torch.distributed initialised, rank 0 of ``group`` (the default group when
None) builds the entry while the other ranks wait, then all ranks map it; a
build failure on rank 0 is reported on every rank instead of hanging them. The
cache directory must be visible to every rank of ``group`` (a shared filesystem,
or a per-node group with a node-local directory).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CacheEntry", "description_hash", "load_arrays", "load_or_build"]

_FORMAT = 1


def description_hash(description: Mapping[str, Any]) -> str:
    text = json.dumps({"format": _FORMAT, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _paths(cache_dir: Path, stem: str, names: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    return cache_dir / f"{stem}-description.json", {n: cache_dir / f"{stem}-{n}.npy" for n in names}


def _is_complete(desc_path: Path, arrays: Mapping[str, Path], description: Mapping) -> bool:
    if not desc_path.is_file() or not all(p.is_file() for p in arrays.values()):
        return False
    try:
        stored = json.loads(desc_path.read_text())
    except (OSError, ValueError):
        return False
    return bool(stored == json.loads(json.dumps({"format": _FORMAT, **description})))


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_npy(f: Any, *, array: np.ndarray) -> None:
    np.save(f, array, allow_pickle=False)


def _save(
    cache_dir: Path,
    desc_path: Path,
    paths: Mapping[str, Path],
    arrays: Mapping[str, np.ndarray],
    description: Mapping,
) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        array = np.asarray(arrays[name])
        _write_atomic(path, functools.partial(_save_npy, array=array))
    text = json.dumps({"format": _FORMAT, **description}, sort_keys=True, indent=1)
    # The description goes last: its presence marks the entry complete.
    _write_atomic(desc_path, lambda f: f.write(text.encode()))


def load_arrays(paths: Mapping[str, str | os.PathLike[str]]) -> dict[str, np.ndarray]:
    """Memory-map cached arrays (no pickled objects are ever loaded)."""
    return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()}


@dataclass(frozen=True)
class CacheEntry:
    arrays: dict[str, np.ndarray]
    paths: dict[str, str]  # lets datasets pickle as file names rather than array contents
    built: bool  # whether this call built the entry


def _dist_rank(group: Any) -> tuple[bool, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False, 0
    return True, dist.get_rank(group)


def _broadcast_status(status: int, group: Any) -> int:
    """Rank 0's build status to every rank; doubles as the barrier the waiters need."""
    import torch
    import torch.distributed as dist

    device = "cpu"
    if dist.get_backend(group) == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    flag = torch.tensor([status], dtype=torch.int64, device=device)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(flag, src=src, group=group)
    return int(flag.item())


def load_or_build(
    *,
    cache_dir: str | os.PathLike[str],
    stem: str,
    description: Mapping[str, Any],
    names: Sequence[str],
    build: Callable[[], Mapping[str, np.ndarray]],
    group: Any = None,
) -> CacheEntry:
    """The arrays memory-mapped from the cache, building the entry first if needed.

    ``stem`` is a readable prefix for the file names; the hash of ``description``
    is appended to it. ``build`` returns the arrays named in ``names``.
    """
    directory = Path(cache_dir)
    full_stem = f"{stem}-{description_hash(description)}"
    desc_path, paths = _paths(directory, full_stem, names)
    distributed, rank = _dist_rank(group)
    built, error = False, None
    if rank == 0 and not _is_complete(desc_path, paths, description):
        try:
            arrays = build()
            missing = set(names) - set(arrays)
            if missing:
                raise ValueError(f"index build for {stem} returned no {sorted(missing)}")
            _save(directory, desc_path, paths, arrays, description)
            built = True
        except BaseException as e:
            error = e
    if distributed:
        status = _broadcast_status(0 if error is None else 1, group)
        if status and error is None:
            raise RuntimeError(
                f"rank 0 failed to build the index cache {full_stem} in {directory}; "
                "see rank 0's error"
            )
    if error is not None:
        raise error
    if not _is_complete(desc_path, paths, description):
        raise RuntimeError(
            f"index cache {full_stem} is missing in {directory} after rank 0 built it; "
            "is the cache directory shared by all ranks of the group?"
        )
    str_paths = {name: str(path) for name, path in paths.items()}
    return CacheEntry(arrays=load_arrays(str_paths), paths=str_paths, built=built)
