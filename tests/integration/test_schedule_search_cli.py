"""`megatron-msg schedule-search` end to end on synthetic data: every candidate shape is
probed with the real trainer, the outputs are a valid run config whose stages end at
the target, a second search reuses the finished probes, and bad input is a one-line
error before any training. One subprocess per search (the trainer initialises
torch.distributed); ~30 s on 2 cores."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_msg.training.config import load_config

START = {"vocab_size": 64, "hidden_size": 32, "ffn_hidden_size": 64, "num_heads": 2,
         "head_dim": 16, "num_layers": 1, "max_seq_len": 16}  # fmt: skip
TARGET = "48,96,2,2"  # width and depth grow: 4 candidate shapes


def _config(tmp: Path) -> Path:
    values = {
        "model": START,
        "optimizer": {"lr": 3e-3},
        "lr": {"warmup_steps": 2},
        "batch": {"micro_batch_size": 4, "global_batch_size": 4},
        "data": {"source": "synthetic", "seq_len": 16},
        "growth": [{"start_step": 5, "num_layers": 2}],  # replaced by the search
        "logging": {"interval": 2},
        "train": {"steps": 40, "run_dir": str(tmp / "run")},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _search(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "megatron_msg.cli", "schedule-search", "--config",
           str(_config(tmp)), "--target", TARGET, "--probe-steps", "8", "--eval-interval", "2",
           "--eval-batches", "2", "--out", str(tmp / "search"), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_search_probes_every_shape_and_writes_a_runnable_schedule(tmp_path):
    first = _search(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "4 shapes, 3 growth paths, 8 probe steps each" in first.stdout
    out = tmp_path / "search"
    probes = sorted(p.name for p in (out / "probes").iterdir())
    assert probes == ["32x64x2x1", "32x64x2x2", "48x96x2x1", "48x96x2x2"]
    for name in probes:
        curve = [
            json.loads(x) for x in (out / "probes" / name / "curve.jsonl").read_text().splitlines()
        ]
        assert [p["step"] for p in curve] == [0, 2, 4, 6, 8]
        assert curve[-1]["loss"] < curve[0]["loss"]  # it learned
        assert all(
            b["wall"] > a["wall"] and b["cpu"] > a["cpu"] for a, b in itertools.pairwise(curve)
        )
    record = json.loads((out / "search.json").read_text())
    result = record["result"]
    assert record["clock"] == "wall" and len(record["curves"]) == 4
    assert result["legs"][0]["shape"] == [32, 64, 2, 1]
    assert result["legs"][-1]["shape"] == [48, 96, 2, 2]
    # The written config is a valid run config whose stages end at the target shape.
    config = load_config(out / "config.yaml")
    config.resolve(world_size=1)  # valid: growths a ramp apart, within the budget
    shapes = [(m.hidden_size, m.ffn_hidden_size, m.num_heads, m.num_layers)
              for m in config.stage_models()]  # fmt: skip
    assert shapes[0] == (32, 64, 2, 1) and shapes[-1] == (48, 96, 2, 2)
    steps = [g.start_step for g in config.growth]
    assert steps == result["growth_steps"] and steps == sorted(set(steps))
    assert all(1 <= s <= 30 for s in steps)  # max_growth_fraction 0.75 of 40 steps
    assert all(g.ramp_steps == 1 for g in config.growth)  # 40 // 40
    schedule = yaml.safe_load((out / "schedule.yaml").read_text())
    assert schedule["model"] == {k: START[k] for k in ("hidden_size", "ffn_hidden_size",
                                                     "num_heads", "num_layers")}  # fmt: skip
    assert [g["start_step"] for g in schedule["growth"]] == steps
    assert "chosen path to loss" in first.stdout and "predicted" in first.stdout

    # Searching again with the same settings reuses every finished probe.
    before = {p: (out / "probes" / p / "done.json").stat().st_mtime_ns for p in probes}
    again = _search(tmp_path, "--clock", "cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: (out / "probes" / p / "done.json").stat().st_mtime_ns for p in probes} == before
    assert json.loads((out / "search.json").read_text())["clock"] == "cpu"


def test_branch_search_grows_for_real_and_writes_a_runnable_schedule(tmp_path):
    """``--method branch``: the stay run and one grown run per branch point and candidate
    train with the real trainer, round by round, until the schedule reaches the target."""
    proc = _search(tmp_path, "--method", "branch", "--branch-points", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "horizon 8 steps, 2 branch points, window 6 steps" in proc.stdout
    out = tmp_path / "search"
    record = json.loads((out / "search.json").read_text())
    result = record["result"]
    assert result["method"] == "branch" and result["start"] == [32, 64, 2, 1]
    first = result["choices"][0]
    # round 1: 2 branch points (steps 4 and 8) x the 3 shapes above the start
    assert sorted((o["step"], tuple(o["shape"])) for o in first["outcomes"]) == [
        (step, shape) for step in (4, 8)
        for shape in ((32, 64, 2, 2), (48, 96, 2, 1), (48, 96, 2, 2))
    ]  # fmt: skip
    assert all(o["rate"] is not None and o["stay_rate"] is not None for o in first["outcomes"])
    rounds = sorted(p.name for p in (out / "branches").iterdir())
    assert rounds == [f"round{i + 1}" for i in range(len(result["choices"]))]

    # Each grown run really grew at its branch point: its curve has the point there and the
    # stay run's loss at that step (growth preserves the function).
    def curve(name: str) -> list[dict]:
        return [json.loads(x) for x in (out / "branches/round1" / name / "curve.jsonl").open()]

    stay, grown = curve("stay"), curve("4_48x96x2x2")
    assert [p["step"] for p in grown] == [0, 2, 4, 6, 8, 10]
    assert grown[2]["loss"] == pytest.approx(stay[2]["loss"], rel=1e-5)
    assert grown[-1]["loss"] != pytest.approx(stay[5]["loss"], rel=1e-6)  # it trained grown
    config = load_config(out / "config.yaml")
    config.resolve(world_size=1)
    shapes = [(m.hidden_size, m.ffn_hidden_size, m.num_heads, m.num_layers)
              for m in config.stage_models()]  # fmt: skip
    assert shapes[0] == (32, 64, 2, 1) and shapes[-1] == (48, 96, 2, 2)
    assert [g.start_step for g in config.growth] == result["growth_steps"]
    assert "round 1, from (32, 64, 2, 1)" in proc.stdout


def test_bad_input_is_one_line_error_before_training(tmp_path):
    for extra, message in [
        (["--target", "16,96,2,2"], "at least the start"),
        (["--target", "48,96"], "four positive integers"),
        (["--probe-steps", "100"], "exceeds the run's train.steps"),
        (["optimizer.lr=-1"], "optimizer.lr"),  # a config error, named
        (["--max-growth-fraction", "0"], "max-growth-fraction"),
        (["--method", "branch", "--branch-points", "0"], "--branch-points must be >= 1"),
        (["--method", "branch", "--window", "40"], "--window (40) must be shorter"),
    ]:
        result = _search(tmp_path, *extra)
        assert result.returncode == 1, (extra, result.stdout[-2000:], result.stderr[-2000:])
        assert result.stderr.startswith("megatron-msg schedule-search:"), result.stderr[-2000:]
        assert message in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "search" / "probes").exists()  # nothing trained
