"""GPT dataset: sample contents, determinism, splits, C++ vs NumPy, caching, multi-rank build."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from megatron_msg.data import gpt_dataset as gd
from megatron_msg.data.gpt_dataset import (
    GPTDataset,
    build_document_index,
    build_sample_index_cpp,
    build_sample_index_numpy,
    split_document_ranges,
)
from megatron_msg.data.indexed import IndexedDataset, IndexedDatasetWriter
from tests.dist_utils import run_distributed


def _make_dataset(path: str, num_docs: int = 60, seed: int = 0) -> IndexedDataset:
    """Documents whose tokens encode (document, position) so samples can be traced back."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(path, dtype=np.int32) as w:
        for doc in range(num_docs):
            n = int(rng.integers(1, 30))
            w.add_document(doc * 1000 + np.arange(n))
    return IndexedDataset(path)


def _stream(ds: IndexedDataset, doc_index: np.ndarray) -> np.ndarray:
    return np.concatenate([ds[int(s)] for s in doc_index]).astype(np.int64)


@pytest.mark.parametrize(("seq_length", "num_samples"), [(16, None), (7, 300), (40, 100)])
def test_samples_are_contiguous_windows_of_the_shuffled_stream(tmp_path, seq_length, num_samples):
    ds = _make_dataset(str(tmp_path / "ds"))
    gpt = GPTDataset(
        ds, seq_length=seq_length, num_samples=num_samples, seed=5, cache_dir=tmp_path / "c"
    )
    stream = _stream(ds, gpt.doc_index)
    served = set()
    for i in range(len(gpt)):
        sample = gpt[i]
        j = int(gpt.shuffle_index[i])
        assert sample.dtype == np.int64 and len(sample) == seq_length + 1
        np.testing.assert_array_equal(sample, stream[j * seq_length : (j + 1) * seq_length + 1])
        served.add(j)
    assert len(served) == len(gpt)  # a permutation: no sample served twice
    # every epoch visits each document exactly once
    n = ds.num_documents
    for epoch in range(len(gpt.doc_index) // n):
        assert sorted(gpt.doc_index[epoch * n : (epoch + 1) * n]) == list(range(n))


def test_shuffle_is_per_epoch_including_last_partial_epoch(tmp_path):
    ds = _make_dataset(str(tmp_path / "ds"))
    tokens = ds.num_tokens
    seq_length, num_samples = 8, int(2.3 * tokens / 8)
    gpt = GPTDataset(ds, seq_length=seq_length, num_samples=num_samples, seed=3, cache_dir=tmp_path)
    assert len(gpt.doc_index) == 3 * ds.num_documents
    bounds = [(e * tokens - 1) // seq_length for e in (1, 2)] + [len(gpt.shuffle_index)]
    start = 0
    for stop in bounds:
        assert sorted(gpt.shuffle_index[start:stop]) == list(range(start, stop))
        start = stop
    assert not np.array_equal(gpt.shuffle_index[: bounds[0]], np.arange(bounds[0]))


def test_same_seed_same_samples_other_seed_differs(tmp_path):
    ds = _make_dataset(str(tmp_path / "ds"))
    a = GPTDataset(ds, seq_length=12, num_samples=200, seed=7, cache_dir=tmp_path / "a")
    b = GPTDataset(ds, seq_length=12, num_samples=200, seed=7, cache_dir=tmp_path / "b")
    c = GPTDataset(ds, seq_length=12, num_samples=200, seed=8, cache_dir=tmp_path / "a")
    assert all(np.array_equal(a[i], b[i]) for i in range(200))
    assert not all(np.array_equal(a[i], c[i]) for i in range(200))


def test_splits_are_disjoint_in_documents(tmp_path):
    ds = _make_dataset(str(tmp_path / "ds"), num_docs=100)
    ranges = split_document_ranges(100, "969,30,1")
    assert ranges == [(0, 97), (97, 100), (100, 100)]
    assert split_document_ranges(10, "8,1,1") == [(0, 8), (8, 9), (9, 10)]
    with pytest.raises(ValueError, match="'a,b'"):
        split_document_ranges(10, "a,b")
    train = GPTDataset(ds, seq_length=10, document_range=(0, 80), name="train", cache_dir=tmp_path)
    valid = GPTDataset(
        ds, seq_length=10, document_range=(80, 100), name="valid", cache_dir=tmp_path
    )
    docs = [set(), set()]
    for k, d in enumerate((train, valid)):
        for i in range(len(d)):
            docs[k].update(int(t) // 1000 for t in d[i])  # token value encodes its document
            docs[k].update(int(s) for s in d.sequence_ids(i))
    assert docs[0] <= set(range(80)) and docs[1] <= set(range(80, 100))
    assert len(docs[0]) > 70 and len(docs[1]) > 15


def _random_case(rng: np.random.RandomState):
    n = int(rng.randint(1, 80))
    sizes = rng.randint(0, 50, size=n).astype(np.int32)
    sizes[rng.randint(n)] += 2  # at least two tokens; empty documents stay in
    seq_length = int(rng.randint(1, 70))
    epochs = int(rng.randint(1, 5))
    doc_index = build_document_index(np.arange(n), num_epochs=epochs, rng=rng)
    num_samples = (epochs * int(sizes.sum()) - 1) // seq_length
    return sizes, doc_index, seq_length, num_samples


def test_cpp_and_numpy_sample_index_identical_and_match_megatron():
    assert gd.have_cpp_helpers(), "megatron_msg._data_helpers is not built: run `make build`"
    try:
        from megatron.core.datasets import helpers_cpp
    except Exception as e:
        pytest.fail(f"megatron-core helpers failed to import: {e!r}")
    rng = np.random.RandomState(0)
    for _ in range(40):
        sizes, doc_index, seq_length, num_samples = _random_case(rng)
        results = {}
        epochs = len(doc_index) // len(sizes)
        tokens = int(sizes.sum())
        # the whole stream, and a count ending inside the last epoch (a partial epoch)
        partial = int(rng.randint((epochs - 1) * tokens // seq_length, num_samples + 1))
        for take in (num_samples, partial):
            a = build_sample_index_numpy(sizes, doc_index, seq_length=seq_length, num_samples=take)
            b = build_sample_index_cpp(sizes, doc_index, seq_length=seq_length, num_samples=take)
            assert a.dtype == b.dtype and a.shape == (take + 1, 2)
            np.testing.assert_array_equal(a, b)
            results[take] = a
        theirs = helpers_cpp.build_sample_idx_int32(
            sizes, doc_index.astype(np.int32), seq_length, epochs, int(sizes.sum()), True, 1
        )
        np.testing.assert_array_equal(results[num_samples], theirs)
    big = np.full(4, 10, dtype=np.int32)
    di64 = np.arange(4, dtype=np.int64)
    np.testing.assert_array_equal(
        build_sample_index_cpp(big, di64, seq_length=3, num_samples=13),
        build_sample_index_numpy(big, di64, seq_length=3, num_samples=13),
    )
    with pytest.raises(ValueError, match="need 41 tokens"):
        build_sample_index_cpp(big, di64, seq_length=10, num_samples=4)


def test_full_index_build_same_with_and_without_extension(monkeypatch):
    assert gd.have_cpp_helpers(), "megatron_msg._data_helpers is not built: run `make build`"
    rng = np.random.RandomState(1)
    for _ in range(8):
        sizes, _, seq_length, _ = _random_case(rng)
        tokens = int(sizes.sum())
        num_samples = int(rng.randint(1, 3 * tokens // seq_length + 2))  # often a partial epoch
        kwargs = dict(
            sequence_range=(0, len(sizes)), seq_length=seq_length, num_samples=num_samples, seed=9
        )
        with_cpp = gd.build_gpt_indices(sizes, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(gd, "_data_helpers", None)
            with_numpy = gd.build_gpt_indices(sizes, **kwargs)
        for name in ("doc_index", "sample_index", "shuffle_index"):
            np.testing.assert_array_equal(with_cpp[name], with_numpy[name])
        assert len(with_cpp["shuffle_index"]) >= num_samples


def test_cache_is_reused(tmp_path, monkeypatch):
    ds = _make_dataset(str(tmp_path / "ds"))
    calls = []
    real = gd.build_gpt_indices
    monkeypatch.setattr(gd, "build_gpt_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = GPTDataset(ds, seq_length=9, num_samples=250, seed=2, cache_dir=tmp_path / "c")
    files = sorted((tmp_path / "c").iterdir())
    assert len(calls) == 1 and first.built_cache and len(files) == 4
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = GPTDataset(ds, seq_length=9, num_samples=250, seed=2, cache_dir=tmp_path / "c")
    assert len(calls) == 1 and not second.built_cache
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "c").iterdir())] == mtimes
    assert isinstance(second.sample_index, np.memmap)
    assert all(np.array_equal(first[i], second[i]) for i in range(250))
    GPTDataset(ds, seq_length=9, num_samples=251, seed=2, cache_dir=tmp_path / "c")
    assert len(calls) == 2  # anything that changes the arrays changes the key


def test_cache_key_tracks_the_data(tmp_path):
    _make_dataset(str(tmp_path / "ds"), seed=0)
    a = GPTDataset(IndexedDataset(str(tmp_path / "ds")), seq_length=9, cache_dir=tmp_path / "c")
    _make_dataset(str(tmp_path / "ds"), seed=1)  # same name, new content
    b = GPTDataset(IndexedDataset(str(tmp_path / "ds")), seq_length=9, cache_dir=tmp_path / "c")
    assert a.built_cache and b.built_cache


def test_bad_arguments_name_values(tmp_path):
    ds = _make_dataset(str(tmp_path / "ds"), num_docs=10)
    with pytest.raises(ValueError, match=r"document_range \(5, 20\)"):
        GPTDataset(ds, seq_length=4, document_range=(5, 20), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="seq_length must be >= 1, got 0"):
        GPTDataset(ds, seq_length=0, cache_dir=tmp_path)
    gpt = GPTDataset(ds, seq_length=4, num_samples=5, cache_dir=tmp_path)
    with pytest.raises(IndexError, match="sample 5 out of range for 5"):
        gpt[5]


def _two_rank_body(rank: int, world_size: int, prefix: str, cache: str) -> None:
    ds = IndexedDataset(prefix)
    real = gd.build_gpt_indices
    calls = []

    def failing(*args, **kwargs):
        raise OSError("disk full (simulated)")

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(1.0)  # rank 1 must wait for this, not race ahead
        return real(*args, **kwargs)

    gd.build_gpt_indices = failing
    # a build failure on rank 0 reaches every rank instead of hanging them
    with pytest.raises(
        (OSError, RuntimeError), match="disk full" if rank == 0 else "rank 0 failed"
    ):
        GPTDataset(ds, seq_length=8, num_samples=100, seed=1, cache_dir=cache)
    gd.build_gpt_indices = slow
    start = time.perf_counter()
    gpt = GPTDataset(ds, seq_length=8, num_samples=100, seed=1, cache_dir=cache)
    elapsed = time.perf_counter() - start
    assert len(calls) == (1 if rank == 0 else 0)
    assert gpt.built_cache == (rank == 0)
    if rank == 1:
        assert elapsed >= 0.9, f"rank 1 returned after {elapsed:.2f}s without waiting"
        assert isinstance(gpt.shuffle_index, np.memmap)
    samples = np.stack([gpt[i] for i in range(100)])
    np.save(os.path.join(cache, f"samples{rank}.npy"), samples)


def test_rank0_builds_rank1_waits_and_loads(tmp_path):
    _make_dataset(str(tmp_path / "ds"))
    cache = tmp_path / "cache"
    cache.mkdir()
    run_distributed(_two_rank_body, world_size=2, args=(str(tmp_path / "ds"), str(cache)))
    np.testing.assert_array_equal(np.load(cache / "samples0.npy"), np.load(cache / "samples1.npy"))


def test_pickles_as_file_names(tmp_path):
    import pickle

    ds = _make_dataset(str(tmp_path / "ds"))
    gpt = GPTDataset(ds, seq_length=8, num_samples=500, seed=4, cache_dir=tmp_path / "c")
    blob = pickle.dumps(gpt)
    assert len(blob) < 4000  # names and parameters, not the token or index arrays
    clone = pickle.loads(blob)
    assert isinstance(clone.sample_index, np.memmap) and len(clone) == 500
    assert all(np.array_equal(gpt[i], clone[i]) for i in range(0, 500, 7))
