"""File plumbing of the canonical store: streamed safetensors shards, atomic directories.

Kept apart from ``canonical.py`` (which knows about models and metadata) because
none of it is specific to GPT checkpoints.

A safetensors file is ``<u64 header length><JSON header><raw little-endian
bytes>``; the format allows the header to be padded with blanks. We reserve
:data:`HEADER_RESERVE` bytes for it, stream tensor bytes after it as they come,
and fill the header in when the shard closes, so nothing but the tensor being
written is ever held in memory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

HEADER_RESERVE = 64 * 1024  # about 500 tensor entries; a shard closes early when full

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_SIZES = {name: torch.empty((), dtype=dt).element_size() for dt, name in DTYPE_NAMES.items()}


class CanonicalCheckpointError(ValueError):
    """A canonical store is missing, inconsistent or corrupt; the message names the file."""


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def header_entry(tensor: torch.Tensor, offset: int) -> dict[str, Any]:
    """The safetensors header entry of ``tensor`` stored at data ``offset``."""
    return {
        "dtype": DTYPE_NAMES[tensor.dtype],
        "shape": list(tensor.shape),
        "data_offsets": [offset, offset + tensor.nbytes],
    }


class ShardWriter:
    """One safetensors file being streamed: data first, header filled in on close."""

    def __init__(self, path: Path, *, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.header_len = len(_dump(self.header))
        self.offset = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._file.seek(8 + HEADER_RESERVE)

    def fits(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` still fits the size limit and the header space."""
        if len(self.header) == 1:  # an empty shard takes any tensor, even an oversized one
            return True
        entry = header_entry(tensor, self.offset)
        grown = self.header_len + len(_dump({name: entry})) - 1  # "," replaces one brace
        return self.offset + tensor.nbytes <= self.limit and grown <= HEADER_RESERVE

    def write(self, name: str, tensor: torch.Tensor) -> dict[str, Any]:
        """Append a contiguous CPU tensor's bytes; return its header entry."""
        entry = header_entry(tensor, self.offset)
        self._file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self.header[name] = entry
        self.header_len += len(_dump({name: entry})) - 1
        self.offset += tensor.nbytes
        return entry

    def close(self) -> int:
        """Write the header, fsync, close; return the file size."""
        raw = _dump(self.header)
        self._file.seek(0)
        self._file.write(struct.pack("<Q", HEADER_RESERVE))
        self._file.write(raw + b" " * (HEADER_RESERVE - len(raw)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return 8 + HEADER_RESERVE + self.offset

    def abort(self) -> None:
        self._file.close()


def open_shard(
    path: Path, *, size: int, expected: Mapping[str, tuple[tuple[int, ...], str]], index: str
) -> Any:
    """``safe_open`` a shard after checking its size and that its header lists exactly
    ``expected`` (name -> (shape, dtype)) as the index file ``index`` records."""
    if not path.is_file():
        raise CanonicalCheckpointError(f"{path}: shard file is missing (listed in {index})")
    actual = path.stat().st_size
    if actual != size:
        raise CanonicalCheckpointError(
            f"{path}: file is {actual} bytes, {index} records {size} (truncated or rewritten)"
        )
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CanonicalCheckpointError(f"{path}: not a valid safetensors file ({err})") from None
    keys = set(handle.keys())
    if keys != set(expected):
        diff = sorted(keys ^ set(expected))[:8]
        raise CanonicalCheckpointError(
            f"{path}: header and {index} list different tensors, e.g. {diff}"
        )
    for name, (shape, dtype) in expected.items():
        view = handle.get_slice(name)
        got_shape, got_dtype = tuple(view.get_shape()), view.get_dtype()
        if got_shape != shape or got_dtype != dtype:
            raise CanonicalCheckpointError(
                f"{path}: {name} is {got_dtype}{list(got_shape)} in the file header but "
                f"{dtype}{list(shape)} in {index}"
            )
    return handle


def read_json(path: Path, *, version: int) -> dict[str, Any]:
    """A JSON object whose ``format_version`` must equal ``version``."""
    if not path.is_file():
        raise CanonicalCheckpointError(f"{path}: file is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CanonicalCheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CanonicalCheckpointError(f"{path}: expected a JSON object")
    found = raw.get("format_version")
    if found != version:
        raise CanonicalCheckpointError(
            f"{path}: format_version {found!r} is not supported (this reader reads {version})"
        )
    return raw


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name next to ``path`` (same filesystem, so rename is atomic)."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def refuse_existing(path: Path, *, overwrite: bool) -> None:
    if path.exists() and not (overwrite and path.is_dir()):
        hint = "" if overwrite else "; pass overwrite=True to replace it"
        raise CanonicalCheckpointError(f"{path} already exists{hint}")


def install_dir(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename the finished directory ``tmp`` onto ``target``.

    An old target (only with ``overwrite``) is first renamed aside and deleted
    after the new one is in place, so ``target`` is never a mix of both.
    """
    refuse_existing(target, overwrite=overwrite)
    old = None
    if target.exists():
        old = temp_sibling(target, "old")
        target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
