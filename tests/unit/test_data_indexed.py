"""MMIDIDX v1 reader/writer: round trip, byte layout, corrupt files, Megatron-core interop."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_msg.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    best_dtype,
)
from megatron_msg.data.merge import find_prefixes, merge_datasets
from megatron_msg.data.merge import main as merge_main

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
         np.float32: 7, np.uint16: 8}  # fmt: skip


def _documents(rng: np.random.Generator, n: int, high: int) -> list[np.ndarray]:
    return [rng.integers(0, high, size=int(rng.integers(0, 40))) for _ in range(n)]


def _expected_idx(dtype: type, sequences: list[np.ndarray], doc_idx: list[int]) -> bytes:
    """The .idx bytes per DESIGN.md, built independently of the writer."""
    itemsize = np.dtype(dtype).itemsize
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", CODES[dtype])
    out += struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", len(s)) for s in sequences)
    pointer = 0
    for s in sequences:
        out += struct.pack("<q", pointer)
        pointer += len(s) * itemsize
    return out + b"".join(struct.pack("<q", d) for d in doc_idx)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_round_trip_and_exact_idx_bytes(tmp_path, dtype):
    rng = np.random.default_rng(1)
    docs = _documents(rng, 25, 250)
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, dtype=dtype) as w:
        for d in docs[:10]:
            w.add_document(d)
        w.add_documents(np.concatenate(docs[10:]), lengths=np.array([len(d) for d in docs[10:]]))
    raw = Path(prefix + ".idx").read_bytes()
    assert raw == _expected_idx(dtype, docs, list(range(len(docs) + 1)))
    assert Path(prefix + ".bin").read_bytes() == b"".join(d.astype(dtype).tobytes() for d in docs)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(docs) == ds.num_documents
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds.document(i), d)
    np.testing.assert_array_equal(ds.get(3, offset=1, length=2), docs[3][1:3])
    assert [len(s) for s in ds[2:5]] == [len(d) for d in docs[2:5]]


def test_multi_sequence_documents(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, dtype=np.int32) as w:
        w.add_document([1, 2, 3, 4, 5], lengths=[2, 3])
        w.add_item([6])
        w.add_item([7, 8])
        w.end_document()
        w.add_documents(np.arange(6), lengths=np.array([1, 2, 3]), sequences_per_document=[2, 1])
    ds = IndexedDataset(prefix)
    assert list(ds.doc_idx) == [0, 2, 4, 6, 7]
    assert list(ds.sizes) == [2, 3, 1, 2, 1, 2, 3]
    np.testing.assert_array_equal(ds.document(1), [6, 7, 8])
    np.testing.assert_array_equal(ds.document(2), [0, 1, 2])
    raw = Path(prefix + ".idx").read_bytes()
    seqs = [np.zeros(n) for n in [2, 3, 1, 2, 1, 2, 3]]
    assert raw == _expected_idx(np.int32, seqs, [0, 2, 4, 6, 7])


def test_best_dtype_and_range_checks(tmp_path):
    assert best_dtype(65499) == np.uint16 and best_dtype(65500) == np.int32
    with (
        IndexedDatasetWriter(str(tmp_path / "a"), dtype=np.uint16) as w,
        pytest.raises(ValueError, match="do not fit"),
    ):
        w.add_document([1, 70000])
    with pytest.raises(ValueError, match="no MMIDIDX code"):
        IndexedDatasetWriter(str(tmp_path / "b"), dtype=np.complex64)


def test_writer_exception_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(RuntimeError), IndexedDatasetWriter(prefix, dtype=np.int32) as w:
        w.add_document([1, 2, 3])
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_publish_interrupted_between_renames_leaves_no_valid_pair(tmp_path, monkeypatch):
    old = str(tmp_path / "ds")
    with IndexedDatasetWriter(old, dtype=np.int32) as w:
        w.add_document([1, 2, 3])
    new = IndexedDatasetWriter(str(tmp_path / "ds"), dtype=np.int32)
    new.add_document([9] * 50)
    real_replace, calls = os.replace, []

    def crash_on_idx(src, dst):
        calls.append(dst)
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt  # killed between the .bin and the .idx rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_idx)
    with pytest.raises(KeyboardInterrupt):
        new.finalize()
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.path.exists(old + ".bin") and not os.path.exists(old + ".idx")
    with pytest.raises(IndexedDatasetError, match="file not found"):
        IndexedDataset(old)


def _write_valid(tmp_path, name="ds"):
    prefix = str(tmp_path / name)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for n in (5, 0, 7, 3):
            w.add_document(np.arange(n))
    return prefix


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda p: _patch(p + ".idx", 0, b"XXIDIDX"), "bad magic"),
        (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), "unsupported version 2"),
        (lambda p: _patch(p + ".idx", 17, b"\x09"), "unknown dtype code 9"),
        (lambda p: os.truncate(p + ".idx", 20), "truncated index header"),
        (lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8), "truncated"),
        (lambda p: _patch(p + ".idx", 18, struct.pack("<Q", 10**12)), "implies"),
        (lambda p: os.truncate(p + ".bin", 20), r"data file is 20 bytes .* describes 30 bytes"),
        (lambda p: _patch(p + ".bin", 30, b"\0\0"), "data file is 32 bytes"),
        (
            lambda p: _patch(p + ".idx", 34 + 16 + 8 * 2, struct.pack("<q", 3)),
            "pointer of sequence 2",
        ),
        (lambda p: _patch(p + ".idx", 34, struct.pack("<i", -1)), "negative size"),
        (lambda p: _patch(p + ".idx", 34 + 16 + 32 + 8 * 4, struct.pack("<q", 3)), "end at N=4"),
        (lambda p: _patch(p + ".idx", 34 + 16 + 32 + 8 * 2, struct.pack("<q", 0)), "decreases"),
        (lambda p: os.unlink(p + ".bin"), "file not found"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path, corrupt, match):
    prefix = _write_valid(tmp_path)
    IndexedDataset(prefix)  # valid before corruption
    corrupt(prefix)
    with pytest.raises(IndexedDatasetError, match=match) as info:
        IndexedDataset(prefix)
    assert "ds." in str(info.value)  # names the file


def test_out_of_range_access(tmp_path):
    ds = IndexedDataset(_write_valid(tmp_path))
    with pytest.raises(IndexError, match="sequence index 9 out of range for 4"):
        ds[9]
    with pytest.raises(IndexError, match="outside sequence 0 of size 5"):
        ds.get(0, offset=3, length=5)


def test_merge_concatenates_and_checks_dtype(tmp_path):
    rng = np.random.default_rng(2)
    parts = []
    for i in range(3):
        prefix = str(tmp_path / "in" / f"part{i}")
        docs = _documents(rng, 4 + i, 100)
        with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
            for d in docs:
                w.add_document(d)
        parts.append(docs)
    merged = merge_datasets(
        inputs=find_prefixes(str(tmp_path / "in")), output_prefix=str(tmp_path / "m")
    )
    flat = [d for docs in parts for d in docs]
    assert len(merged) == len(flat)
    for i, d in enumerate(flat):
        np.testing.assert_array_equal(merged[i], d)
    assert Path(tmp_path / "m.idx").read_bytes() == _expected_idx(
        np.uint16, flat, list(range(len(flat) + 1))
    )
    assert (
        merge_main(["--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "m2")]) == 0
    )
    assert Path(tmp_path / "m2.bin").read_bytes() == Path(tmp_path / "m.bin").read_bytes()
    with IndexedDatasetWriter(str(tmp_path / "other"), dtype=np.int32) as w:
        w.add_document([1])
    with pytest.raises(IndexedDatasetError, match="different dtypes"):
        merge_datasets(
            inputs=[str(tmp_path / "m"), str(tmp_path / "other")], output_prefix=str(tmp_path / "x")
        )
    assert not os.path.exists(tmp_path / "x.bin")


def _megatron_indexed():
    try:
        from megatron.core.datasets import indexed_dataset
    except Exception as e:  # any import failure must fail the interop tests loudly
        pytest.fail(f"megatron-core is required for the interop tests but failed to import: {e!r}")
    return indexed_dataset


def test_megatron_core_writes_we_read(tmp_path):
    import torch

    mi = _megatron_indexed()
    rng = np.random.default_rng(3)
    docs = _documents(rng, 30, 60000)
    prefix = str(tmp_path / "mc")
    builder = mi.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs[:20]:
        builder.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    builder.add_item(torch.from_numpy(docs[20].astype(np.int64)))
    builder.add_item(torch.from_numpy(docs[21].astype(np.int64)))
    builder.end_document()
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    assert ours.dtype == np.uint16 and len(ours) == 22 and ours.num_documents == 21
    for i in range(22):
        np.testing.assert_array_equal(ours[i], docs[i])
    np.testing.assert_array_equal(ours.document(20), np.concatenate(docs[20:22]))


def test_we_write_megatron_core_reads(tmp_path):
    mi = _megatron_indexed()
    rng = np.random.default_rng(4)
    docs = _documents(rng, 30, 100000)
    prefix = str(tmp_path / "ours")
    with IndexedDatasetWriter(prefix, dtype=np.int32) as w:
        for d in docs[:25]:
            w.add_document(d)
        w.add_document(np.concatenate(docs[25:]), lengths=[len(d) for d in docs[25:]])
    theirs = mi.IndexedDataset(prefix)
    assert len(theirs) == 30 and theirs.index.dtype == np.int32
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], d)
    np.testing.assert_array_equal(theirs.document_indices, [*range(26), 30])
    # and Megatron's own builder produces byte-identical files from the same data
    builder = mi.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.int32)
    for d in docs[:25]:
        builder.add_document(d, [len(d)])
    builder.add_document(np.concatenate(docs[25:]), [len(d) for d in docs[25:]])
    builder.finalize(str(tmp_path / "mc.idx"))
    for ext in (".bin", ".idx"):
        assert Path(prefix + ext).read_bytes() == Path(str(tmp_path / "mc") + ext).read_bytes()
