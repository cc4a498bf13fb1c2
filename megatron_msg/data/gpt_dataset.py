"""GPT training samples over an indexed dataset (Megatron's document/sample/shuffle design).

The sequences of a document range are concatenated, in a seeded shuffled
order, into one token stream; sample j is stream positions
``[j*seq_length, (j+1)*seq_length]``: seq_length+1 tokens (inputs and shifted
labels), consecutive samples sharing one token, documents crossed freely.

Three index arrays describe this, built once and cached on disk
(``index_cache``):

- ``doc_index``: sequence ids in stream order. Each epoch is its own
  permutation, so every sequence is seen once per epoch before any repeats.
  (Megatron-LM shuffles all full epochs as one pool; ours is stricter.)
- ``sample_index`` [num_built + 1, 2]: (position in doc_index, token offset) of
  each sample's first token; row j+1 gives sample j's last token. Built in C++
  (``megatron_msg._data_helpers``) or NumPy; both give identical arrays, and the
  same ones as Megatron-LM's builder for a given doc_index.
- ``shuffle_index``: the order samples are served in, a permutation of each
  epoch's samples separately, the last (partial) epoch included, so an epoch's
  samples are all served before the next epoch's. A sample belongs to the
  epoch its last token lies in.

One "document" of the split is one document of the .idx doc_idx; the GPT
stream unit is the sequence (one per document as written by our preprocessing).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import Any

import numpy as np

from megatron_msg.data.index_cache import load_arrays, load_or_build
from megatron_msg.data.indexed import IndexedDataset

try:
    from megatron_msg import _data_helpers  # type: ignore[attr-defined]
except ImportError:  # extension not built: NumPy fallback
    _data_helpers = None

__all__ = [
    "GPTDataset",
    "build_document_index",
    "build_gpt_indices",
    "build_sample_index",
    "build_sample_index_cpp",
    "build_sample_index_numpy",
    "build_shuffle_index",
    "have_cpp_helpers",
    "num_epochs_for",
    "parse_split",
    "split_document_ranges",
]

_INT32_MAX = np.iinfo(np.int32).max
_ARRAYS = ("doc_index", "sample_index", "shuffle_index")
# Part of every cache key: bump when the index construction changes, so old
# cache entries are never mistaken for new ones.
_INDEX_VERSION = 1


def have_cpp_helpers() -> bool:
    return _data_helpers is not None


def parse_split(split: str) -> tuple[float, float, float]:
    """'969,30,1' (or '98/2/0', or '1') -> normalised (train, valid, test) fractions."""
    parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"split {split!r} must be up to 3 numbers like '969,30,1'") from None
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            f"split {split!r} must be 1-3 non-negative numbers with a positive sum, like '969,30,1'"
        )
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Contiguous, disjoint [start, stop) document ranges for train/valid/test (Megatron's rule)."""
    fractions = parse_split(split)
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + round(fraction * num_documents))
    shift = bounds[-1] - num_documents  # rounding drift goes onto the later splits
    bounds = [0] + [b - shift for b in bounds[1:]]
    bounds = [min(max(b, 0), num_documents) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def num_epochs_for(*, tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> int:
    """Epochs needed so the stream holds num_samples samples (one epoch when None)."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(
    sequence_ids: np.ndarray, *, num_epochs: int, rng: np.random.RandomState
) -> np.ndarray:
    """Each epoch a fresh permutation of ``sequence_ids``, epochs concatenated."""
    dtype = np.int32 if len(sequence_ids) * num_epochs < _INT32_MAX else np.int64
    ids = np.asarray(sequence_ids, dtype=dtype)
    out = np.empty(len(ids) * num_epochs, dtype=dtype)
    for epoch in range(num_epochs):
        out[epoch * len(ids) : (epoch + 1) * len(ids)] = rng.permutation(ids)
    return out


def _check_sample_args(
    sizes: np.ndarray, doc_index: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    if seq_length < 1 or num_samples < 0:
        raise ValueError(f"seq_length ({seq_length}) must be >= 1, num_samples >= 0")
    if len(doc_index) == 0:
        raise ValueError("doc_index is empty")
    if int(doc_index.min()) < 0 or int(doc_index.max()) >= len(sizes):
        raise ValueError(
            f"doc_index values in [{int(doc_index.min())}, {int(doc_index.max())}] "
            f"outside the {len(sizes)} sequences"
        )
    lengths = np.asarray(sizes, dtype=np.int64)[doc_index]
    available = int(lengths.sum())
    if num_samples * seq_length + 1 > available:
        raise ValueError(
            f"{num_samples} samples of {seq_length}+1 tokens need {num_samples * seq_length + 1} "
            f"tokens, the documents hold {available}"
        )
    return lengths


def build_sample_index_numpy(
    sizes: np.ndarray, doc_index: np.ndarray, *, seq_length: int, num_samples: int
) -> np.ndarray:
    """Sample index by binary search over cumulative document ends (vectorised)."""
    lengths = _check_sample_args(sizes, doc_index, seq_length, num_samples)
    ends = np.cumsum(lengths)
    # Last token of sample j is stream position (j+1)*seq_length; it lies in the
    # first document whose end exceeds it (empty documents are skipped).
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    doc_pos = np.searchsorted(ends, positions, side="right")
    offsets = positions - (ends[doc_pos] - lengths[doc_pos])
    out = np.zeros((num_samples + 1, 2), dtype=doc_index.dtype)
    out[1:, 0] = doc_pos
    out[1:, 1] = offsets
    return out


def build_sample_index_cpp(
    sizes: np.ndarray, doc_index: np.ndarray, *, seq_length: int, num_samples: int
) -> np.ndarray:
    """The same array from the C++ builder; RuntimeError when the extension is not built."""
    if _data_helpers is None:
        raise RuntimeError(
            "megatron_msg._data_helpers is not built (run `make build`); "
            "build_sample_index_numpy gives the same result"
        )
    _check_sample_args(sizes, doc_index, seq_length, num_samples)
    sizes32 = np.require(sizes, dtype=np.int32, requirements=["C", "A"])
    if doc_index.dtype == np.int32:
        fn = _data_helpers.build_sample_idx_int32
    else:
        fn = _data_helpers.build_sample_idx_int64
        doc_index = doc_index.astype(np.int64, copy=False)
    return np.asarray(fn(sizes32, np.ascontiguousarray(doc_index), seq_length, num_samples))


def build_sample_index(
    sizes: np.ndarray, doc_index: np.ndarray, *, seq_length: int, num_samples: int
) -> np.ndarray:
    if _data_helpers is not None:
        return build_sample_index_cpp(
            sizes, doc_index, seq_length=seq_length, num_samples=num_samples
        )
    return build_sample_index_numpy(
        sizes, doc_index, seq_length=seq_length, num_samples=num_samples
    )


def build_shuffle_index(
    *, epoch_starts: list[int], total: int, rng: np.random.RandomState
) -> np.ndarray:
    """Permute [0, total) within each range [epoch_starts[e], epoch_starts[e+1])."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    bounds = [*epoch_starts, total]
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        part = np.arange(lo, hi, dtype=dtype)
        rng.shuffle(part)
        parts.append(part)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def build_gpt_indices(
    sizes: np.ndarray,
    *,
    sequence_range: tuple[int, int],
    seq_length: int,
    num_samples: int | None,
    seed: int,
) -> dict[str, np.ndarray]:
    """doc_index, sample_index and shuffle_index for sequences [start, stop)."""
    start, stop = sequence_range
    tokens_per_epoch = int(np.asarray(sizes[start:stop], dtype=np.int64).sum())
    if tokens_per_epoch <= 1:
        raise ValueError(
            f"sequences [{start}, {stop}) hold {tokens_per_epoch} tokens; need at least 2"
        )
    num_epochs = num_epochs_for(
        tokens_per_epoch=tokens_per_epoch, seq_length=seq_length, num_samples=num_samples
    )
    rng = np.random.RandomState(seed)
    doc_index = build_document_index(np.arange(start, stop), num_epochs=num_epochs, rng=rng)
    num_built = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_index = build_sample_index(
        sizes, doc_index, seq_length=seq_length, num_samples=num_built
    )
    epoch_starts = [0] + [(e * tokens_per_epoch - 1) // seq_length for e in range(1, num_epochs)]
    shuffle_index = build_shuffle_index(epoch_starts=epoch_starts, total=num_built, rng=rng)
    return {"doc_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def _sizes_digest(sizes: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    step = 1 << 24
    for lo in range(0, len(sizes), step):
        digest.update(np.ascontiguousarray(sizes[lo : lo + step], dtype=np.int32).tobytes())
    return digest.hexdigest()


class GPTDataset:
    """Samples of seq_length+1 tokens (int64) from documents [start, stop) of ``indexed``.

    ``num_samples`` None means one epoch. The index arrays are cached in
    ``cache_dir`` (default: ``index_cache`` beside the dataset), built by rank 0
    of ``group`` while the others wait (see ``index_cache``).
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        *,
        seq_length: int,
        num_samples: int | None = None,
        seed: int = 1234,
        document_range: tuple[int, int] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        name: str = "train",
        group: Any = None,
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0 or None, got {num_samples}")
        first, last = document_range if document_range is not None else (0, indexed.num_documents)
        if not 0 <= first < last <= indexed.num_documents:
            raise ValueError(
                f"document_range ({first}, {last}) must be non-empty within "
                f"[0, {indexed.num_documents}] documents of {indexed.prefix}"
            )
        self.indexed = indexed
        self.seq_length = seq_length
        self.sequence_range = (int(indexed.doc_idx[first]), int(indexed.doc_idx[last]))
        start, stop = self.sequence_range
        self.description: dict[str, Any] = {
            "kind": "gpt",
            "index_version": _INDEX_VERSION,
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
            "sequence_range": [start, stop],
            "sizes_blake2b": _sizes_digest(indexed.sizes[start:stop]),
        }
        directory = cache_dir or os.path.join(os.path.dirname(indexed.prefix), "index_cache")
        entry = load_or_build(
            cache_dir=directory,
            stem=f"{os.path.basename(indexed.prefix)}-{name}",
            description=self.description,
            names=("doc_index", "sample_index", "shuffle_index"),
            build=lambda: build_gpt_indices(
                indexed.sizes,
                sequence_range=self.sequence_range,
                seq_length=seq_length,
                num_samples=num_samples,
                seed=seed,
            ),
            group=group,
        )
        self.built_cache = entry.built
        self._cache_paths = entry.paths
        self._set_arrays(entry.arrays)
        self.num_samples = len(self.shuffle_index) if num_samples is None else num_samples

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.doc_index = arrays["doc_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __getstate__(self) -> dict[str, Any]:
        # Pickle (e.g. into DataLoader workers) as file names, never array contents.
        return {k: v for k, v in self.__dict__.items() if k not in _ARRAYS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._set_arrays(load_arrays(self._cache_paths))

    def __len__(self) -> int:
        return self.num_samples

    def _bounds(self, idx: int) -> tuple[int, int, int, int]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        s = int(self.shuffle_index[idx])
        first_pos, first_off = (int(v) for v in self.sample_index[s])
        last_pos, last_off = (int(v) for v in self.sample_index[s + 1])
        return first_pos, first_off, last_pos, last_off

    def __getitem__(self, idx: int) -> np.ndarray:
        first_pos, first_off, last_pos, last_off = self._bounds(int(idx))
        seq = self.doc_index
        if first_pos == last_pos:
            part = self.indexed.get(
                int(seq[first_pos]), offset=first_off, length=last_off - first_off + 1
            )
            return np.asarray(part, dtype=np.int64)
        parts = [self.indexed.get(int(seq[first_pos]), offset=first_off)]
        parts += [self.indexed.get(int(seq[p])) for p in range(first_pos + 1, last_pos)]
        parts.append(self.indexed.get(int(seq[last_pos]), length=last_off + 1))
        return np.concatenate(parts).astype(np.int64, copy=False)

    def sequence_ids(self, idx: int) -> np.ndarray:
        """Ids of the sequences sample ``idx`` draws tokens from, in order."""
        first_pos, _, last_pos, _ = self._bounds(int(idx))
        return np.asarray(self.doc_index[first_pos : last_pos + 1], dtype=np.int64)
