"""Blending by weight (C++ and Python builders identical) and the train/valid/test builder."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_msg.data import blended
from megatron_msg.data.blended import (
    BlendedDataset,
    build_blending_indices_cpp,
    build_blending_indices_python,
    build_gpt_datasets,
    parse_blend,
)
from megatron_msg.data.gpt_dataset import GPTDataset
from megatron_msg.data.indexed import IndexedDataset, IndexedDatasetWriter


def _dataset(path: str, tag: int, num_docs: int = 40) -> str:
    rng = np.random.default_rng(tag)
    with IndexedDatasetWriter(path, dtype=np.int32) as w:
        for doc in range(num_docs):
            w.add_document(tag * 100000 + doc * 100 + np.arange(int(rng.integers(2, 40))))
    return path


def test_cpp_and_python_blending_identical_and_follow_weights():
    assert blended._data_helpers is not None, "megatron_msg._data_helpers is not built"
    rng = np.random.default_rng(0)
    for trial in range(12):
        weights = rng.random(int(rng.integers(1, 6))) + (0.0 if trial % 3 else 1e-3)
        size = int(rng.integers(0, 3000))
        ds_py, idx_py = build_blending_indices_python(weights, size)
        ds_cpp, idx_cpp = build_blending_indices_cpp(weights, size)
        np.testing.assert_array_equal(ds_py, ds_cpp)
        np.testing.assert_array_equal(idx_py, idx_cpp)
        assert ds_cpp.dtype == np.int16 and idx_cpp.dtype == np.int64
        w = weights / weights.sum()
        for n in (size // 3, size):  # every prefix follows the weights
            counts = np.bincount(ds_cpp[:n], minlength=len(w))
            assert np.all(np.abs(counts - w * n) <= len(w) + 1)
        for d in range(len(w)):  # each dataset's samples are consumed in order
            np.testing.assert_array_equal(idx_cpp[ds_cpp == d], np.arange((ds_cpp == d).sum()))
    with pytest.raises(ValueError, match="positive sum"):
        build_blending_indices_cpp(np.array([0.0, 0.0]), 10)


def test_parse_blend():
    assert parse_blend(["a"]) == [(1.0, "a")]
    assert parse_blend(["0.3", "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    with pytest.raises(ValueError, match=r"'x' .*'b'"):
        parse_blend(["0.3", "a", "x", "b"])
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        parse_blend(["0.3", "a", "b"])


def test_blended_dataset_serves_samples_of_its_parts(tmp_path):
    parts = [
        GPTDataset(IndexedDataset(_dataset(str(tmp_path / f"d{i}"), i + 1)), seq_length=16,
                   num_samples=200, seed=i, cache_dir=tmp_path / "c")
        for i in range(2)
    ]  # fmt: skip
    blend = BlendedDataset(parts, weights=[1, 3], size=240, cache_dir=tmp_path / "c")
    sources = np.array([int(blend[i][0]) // 100000 - 1 for i in range(240)])
    np.testing.assert_array_equal(sources, blend.dataset_index)
    assert abs((sources == 1).sum() - 180) <= 2
    again = BlendedDataset(parts, weights=[1, 3], size=240, cache_dir=tmp_path / "c")
    assert blend.built_cache and not again.built_cache
    with pytest.raises(ValueError, match=r"needs \d+ samples from dataset 1 .* has 200"):
        BlendedDataset(parts, weights=[1, 3], size=400, cache_dir=tmp_path / "c")


def test_build_gpt_datasets_blend_and_split(tmp_path):
    a, b = _dataset(str(tmp_path / "a"), 1), _dataset(str(tmp_path / "b"), 2, num_docs=60)
    train, valid, test = build_gpt_datasets(
        data_path=["0.25", a, "0.75", b], split="80,20,0", seq_length=8,
        num_samples=(300, 40, 10), seed=3, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert test is None and len(train) == 300 and len(valid) == 40
    assert abs(int((np.asarray(train.dataset_index) == 1).sum()) - 225) <= 2
    docs = {"train": set(), "valid": set()}
    for name, ds in (("train", train), ("valid", valid)):
        for i in range(len(ds)):
            docs[name].update((int(t) // 100000, int(t) % 100000 // 100) for t in ds[i])
    assert not docs["train"] & docs["valid"]
    assert {d for tag, d in docs["valid"] if tag == 1} <= set(range(32, 40))
    single, _, _ = build_gpt_datasets(
        data_path=[a], split="1", seq_length=8, num_samples=(None, 0, 0), cache_dir=tmp_path / "c2"
    )
    assert isinstance(single, GPTDataset) and len(single) == (IndexedDataset(a).num_tokens - 1) // 8


def test_blended_pickles_as_file_names(tmp_path):
    import pickle

    parts = [
        GPTDataset(IndexedDataset(_dataset(str(tmp_path / f"d{i}"), i + 1)), seq_length=8,
                   num_samples=300, seed=i, cache_dir=tmp_path)
        for i in range(2)
    ]  # fmt: skip
    blend = BlendedDataset(parts, weights=[2, 1], size=400, cache_dir=tmp_path)
    blob = pickle.dumps(blend)
    assert len(blob) < 8000
    clone = pickle.loads(blob)
    assert all(np.array_equal(blend[i], clone[i]) for i in range(0, 400, 9))
