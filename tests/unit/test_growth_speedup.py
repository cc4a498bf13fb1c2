"""benchmarks/growth_speedup.py: the speed-up arithmetic on curves with known answers, the
three arms' configs, and the trainer's ``ramp_steps: 0`` ("No Mask") option in validation."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from megatron_msg.config import ConfigError
from megatron_msg.training.config import TrainConfig

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "growth_speedup.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("growth_speedup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_time_to_reach_interpolates_the_first_crossing(bench):
    xs, ys = [0.0, 10.0, 20.0, 30.0], [8.0, 6.0, 4.0, 5.0]
    assert bench.time_to_reach(xs, ys, 5.0) == pytest.approx(15.0)  # halfway from 6 to 4
    assert bench.time_to_reach(xs, ys, 6.0) == pytest.approx(10.0)
    assert bench.time_to_reach(xs, ys, 9.0) == 0.0  # already there at the start
    assert bench.time_to_reach(xs, ys, 3.9) is None  # never reached
    with pytest.raises(ValueError, match="3 and 2 points"):
        bench.time_to_reach([0.0, 1.0, 2.0], [1.0, 0.5], 0.7)


def test_value_at_and_its_range_check(bench):
    xs, ys = [0.0, 2.0, 4.0], [6.0, 4.0, 3.0]
    assert bench.value_at(xs, ys, 1.0) == pytest.approx(5.0)
    assert bench.value_at(xs, ys, 3.0) == pytest.approx(3.5)
    assert bench.value_at(xs, ys, 4.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"x=5.0 outside"):
        bench.value_at(xs, ys, 5.0)


def test_speedup_on_synthetic_curves(bench):
    # Scratch: loss 10 - t/10 over 100 s, final 0.0 reached at t=100.
    scratch = ([float(t) for t in range(0, 101, 10)], [10.0 - t / 10 for t in range(0, 101, 10)])
    # Twice as fast: loss 10 - t/5, reaches 0 at t=50 -> 2x.
    fast = ([float(t) for t in range(0, 61, 20)], [10.0 - t / 5 for t in range(0, 61, 20)])
    assert bench.speedup(scratch, fast) == pytest.approx(2.0)
    # Reaches 0 between t=60 (loss 1) and t=80 (loss -1): at t=70 -> 100/70.
    slow = ([0.0, 60.0, 80.0], [10.0, 1.0, -1.0])
    assert bench.speedup(scratch, slow) == pytest.approx(100 / 70)
    assert bench.speedup(scratch, ([0.0, 200.0], [10.0, 0.5])) is None  # never reached
    # Scratch's target is its *final* loss even when it dipped lower earlier.
    bumpy = ([0.0, 10.0, 20.0], [4.0, 1.0, 2.0])
    assert bench.speedup(bumpy, ([0.0, 4.0], [4.0, 2.0])) == pytest.approx(20 / 3 / 4)


def test_spread_reports_mean_sd_and_misses(bench):
    text = bench._spread([1.0, 2.0, None])
    assert text.startswith("1.50x ± 0.71") and "not reached in 1 of 3" in text
    assert bench._spread([None]) == "not reached"


def test_arms_share_data_optimizer_and_schedule_and_end_in_the_target(bench, tmp_path):
    preset = bench.PRESETS["small"]
    configs = {
        arm: TrainConfig.from_dict(
            bench.run_config(preset, arm=arm, seed=7, data_prefix="data/x", run_dir=tmp_path / arm)
        )
        for arm in bench.ARMS
    }
    shape = ("hidden_size", "ffn_hidden_size", "num_heads", "num_layers")
    for arm, config in configs.items():
        config.resolve(world_size=1)  # every arm is a valid trainer config
        final = config.stage_models()[-1]
        assert tuple(getattr(final, k) for k in shape) == preset.target, arm
        assert config.train.seed == 7 and config.train.steps == preset.steps
        for section in ("data", "optimizer", "lr", "batch"):
            assert getattr(config, section) == getattr(configs["scratch"], section), section
    msg = configs["msg"].stage_models()
    grown = {k for a, b in itertools.pairwise(msg) for k in shape if getattr(b, k) > getattr(a, k)}
    assert grown == set(shape)  # every dimension grows at least once
    assert all(s.ramp_steps >= 1 for s in configs["msg"].growth)
    assert [s.ramp_steps for s in configs["nomask"].growth] == [0, 0, 0]
    assert [s.start_step for s in configs["nomask"].growth] == [
        s.start_step for s in configs["msg"].growth
    ]
    # Net2Net: No Mask's stages with the copy operator; the others keep MSG's operator.
    assert configs["net2net"].stage_models() == configs["nomask"].stage_models()
    assert [(s.operator, s.ramp_steps) for s in configs["net2net"].growth] == [("net2net", 0)] * 3
    assert {s.operator for a in ("msg", "nomask") for s in configs[a].growth} == {"msg"}


def test_cumulative_flops_counts_each_steps_own_model(bench, tmp_path):
    from megatron_msg.training.metrics import training_flops_per_token

    preset = bench.PRESETS["tiny"]
    values = bench.run_config(preset, arm="msg", seed=1, data_prefix="x", run_dir=tmp_path)
    config = TrainConfig.from_dict(values)
    tokens = preset.batch * preset.seq_len
    per = [training_flops_per_token(m, seq_len=preset.seq_len) for m in config.stage_models()]
    first = config.growth[0].start_step
    assert bench.cumulative_flops(config, steps=first) == pytest.approx(first * tokens * per[0])
    assert bench.cumulative_flops(config, steps=first + 1) == pytest.approx(
        first * tokens * per[0] + tokens * per[1]
    )
    assert per[0] < per[1] < per[2] < per[3]
    assert math.isclose(bench.cumulative_flops(config, steps=0), 0.0)


def test_ramp_steps_zero_is_valid_and_negative_is_not(bench, tmp_path):
    values = bench.run_config(
        bench.PRESETS["tiny"], arm="nomask", seed=1, data_prefix="x", run_dir=tmp_path
    )
    TrainConfig.from_dict(values).resolve(world_size=1)
    values["growth"][1]["ramp_steps"] = -1
    with pytest.raises(ConfigError, match=r"growth\.1\.ramp_steps must be >= 0, got -1"):
        TrainConfig.from_dict(values).resolve(world_size=1)


def test_a_searched_schedule_replaces_the_built_in_one(bench, tmp_path):
    preset = bench.PRESETS["small"]
    searched = {
        "model": {"hidden_size": 128, "ffn_hidden_size": 512, "num_heads": 2, "num_layers": 4},
        "growth": [{"start_step": 50, "ramp_steps": 30, "hidden_size": 128,
                    "ffn_hidden_size": 512, "num_heads": 4, "num_layers": 4}],
    }  # fmt: skip
    for arm, ramp in (("msg", 30), ("nomask", 0)):
        values = bench.run_config(preset, arm=arm, seed=1, data_prefix="x", run_dir=tmp_path,
                                  searched=searched)  # fmt: skip
        assert values["model"]["num_heads"] == 2 and values["model"]["hidden_size"] == 128
        assert [(g["start_step"], g["ramp_steps"]) for g in values["growth"]] == [(50, ramp)]
        TrainConfig.from_dict(values).resolve(world_size=1)
    scratch = bench.run_config(preset, arm="scratch", seed=1, data_prefix="x", run_dir=tmp_path,
                               searched=searched)  # fmt: skip
    assert scratch == bench.run_config(preset, arm="scratch", seed=1, data_prefix="x",
                                       run_dir=tmp_path)  # fmt: skip
    text = bench.describe_schedule(
        bench.run_config(preset, arm="msg", seed=1, data_prefix="x", run_dir=tmp_path,
                         searched=searched), True)  # fmt: skip
    assert text == ("MSG schedule (found by `megatron-msg schedule-search`, ramp 30 steps): "
                    "(128, 512, 2, 4), then (128, 512, 4, 4) at step 50.")  # fmt: skip
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(searched))
    assert bench._read_schedule(path, preset) == searched
    with pytest.raises(ValueError, match=r"ends at \(128, 512, 4, 4\), not the target"):
        bench._read_schedule(path, bench.PRESETS["full"])


def test_finished_runs_are_kept_or_copied_only_with_an_identical_config(bench, tmp_path):
    preset = bench.PRESETS["tiny"]
    values = bench.run_config(preset, arm="scratch", seed=1, data_prefix="x",
                              run_dir=tmp_path / "a" / "scratch_seed1")  # fmt: skip
    source = tmp_path / "a" / "scratch_seed1"
    source.mkdir(parents=True)
    (source / "eval.jsonl").write_text("{}\n")
    bench._write_json_atomic(bench._spec_path(source), values)
    assert not bench._finished_with(source, values)  # no done.json yet
    (source / "done.json").write_text("{}")
    assert bench._finished_with(source, values)
    target = tmp_path / "b" / "scratch_seed1"
    target.parent.mkdir()
    moved = dict(values, train=dict(values["train"], run_dir=str(target)))
    other_lr = json.loads(json.dumps(moved))
    other_lr["optimizer"]["lr"] = 1.0
    assert not bench._copy_finished(source, target, other_lr) and not target.exists()
    assert bench._copy_finished(source, target, moved)
    assert (target / "eval.jsonl").read_text() == "{}\n" and bench._finished_with(target, moved)
