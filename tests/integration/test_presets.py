"""Shipped schedule presets: every example YAML loads and validates; the MSG paper's
Appendix-J schedule is what the paper says; its CPU version actually trains and grows."""

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

ROOT = Path(__file__).resolve().parents[2]
TRAIN_YAMLS = sorted(
    p
    for p in (ROOT / "examples").rglob("*.yaml")
    if "model" in (yaml.safe_load(p.read_text()) or {})
)
APPENDIX_J = [(512, 768, 8, 12), (768, 768, 8, 12), (768, 768, 12, 12), (768, 3072, 12, 12)]
SHAPE = ("hidden_size", "ffn_hidden_size", "num_heads", "num_layers")


def _shapes(config) -> list[tuple[int, ...]]:
    return [tuple(getattr(m, k) for k in SHAPE) for m in config.stage_models()]


def test_presets_are_found():
    names = {p.name for p in TRAIN_YAMLS}
    assert {"appendix_j_inrun.yaml", "appendix_j_cpu.yaml", "train_synthetic.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_validates(path):
    config = load_config(path)
    p = config.parallel
    world = p.tp * p.pp * max(p.dp, 1)
    resolved = config.resolve(world_size=world)  # raises ConfigError naming the values
    shapes = _shapes(resolved)
    for small, big in itertools.pairwise(shapes):
        assert all(b >= s for s, b in zip(small, big, strict=True)) and big != small, path


def test_appendix_j_presets_follow_the_paper():
    inrun = load_config(ROOT / "examples/gpt2_msg/appendix_j_inrun.yaml")
    assert _shapes(inrun) == APPENDIX_J
    offline = [load_config(ROOT / f"examples/gpt2_msg/stage{i}.yaml") for i in range(1, 5)]
    assert [_shapes(c)[0] for c in offline] == APPENDIX_J
    cpu = _shapes(load_config(ROOT / "examples/gpt2_msg/appendix_j_cpu.yaml"))
    grew = [[k for k in range(4) if b[k] != a[k]] for a, b in itertools.pairwise(cpu)]
    paper = [[k for k in range(4) if b[k] != a[k]] for a, b in itertools.pairwise(APPENDIX_J)]
    assert grew == paper  # the same dimension grows at each step of the scaled-down schedule


def test_appendix_j_cpu_preset_trains_through_its_growths(tmp_path):
    """The CPU preset as shipped, with the schedule compressed to 12 steps."""
    run_dir = tmp_path / "run"
    overrides = [
        "train.steps=12", "growth.0.start_step=3", "growth.1.start_step=6",
        "growth.2.start_step=9", "growth.0.ramp_steps=2", "growth.1.ramp_steps=2",
        "growth.2.ramp_steps=2", "logging.interval=1", "logging.progress_bar=false",
        "lr.warmup_steps=2", "lr.rewarmup_steps=1", f"train.run_dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_msg.train", "--config",
         str(ROOT / "examples/gpt2_msg/appendix_j_cpu.yaml"), *overrides],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    growths = [r for r in records if r["kind"] == "growth"]
    assert [g["shape"] for g in growths] == [[96, 96, 2, 4], [96, 96, 3, 4], [96, 384, 3, 4]]
    for g in growths:
        assert abs(g["loss_after"] - g["loss_before"]) <= 1e-5 * g["loss_before"], g
    assert max(r["step"] for r in records if r["kind"] == "step") == 12
