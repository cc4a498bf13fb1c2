"""Read tensors of a canonical store with plain file reads instead of the memory map.

``CanonicalReader.get`` copies out of safetensors' memory map, and every page
it touches stays mapped, so reading a whole store that way makes the process's
resident set (RssFile) grow to the size of the store. The growth tool reads
every tensor once and must stay within a few times the largest tensor, so it
reads each tensor's bytes with ``readinto`` into a fresh buffer: resident
memory is the tensors alive, and the bytes go through the page cache only.

The store is opened (and fully validated) by :class:`CanonicalReader`; this
class only adds the data offsets from each shard's safetensors header.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from megatron_msg.checkpoint.canonical import CanonicalReader
from megatron_msg.checkpoint.safetensors_files import DTYPE_NAMES, CanonicalCheckpointError

__all__ = ["UnmappedReader", "torch_dtype"]

_TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_CHUNK = 1 << 30  # one read() moves at most ~2 GiB on Linux; stay well below


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("F32" -> torch.float32)."""
    if name not in _TORCH_DTYPES:
        raise CanonicalCheckpointError(f"unsupported tensor dtype {name!r}")
    return _TORCH_DTYPES[name]


class UnmappedReader:
    """Tensor reads from an open :class:`CanonicalReader` without touching its memory map."""

    def __init__(self, reader: CanonicalReader) -> None:
        self.reader = reader
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def read(self, name: str, *, kind: str = "weights") -> torch.Tensor:
        """The full tensor as a fresh CPU tensor (same values as ``reader.get``)."""
        shape = self.reader.entry(name, kind=kind).shape
        return self.read_rows(name, 0, shape[0] if shape else 1, kind=kind)

    def read_rows(self, name: str, start: int, stop: int, *, kind: str = "weights") -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 (one contiguous byte range; a 0-d tensor
        has the single row 0)."""
        entry = self.reader.entry(name, kind=kind)
        path = self.reader.path / entry.file
        rows = entry.shape[0] if entry.shape else 1
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"{kind} {name}: rows [{start}:{stop}) out of range for {rows} rows")
        data_start, header = self._header(entry.file)
        begin, end = header[name]["data_offsets"]
        if end - begin != entry.nbytes:
            raise CanonicalCheckpointError(
                f"{path}: {name} spans {end - begin} bytes in the header, the index says "
                f"{entry.nbytes}"
            )
        row_bytes = entry.nbytes // rows if rows else 0
        nbytes = (stop - start) * row_bytes
        out = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(out.numpy().data).cast("B")
        with open(path, "rb", buffering=0) as handle:
            handle.seek(data_start + begin + start * row_bytes)
            done = 0
            while done < nbytes:
                got = handle.readinto(view[done : min(done + _CHUNK, nbytes)])
                if not got:
                    raise CanonicalCheckpointError(
                        f"{path}: file ended inside {name} ({done} of {nbytes} bytes read)"
                    )
                done += got
        shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
        return out.view(_TORCH_DTYPES[entry.dtype]).reshape(shape)

    def _header(self, file: str) -> tuple[int, dict[str, Any]]:
        if file not in self._headers:
            path = self.reader.path / file
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            self._headers[file] = (8 + length, header)
        return self._headers[file]
