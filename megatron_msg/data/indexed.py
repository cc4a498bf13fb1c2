"""Megatron-compatible MMIDIDX v1 indexed datasets (.bin + .idx), byte for byte.

Layout of the .idx file (DESIGN.md, "Data"), all little-endian::

    b"MMIDIDX\\x00\\x00"  <Q version (1)  <B dtype code  <Q N sequences  <Q D doc-index length
    int32 sizes[N]  int64 byte pointers[N]  int64 doc_idx[D]

The .bin file holds the tokens of all sequences back to back. ``doc_idx`` holds
sequence indices: document j is sequences ``doc_idx[j]:doc_idx[j+1]``, so
``doc_idx[0] == 0`` and ``doc_idx[-1] == N``. The preprocessing tools write
one sequence per document unless a json value is a list of sentences.

Opening a dataset checks everything the memory maps rely on (magic, version,
dtype code, array lengths against the .idx size, contiguous pointers against
the .bin size, doc_idx bounds), so a truncated or corrupt pair fails at open
with a message naming the file, never later inside numpy.
"""

from __future__ import annotations

import array
import os
import shutil
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
_CHECK_CHUNK = 1 << 24  # sequences validated per step when opening

DTYPE_BY_CODE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_BY_DTYPE: dict[np.dtype, int] = {dt: code for code, dt in DTYPE_BY_CODE.items()}

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "best_dtype",
    "bin_path",
    "dtype_code",
    "idx_path",
    "publish_pair",
    "read_index_header",
]


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, truncated or inconsistent; the message names the file."""


def idx_path(prefix: str | os.PathLike[str]) -> str:
    return f"{os.fspath(prefix)}.idx"


def bin_path(prefix: str | os.PathLike[str]) -> str:
    return f"{os.fspath(prefix)}.bin"


def dtype_code(dtype: Any) -> int:
    """The MMIDIDX code of a NumPy dtype; ValueError naming the dtype if it has none."""
    dt = np.dtype(dtype)
    if dt not in CODE_BY_DTYPE:
        names = ", ".join(str(d) for d in CODE_BY_DTYPE)
        raise ValueError(f"dtype {dt} has no MMIDIDX code (supported: {names})")
    return CODE_BY_DTYPE[dt]


def best_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 tokens when the vocabulary is below 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def read_index_header(path: str) -> tuple[np.dtype, int, int]:
    """Validate the fixed header of an .idx file and return (dtype, N, D)."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as e:
        raise IndexedDatasetError(f"{path}: cannot read index file ({e.strerror})") from e
    if len(head) < HEADER_SIZE:
        raise IndexedDatasetError(
            f"{path}: truncated index header ({file_size} bytes, need at least {HEADER_SIZE})"
        )
    if head[: len(MAGIC)] != MAGIC:
        raise IndexedDatasetError(
            f"{path}: bad magic {head[: len(MAGIC)]!r}, expected {MAGIC!r} (not an MMIDIDX index)"
        )
    (version,) = struct.unpack_from("<Q", head, 9)
    if version != VERSION:
        raise IndexedDatasetError(f"{path}: unsupported version {version}, expected {VERSION}")
    code = head[17]
    if code not in DTYPE_BY_CODE:
        raise IndexedDatasetError(
            f"{path}: unknown dtype code {code} (valid codes: {sorted(DTYPE_BY_CODE)})"
        )
    n, d = struct.unpack_from("<QQ", head, 18)
    expected = HEADER_SIZE + 4 * n + 8 * n + 8 * d
    if file_size != expected:
        raise IndexedDatasetError(
            f"{path}: index file is {file_size} bytes but the header (N={n} sequences, "
            f"D={d} doc-index entries) implies {expected} bytes"
            + (" (truncated)" if file_size < expected else " (trailing data)")
        )
    return DTYPE_BY_CODE[code], n, d


def _check_sizes_and_doc_idx(path: str, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    n = len(sizes)
    if n and int(sizes.min()) < 0:
        bad = int(np.argmin(sizes))
        raise IndexedDatasetError(f"{path}: negative size {int(sizes[bad])} at sequence {bad}")
    if len(doc_idx) == 0 or int(doc_idx[0]) != 0 or int(doc_idx[-1]) != n:
        first = int(doc_idx[0]) if len(doc_idx) else None
        last = int(doc_idx[-1]) if len(doc_idx) else None
        raise IndexedDatasetError(
            f"{path}: doc_idx must start at 0 and end at N={n}, got first={first} last={last}"
        )
    steps = np.diff(doc_idx)
    if len(steps) and bool(np.any(steps < 0)):
        bad = int(np.argmax(steps < 0))
        raise IndexedDatasetError(f"{path}: doc_idx decreases at entry {bad + 1}")


class IndexedDataset:
    """Read-only memory-mapped view of a ``prefix.bin`` / ``prefix.idx`` pair.

    ``ds[i]`` is sequence i (a read-only NumPy view into the .bin map);
    ``ds.get(i, offset=, length=)`` a part of it; ``ds[a:b]`` a list of sequences.
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(prefix)
        self.idx_file = idx_path(self.prefix)
        self.bin_file = bin_path(self.prefix)
        for path in (self.idx_file, self.bin_file):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: file not found (dataset prefix {self.prefix})")
        self.dtype, n, d = read_index_header(self.idx_file)
        index = np.memmap(self.idx_file, dtype=np.uint8, mode="r")
        self.sizes: np.ndarray = index[HEADER_SIZE : HEADER_SIZE + 4 * n].view(np.int32)
        self.pointers: np.ndarray = index[HEADER_SIZE + 4 * n : HEADER_SIZE + 12 * n].view(np.int64)
        self.doc_idx: np.ndarray = index[HEADER_SIZE + 12 * n : HEADER_SIZE + 12 * n + 8 * d].view(
            np.int64
        )
        self._validate()
        self._data = self._map_data()

    def __getstate__(self) -> dict[str, str]:
        # Pickle as the prefix: a memmap would otherwise pickle the whole file.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["prefix"])  # type: ignore[misc]

    def _validate(self) -> None:
        path, n = self.idx_file, len(self.sizes)
        _check_sizes_and_doc_idx(path, self.sizes, self.doc_idx)
        expected_bin = self._check_pointers()
        actual_bin = os.path.getsize(self.bin_file)
        if actual_bin != expected_bin:
            raise IndexedDatasetError(
                f"{self.bin_file}: data file is {actual_bin} bytes but {path} describes "
                f"{expected_bin} bytes ({expected_bin // self.dtype.itemsize} tokens of "
                f"{self.dtype} in {n} sequences)"
                + (" (truncated)" if actual_bin < expected_bin else "")
            )

    def _check_pointers(self) -> int:
        """Pointers must be the running byte sum of sizes; returns the implied .bin size.

        Works in chunks so that opening a billion-sequence index needs bounded memory.
        """
        itemsize, running = self.dtype.itemsize, 0
        for lo in range(0, len(self.sizes), _CHECK_CHUNK):
            sizes = np.asarray(self.sizes[lo : lo + _CHECK_CHUNK], dtype=np.int64) * itemsize
            ends = np.cumsum(sizes) + running
            expected = ends - sizes
            mismatch = expected != self.pointers[lo : lo + _CHECK_CHUNK]
            if bool(mismatch.any()):
                bad = int(np.argmax(mismatch))
                raise IndexedDatasetError(
                    f"{self.idx_file}: pointer of sequence {lo + bad} is "
                    f"{int(self.pointers[lo + bad])}, expected {int(expected[bad])} "
                    "(sequences must be contiguous in the .bin file)"
                )
            running = int(ends[-1])
        return running

    def _map_data(self) -> np.ndarray:
        if os.path.getsize(self.bin_file) == 0:
            return np.zeros(0, dtype=self.dtype)  # mmap cannot map an empty file
        return np.memmap(self.bin_file, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def _check_index(self, idx: int) -> int:
        n = len(self.sizes)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences ({self.prefix})")
        return i

    def get(self, idx: int, *, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when None)."""
        i = self._check_index(idx)
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"offset {offset} + length {length} outside sequence {i} of size {size}"
            )
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._data[start : start + length]

    def __getitem__(self, idx: int | slice) -> Any:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(f"slices of an IndexedDataset must be contiguous, got step {step}")
            return [self.get(i) for i in range(start, stop)]
        return self.get(int(idx))

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences concatenated)."""
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"document {doc} out of range for {self.num_documents} documents")
        first, last = int(self.doc_idx[doc]), int(self.doc_idx[doc + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.pointers[first]) // self.dtype.itemsize
        stop = int(self.pointers[last - 1]) // self.dtype.itemsize + int(self.sizes[last - 1])
        return self._data[start:stop]


def _append_file(src_path: str, dst: Any) -> None:
    """Append a file to the open binary ``dst``, in the kernel where it can."""
    dst.flush()
    with open(src_path, "rb") as src:
        size, copied = os.fstat(src.fileno()).st_size, 0
        if hasattr(os, "copy_file_range"):
            try:
                while copied < size:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), size - copied)
                    if n == 0:
                        break
                    copied += n
            except OSError:
                pass  # e.g. unsupported across filesystems: finish with a plain copy
            dst.seek(0, os.SEEK_END)  # resync the buffered writer with the fd offset
        src.seek(copied)
        shutil.copyfileobj(src, dst, length=1 << 24)


def publish_pair(tmp_prefix: str, final_prefix: str) -> None:
    """Rename a finished temp pair onto its final names.

    The old .idx goes first and the new .idx comes last, so at no instant does a
    new .bin sit beside an old .idx: an interruption leaves either the old
    complete pair, or a .bin without an .idx, which no reader accepts.
    """
    final_idx = idx_path(final_prefix)
    if os.path.lexists(final_idx):
        os.unlink(final_idx)
    os.replace(bin_path(tmp_prefix), bin_path(final_prefix))
    os.replace(idx_path(tmp_prefix), final_idx)


def write_index(
    path: str, *, dtype: Any, sizes: np.ndarray | array.array, doc_idx: np.ndarray | array.array
) -> None:
    """Write an .idx file for contiguous sequences (pointers derived from sizes)."""
    np_dtype = np.dtype(dtype)
    sizes_np = np.asarray(sizes, dtype=np.int32)
    doc_np = np.asarray(doc_idx, dtype=np.int64)
    pointers = np.zeros(len(sizes_np), dtype=np.int64)
    if len(sizes_np):
        np.cumsum(sizes_np[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= np_dtype.itemsize
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", dtype_code(np_dtype)))
        f.write(struct.pack("<Q", len(sizes_np)))
        f.write(struct.pack("<Q", len(doc_np)))
        f.write(sizes_np.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_np.tobytes(order="C"))


class IndexedDatasetWriter:
    """Writes a .bin/.idx pair under temporary names; ``finalize`` publishes both.

    Used as a context manager it finalizes on success and deletes its temp files
    on an exception, so a failed write never leaves a valid-looking pair.
    """

    def __init__(
        self, prefix: str | os.PathLike[str], *, dtype: Any, buffer_bytes: int = 1 << 22
    ) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # reject unsupported dtypes before creating files
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_prefix = f"{self.prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._data = open(bin_path(self._tmp_prefix), "wb", buffering=buffer_bytes)  # noqa: SIM115
        self._sizes = array.array("i")
        self._doc_idx = array.array("q", [0])
        self._closed = False
        self.num_tokens = 0

    # --- Megatron's builder API -------------------------------------------------
    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence to the current document (close it with ``end_document``)."""
        arr = self._as_tokens(tokens)
        self._data.write(arr.tobytes())
        self._sizes.append(len(arr))
        self.num_tokens += len(arr)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(
        self, tokens: Sequence[int] | np.ndarray, *, lengths: Sequence[int] | None = None
    ) -> None:
        """Append a document; ``lengths`` splits it into sequences (default: one)."""
        arr = self._as_tokens(tokens)
        lens = [len(arr)] if lengths is None else list(lengths)
        if sum(lens) != len(arr) or any(n < 0 for n in lens):
            raise ValueError(f"sequence lengths {lens} do not add up to {len(arr)} tokens")
        self._data.write(arr.tobytes())
        self._sizes.extend(lens)
        self._doc_idx.append(len(self._sizes))
        self.num_tokens += len(arr)

    def add_documents(
        self,
        tokens: np.ndarray,
        *,
        lengths: np.ndarray,
        sequences_per_document: np.ndarray | None = None,
    ) -> None:
        """Append many documents at once: ``tokens`` is the concatenation of sequences of
        ``lengths``; document i has ``sequences_per_document[i]`` of them (default: 1)."""
        arr = self._as_tokens(tokens)
        lens = np.asarray(lengths, dtype=np.int64)
        if int(lens.sum()) != len(arr) or (len(lens) and int(lens.min()) < 0):
            raise ValueError(f"lengths add up to {int(lens.sum())}, tokens has {len(arr)}")
        if len(lens) and int(lens.max()) > np.iinfo(np.int32).max:
            raise ValueError(f"sequence of {int(lens.max())} tokens exceeds the int32 size field")
        per_doc = (
            np.ones(len(lens), dtype=np.int64)
            if sequences_per_document is None
            else np.asarray(sequences_per_document, dtype=np.int64)
        )
        if int(per_doc.sum()) != len(lens) or (len(per_doc) and int(per_doc.min()) < 0):
            raise ValueError(
                f"sequences_per_document adds up to {int(per_doc.sum())}, expected {len(lens)}"
            )
        self._data.write(arr.tobytes())
        base = len(self._sizes)
        self._sizes.frombytes(lens.astype(np.int32).tobytes())
        self._doc_idx.frombytes((np.cumsum(per_doc) + base).astype(np.int64).tobytes())
        self.num_tokens += len(arr)

    def add_dataset(self, prefix: str | os.PathLike[str]) -> None:
        """Append a whole existing dataset (same dtype), copying its .bin verbatim."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{other.idx_file}: dtype {other.dtype} differs from the output dtype {self.dtype}"
            )
        base = len(self._sizes)
        self._sizes.frombytes(np.ascontiguousarray(other.sizes).tobytes())
        self._doc_idx.frombytes((np.asarray(other.doc_idx[1:]) + base).tobytes())
        self.num_tokens += other.num_tokens
        _append_file(other.bin_file, self._data)
        del other

    # --- completion ----------------------------------------------------------------
    def finalize(self) -> None:
        """Write the index, then publish the pair under its final names."""
        if self._closed:
            raise RuntimeError(f"writer for {self.prefix} is already closed")
        self._data.close()
        write_index(
            idx_path(self._tmp_prefix), dtype=self.dtype, sizes=self._sizes, doc_idx=self._doc_idx
        )
        publish_pair(self._tmp_prefix, self.prefix)
        self._closed = True

    def abort(self) -> None:
        """Close and delete the temporary files (the final names are left untouched)."""
        if not self._closed:
            self._data.close()
            self._closed = True
        for path in (bin_path(self._tmp_prefix), idx_path(self._tmp_prefix)):
            if os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def _as_tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
        if arr.dtype == self.dtype:
            return arr
        if len(arr) and self.dtype.kind in "iu" and arr.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ValueError(
                    f"token ids in [{lo}, {hi}] do not fit the dataset dtype {self.dtype}"
                )
        return arr.astype(self.dtype)
