"""A Hugging Face checkpoint directory, streamed tensor by tensor and installed atomically.

Weights go to ``model.safetensors`` (or ``model-NNNNN-of-MMMMM.safetensors``
shards plus ``model.safetensors.index.json``, transformers' layout, when they
exceed the shard size) through the canonical store's streaming
``ShardWriter``: only the tensor being written is in memory. Everything is
written under a hidden temporary sibling of the target and renamed onto it in
:meth:`HFCheckpointWriter.finalize`, so the target is either complete or
absent; an error removes the temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_msg.checkpoint.safetensors_files import (
    DTYPE_NAMES,
    ShardWriter,
    fsync_dir,
    install_dir,
    refuse_existing,
    temp_sibling,
)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


class HFCheckpointWriter:
    """Stream named tensors into a new HF checkpoint directory; use as a context manager.

    Other files (config, tokenizer) are written by the caller into :attr:`tmp`
    before :meth:`finalize`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
    ) -> None:
        if dtype not in DTYPE_NAMES or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        if not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        self.path, self.dtype, self.shard_bytes = Path(path), dtype, shard_bytes
        self.overwrite = overwrite
        refuse_existing(self.path, overwrite=overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_sibling(self.path, "tmp")
        self.tmp.mkdir()
        self._shard: ShardWriter | None = None
        self._parts: list[Path] = []
        self._weight_map: dict[str, int] = {}  # tensor name -> shard number (0-based)
        self._total = 0
        self._done = False

    def __enter__(self) -> HFCheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._done:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor, cast to the checkpoint dtype; on disk when this returns."""
        if name in self._weight_map:
            raise ValueError(f"tensor {name!r} was already written")
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        if self._shard is not None and not self._shard.fits(name, data):
            self._close_shard()
        if self._shard is None:
            self._shard = ShardWriter(
                self.tmp / f"part-{len(self._parts):05d}", limit=self.shard_bytes
            )
        self._shard.write(name, data)
        self._weight_map[name] = len(self._parts)
        self._total += data.nbytes

    def finalize(self) -> Path:
        """Name the shards, write the index (several shards only) and install the directory."""
        try:
            self._close_shard()
            if not self._parts:
                raise ValueError("no tensors were written")
            names = _shard_names(len(self._parts))
            for part, final in zip(self._parts, names):
                part.rename(self.tmp / final)
            if len(names) > 1:
                index = {
                    "metadata": {"total_size": self._total},
                    "weight_map": {n: names[i] for n, i in sorted(self._weight_map.items())},
                }
                (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            fsync_dir(self.tmp)
            install_dir(self.tmp, self.path, overwrite=self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._parts.append(self._shard.path)
            self._shard = None


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
