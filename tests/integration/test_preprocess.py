"""Preprocessing end to end: contents, worker independence, bad input, interruption, CLIs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_msg.data.indexed import IndexedDataset, IndexedDatasetError
from megatron_msg.data.preprocess import _pool_context
from megatron_msg.data.preprocess import main as preprocess_main
from megatron_msg.data.synthetic import synthetic_documents, write_synthetic_jsonl
from megatron_msg.data.tokenizer import build_tokenizer
from megatron_msg.data.train_tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
    return train_sentencepiece(
        texts=iter(list(synthetic_documents(300, seed=5))), model_prefix=prefix, vocab_size=320,
        minloglevel=2, num_threads=1,
    )  # fmt: skip


def _args(inp, out, model, *extra: str) -> list[str]:
    return ["--input", str(inp), "--output-prefix", str(out), "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", model, *extra]  # fmt: skip


def _read(prefix) -> IndexedDataset:
    return IndexedDataset(str(prefix))


def test_output_matches_tokenizer_and_is_independent_of_workers(tmp_path, sp_model, capsys):
    inp = tmp_path / "in.jsonl"
    write_synthetic_jsonl(inp, num_docs=400, seed=1, mean_words=60, keys=("text", "title"))
    for workers in ("1", "2"):
        argv = _args(inp, tmp_path / f"w{workers}", sp_model, "--json-keys", "text", "title",
                     "--append-eod", "--workers", workers, "--chunk-size-mb", "0.02")  # fmt: skip
        assert preprocess_main(argv) == 0
    # with another thread alive the pool is spawned instead of forked: same output
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert _pool_context().get_start_method() == "spawn"
        assert preprocess_main([*argv[:3], str(tmp_path / "spawned"), *argv[4:]]) == 0
    finally:
        release.set()
        other.join()
    err = capsys.readouterr().err
    assert "docs/s" in err and "MB/s" in err and "400 documents" in err
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    records = [json.loads(line) for line in inp.read_text().splitlines()]
    for key in ("text", "title"):
        one = tmp_path / f"w1_{key}_document"
        for other_run in ("w2", "spawned"):
            two = tmp_path / f"{other_run}_{key}_document"
            for ext in (".bin", ".idx"):
                assert Path(f"{one}{ext}").read_bytes() == Path(f"{two}{ext}").read_bytes()
        ds = _read(one)
        assert ds.dtype == np.uint16 and len(ds) == 400 == ds.num_documents
        for i in (0, 1, 137, 399):
            np.testing.assert_array_equal(ds[i], [*tok.tokenize(records[i][key]), tok.eod])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_null_tokenizer_and_sentence_lists(tmp_path):
    inp = tmp_path / "ids.jsonl"
    lines = [{"text": "3 4 5"}, {"text": [7, 8]}, {"text": ["1 2", "", "9"]}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")  # trailing blank line
    argv = ["--input", str(inp), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "10", "--append-eod"]  # fmt: skip
    assert preprocess_main(argv) == 0
    ds = _read(tmp_path / "o_text_document")
    assert [list(ds[i]) for i in range(len(ds))] == [[3, 4, 5, 10], [7, 8, 10], [1, 2], [9, 10]]
    assert list(ds.doc_idx) == [0, 1, 2, 4]


GOOD = {"text": "Stai lou pai tren."}
BAD_LINES = {
    "malformed_json": (b'{"text": "unterminated', "malformed JSON"),
    "missing_key": (b'{"body": "no text key"}', "missing key 'text'"),
    "empty_document": (b'{"text": ""}', "empty document for key 'text'"),
    "invalid_utf8": (b'{"text": "caf\xe9"}', "invalid UTF-8 (byte 0xe9"),
    "surrogate": (b'{"text": "a\\ud800b"}', "key 'text' holds a lone surrogate"),
    "bad_value": (b'{"text": 5}', "key 'text' must be a string or a list"),
}


def _corpus_with(path: Path, bad: bytes, at: int, total: int = 60) -> None:
    good = json.dumps(GOOD).encode()
    path.write_bytes(b"".join((bad if i == at else good) + b"\n" for i in range(1, total + 1)))


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_input_stops_with_file_and_line(tmp_path, sp_model, capsys, case):
    bad, message = BAD_LINES[case]
    inp = tmp_path / "in.jsonl"
    _corpus_with(inp, bad, at=37)
    assert preprocess_main(_args(inp, tmp_path / "out", sp_model)) == 1
    err = capsys.readouterr().err
    assert f"{inp}:37: {message}" in err and "--skip-invalid" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing else written


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_input_skipped_and_counted(tmp_path, sp_model, capsys, case):
    bad, message = BAD_LINES[case]
    inp = tmp_path / "in.jsonl"
    _corpus_with(inp, bad, at=37)
    assert preprocess_main(_args(inp, tmp_path / "out", sp_model, "--skip-invalid")) == 0
    err = capsys.readouterr().err
    category = "invalid_utf8" if case == "surrogate" else case
    assert f"skipped 1 invalid records ({category}=1)" in err
    assert f"{inp}:37: {message}" in err
    assert len(_read(tmp_path / "out_text_document")) == 59


def test_earliest_error_reported_with_parallel_workers(tmp_path, sp_model, capsys):
    inp = tmp_path / "in.jsonl"
    good = (json.dumps({"text": " ".join(synthetic_documents(1, seed=3))}) + "\n").encode()
    lines = [good] * 3000
    lines[2400] = b"{broken\n"
    lines[1800] = b'{"text": ""}\n'
    inp.write_bytes(b"".join(lines))
    argv = _args(inp, tmp_path / "out", sp_model, "--workers", "2", "--chunk-size-mb", "0.1")
    assert preprocess_main(argv) == 1
    assert f"{inp}:1801: empty document" in capsys.readouterr().err
    assert preprocess_main([*argv, "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 invalid records (malformed_json=1, empty_document=1)" in err
    assert f"{inp}:2401: malformed JSON" in err
    assert len(_read(tmp_path / "out_text_document")) == 2998


def _valid_pair(prefix: Path) -> bool:
    try:
        IndexedDataset(str(prefix))
    except IndexedDatasetError:
        return False
    return True


def test_sigkill_mid_run_leaves_no_valid_output(tmp_path, sp_model):
    inp = tmp_path / "big.jsonl"
    write_synthetic_jsonl(inp, num_docs=6000, seed=2, mean_words=100)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megatron_msg.cli", "preprocess",
           *_args(inp, out, sp_model, "--workers", "2", "--chunk-size-mb", "0.1")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.preprocess-*.tmp/*.idx")):  # a first shard is done
            assert proc.poll() is None, "preprocessing finished before it could be interrupted"
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-way
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not _valid_pair(tmp_path / "out_text_document")
    # the next run cleans up the dead run's temp dir and completes
    assert preprocess_main(_args(inp, out, sp_model, "--workers", "1")) == 0
    assert len(_read(tmp_path / "out_text_document")) == 6000
    assert not list(tmp_path.glob(".out.preprocess-*"))


def test_cli_and_tool_scripts(tmp_path, sp_model):
    inp = tmp_path / "in.jsonl"
    write_synthetic_jsonl(inp, num_docs=200, seed=4, mean_words=40)
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
         *_args(inp, tmp_path / "a", sp_model, "--append-eod")],
        env=ENV, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert preprocess_main(_args(inp, tmp_path / "b", sp_model, "--append-eod")) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a_text_document{ext}").read_bytes() == (
            tmp_path / f"b_text_document{ext}"
        ).read_bytes()
    run = subprocess.run(
        [sys.executable, "-m", "megatron_msg.cli", "merge-datasets", "--input",
         str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document"),
         "--output-prefix", str(tmp_path / "ab")],
        env=ENV, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(_read(tmp_path / "ab")) == 400


def test_train_tokenizer_tool(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_synthetic_jsonl(inp, num_docs=200, seed=6, mean_words=50)
    with open(inp, "ab") as f:
        f.write(b'{"text": 1}\n')
    tool = [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(inp),
            "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "250"]  # fmt: skip
    run = subprocess.run(tool, env=ENV, capture_output=True, text=True, check=False)
    assert run.returncode == 1 and f"{inp}:201: key 'text' must be a string" in run.stderr
    assert not (tmp_path / "tok.model").exists()
    run = subprocess.run(
        [*tool, "--skip-invalid"], env=ENV, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "tok.model"))
    assert tok.vocab_size == 250
    assert len((tmp_path / "tok.vocab").read_text().splitlines()) == 250
