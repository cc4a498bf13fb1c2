"""`megatron-msg demo` end to end in miniature: stdlib corpus -> SentencePiece -> indexed
dataset -> the real trainer through three growths (all four dimensions) -> table and plot.

One subprocess (the trainer initialises torch.distributed, which must not leak into
the pytest process); a small corpus, vocabulary and step count keep it to ~30 s.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_msg import demo
from megatron_msg.demo_corpus import build_corpus, prepare_data, stdlib_sources

MINI = [
    "--steps-per-stage", "6", "--seq-len", "32", "--batch", "4",
    "--vocab-size", "512", "--corpus-mb", "0.2", "--workers", "2",
]  # fmt: skip
ROW = re.compile(
    r"^\s+(\d)\s+\((\d+), (\d+), (\d+), (\d+)\)\s+([\d,]+)\s+(\d+)\s+(\S+)\s+(\S+)\s+"
    r"([\d.]+)\s+([\d.]+)\s+(\d+)$",
    flags=re.MULTILINE,
)


def _run_demo(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "megatron_msg.cli", "demo", "--out", str(out), *MINI],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_demo_grows_through_all_dimensions_preserving_the_loss(tmp_path):
    proc = _run_demo(tmp_path / "demo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = ROW.findall(proc.stdout)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], proc.stdout[-3000:]
    shapes = [tuple(int(x) for x in r[1:5]) for r in rows]
    grown = [{i for i in range(4) if b[i] > a[i]} for a, b in itertools.pairwise(shapes)]
    assert set().union(*grown) == {0, 1, 2, 3}  # hidden, ffn, heads, layers all grew
    params = [int(r[5].replace(",", "")) for r in rows]
    assert params == sorted(params) and len(set(params)) == 4
    for row in rows[1:]:
        before, after = float(row[7]), float(row[8])
        assert abs(after - before) <= 1e-5 * before, row  # growth preserved the probe loss
    assert float(rows[-1][10]) < float(rows[0][9]) - 0.3  # the loss fell
    assert all(int(r[11]) > 0 for r in rows)  # tokens/s
    assert "growth preserved the loss" in proc.stdout
    run = tmp_path / "demo" / "run"
    assert (run / "loss.png").stat().st_size > 1000
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    growths = [e for e in events if e["kind"] == "growth"]
    assert [g["step"] for g in growths] == [6, 12, 18]
    for g in growths:  # the JSONL holds the unrounded values
        assert abs(g["loss_after"] - g["loss_before"]) <= 1e-5 * g["loss_before"], g
    assert (tmp_path / "demo" / "data" / "spm512.model").exists()
    assert "reusing" not in proc.stdout


def test_corpus_is_deterministic_and_skips_tests(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    docs, nbytes = build_corpus(first, max_bytes=50_000)
    assert docs >= 1 and nbytes >= 50_000
    build_corpus(second, max_bytes=50_000)
    assert first.read_bytes() == second.read_bytes()
    texts = [json.loads(line)["text"] for line in first.read_text().splitlines()]
    assert all(t.strip() for t in texts)
    assert not any({"test", "site-packages"} & set(p.parts) for p in stdlib_sources())


def test_prepared_data_is_reused(tmp_path, capsys):
    first = prepare_data(tmp_path, max_bytes=20_000, vocab_size=384, workers=1)
    assert "reusing" not in capsys.readouterr().out
    built = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    second = prepare_data(tmp_path, max_bytes=20_000, vocab_size=384, workers=1)
    assert "reusing" in capsys.readouterr().out
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()} == built
    assert Path(f"{first.prefix}.bin").stat().st_size > 0 and first.tokenizer_model.exists()


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--steps-per-stage", "1"])
    assert info.value.code == 2
    assert "steps_per_stage" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_bytes"):
        build_corpus(Path("/nonexistent/x.jsonl"), max_bytes=10)


def test_a_shuffled_corpus_samples_the_whole_library_reproducibly(tmp_path):
    paths = {name: tmp_path / f"{name}.jsonl" for name in ("sorted", "a", "b", "other")}
    build_corpus(paths["sorted"], max_bytes=200_000)
    build_corpus(paths["a"], max_bytes=200_000, shuffle_seed=1)
    build_corpus(paths["b"], max_bytes=200_000, shuffle_seed=1)
    build_corpus(paths["other"], max_bytes=200_000, shuffle_seed=2)
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    texts = {
        k: [json.loads(x)["text"] for x in p.read_text().splitlines()] for k, p in paths.items()
    }
    assert texts["a"] != texts["other"]
    # the sorted corpus is the alphabetically first modules; a shuffled one is not
    assert texts["a"][:3] != texts["sorted"][:3]
    everything = {p.read_text(encoding="utf-8") for p in stdlib_sources()
                  if p.stat().st_size <= 200_000}  # fmt: skip
    assert set(texts["a"]) <= everything
