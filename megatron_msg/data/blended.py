"""Blending of several datasets by weight, and the train/valid/test builder.

Blended sample i is sample ``dataset_sample_index[i]`` of dataset
``dataset_index[i]``, where the dataset is chosen greedily as the one furthest
below its weight so far (Megatron-LM's rule): every prefix of the blend follows
the weights as closely as integer counts allow, and each dataset's samples are
consumed in its own (shuffled) order. The two arrays are cached like the GPT
indices. C++ builder when ``megatron_msg._data_helpers`` is built, identical
pure-Python fallback otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_msg.data.gpt_dataset import GPTDataset, split_document_ranges
from megatron_msg.data.index_cache import load_arrays, load_or_build
from megatron_msg.data.indexed import IndexedDataset

try:
    from megatron_msg import _data_helpers  # type: ignore[attr-defined]
except ImportError:  # extension not built: Python fallback
    _data_helpers = None

__all__ = [
    "BlendedDataset",
    "build_blending_indices",
    "build_blending_indices_cpp",
    "build_blending_indices_python",
    "build_gpt_datasets",
    "normalize_weights",
    "parse_blend",
]


def normalize_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative numbers with a positive sum, got {weights}")
    if len(w) > 32767:
        raise ValueError(f"at most 32767 datasets can be blended, got {len(w)}")
    return w / w.sum()


def parse_blend(data_path: Sequence[str]) -> list[tuple[float, str]]:
    """Megatron's ``--data-path``: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]``."""
    items = list(data_path)
    if len(items) == 1:
        return [(1.0, items[0])]
    if not items or len(items) % 2:
        raise ValueError(f"data path {items} must be one prefix or weight/prefix pairs")
    pairs = []
    for weight, prefix in zip(items[0::2], items[1::2]):
        try:
            pairs.append((float(weight), prefix))
        except ValueError:
            raise ValueError(
                f"data path weight {weight!r} (for {prefix!r}) is not a number"
            ) from None
    return pairs


def build_blending_indices_python(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference greedy builder: same floating-point operations as the C++ one."""
    w = [float(x) for x in normalize_weights(weights)]
    counts = [0] * len(w)
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        target = float(i) if i > 1 else 1.0
        best, best_error = 0, w[0] * target - float(counts[0])
        for d in range(1, len(w)):
            error = w[d] * target - float(counts[d])
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, sample_index


def build_blending_indices_cpp(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if _data_helpers is None:
        raise RuntimeError("megatron_msg._data_helpers is not built (run `make build`)")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    ds, sample = _data_helpers.build_blending_indices(normalize_weights(weights), int(size))
    return np.asarray(ds), np.asarray(sample)


def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if _data_helpers is not None:
        return build_blending_indices_cpp(weights, size)
    return build_blending_indices_python(weights, size)


def _describe(dataset: Any) -> Any:
    return getattr(dataset, "description", {"type": type(dataset).__name__, "len": len(dataset)})


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``."""

    def __init__(
        self,
        datasets: Sequence[Any],
        *,
        weights: Sequence[float] | np.ndarray,
        size: int,
        cache_dir: str | os.PathLike[str],
        name: str = "train",
        group: Any = None,
    ) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.description = {
            "kind": "blend",
            "weights": [float(w) for w in self.weights],
            "size": self.size,
            "datasets": [_describe(d) for d in self.datasets],
        }
        entry = load_or_build(
            cache_dir=cache_dir,
            stem=f"blend-{name}",
            description=self.description,
            names=("dataset_index", "dataset_sample_index"),
            build=lambda: dict(
                zip(
                    ("dataset_index", "dataset_sample_index"),
                    build_blending_indices(self.weights, self.size),
                )
            ),
            group=group,
        )
        self.built_cache = entry.built
        self._cache_paths = entry.paths
        self.dataset_index = entry.arrays["dataset_index"]
        self.dataset_sample_index = entry.arrays["dataset_sample_index"]
        needed = np.bincount(np.asarray(self.dataset_index), minlength=len(self.datasets))
        for i, (dataset, count) in enumerate(zip(self.datasets, needed)):
            if count > len(dataset):
                raise ValueError(
                    f"blend needs {int(count)} samples from dataset {i} "
                    f"(weight {self.weights[i]:.4g}) but it has {len(dataset)}"
                )

    def __getstate__(self) -> dict[str, Any]:
        # Pickle as file names, never array contents (see GPTDataset).
        skip = ("dataset_index", "dataset_sample_index")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        arrays = load_arrays(self._cache_paths)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} samples")
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]  # type: ignore[no-any-return]


def build_gpt_datasets(
    *,
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    num_samples: Sequence[int | None],
    seed: int = 1234,
    cache_dir: str | os.PathLike[str] | None = None,
    group: Any = None,
) -> tuple[Any, Any, Any]:
    """Train/valid/test datasets (GPTDataset, BlendedDataset, or None when empty).

    ``data_path`` follows Megatron's ``--data-path`` (one prefix, or weight/prefix
    pairs); ``split`` (e.g. '969,30,1') applies to each prefix's documents;
    ``num_samples`` gives the samples wanted per split (None: one epoch, single
    dataset only).
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples needs 3 entries (train, valid, test), got {num_samples}")
    blend = parse_blend(data_path)
    weights = normalize_weights([w for w, _ in blend])
    indexed = [IndexedDataset(prefix) for _, prefix in blend]
    ranges = [split_document_ranges(ds.num_documents, split) for ds in indexed]
    out: list[Any] = []
    for s, name in enumerate(("train", "valid", "test")):
        wanted = num_samples[s]
        empty = [prefix for (_, prefix), r in zip(blend, ranges) if r[s][0] == r[s][1]]
        if wanted == 0 or len(empty) == len(blend):
            out.append(None)
            continue
        if empty:
            raise ValueError(f"split {split!r} leaves no {name} documents in {empty}")
        common: dict[str, Any] = {
            "seq_length": seq_length,
            "seed": seed,
            "name": name,
            "group": group,
        }
        if len(blend) == 1:
            out.append(
                GPTDataset(
                    indexed[0],
                    num_samples=wanted,
                    document_range=ranges[0][s],
                    cache_dir=cache_dir,
                    **common,
                )
            )
            continue
        if wanted is None:
            raise ValueError(f"a blend of {len(blend)} datasets needs num_samples for {name}")
        counts = np.bincount(build_blending_indices(weights, wanted)[0], minlength=len(blend))
        parts = [
            GPTDataset(ds, num_samples=int(c), document_range=r[s], cache_dir=cache_dir, **common)
            for ds, r, c in zip(indexed, ranges, counts)
        ]
        blend_dir = cache_dir or os.path.join(os.path.dirname(blend[0][1]), "index_cache")
        out.append(
            BlendedDataset(
                parts, weights=weights, size=wanted, cache_dir=blend_dir, name=name, group=group
            )
        )
    return out[0], out[1], out[2]
