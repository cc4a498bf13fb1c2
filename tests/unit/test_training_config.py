"""Training config: YAML + overrides, derived sizes, and one error naming the values."""

from __future__ import annotations

import pytest
import yaml

from megatron_msg.config import ConfigError
from megatron_msg.training.config import load_config, write_resolved

BASE = [
    "model.vocab_size=100",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_heads=2",
    "model.head_dim=32",
    "model.num_layers=2",
    "model.max_seq_len=64",
    "data.source=synthetic",
    "data.seq_len=32",
    "train.steps=50",
]


def _resolve(*extra: str, world_size: int = 1):
    return load_config(None, [*BASE, *extra]).resolve(world_size=world_size)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "vocab_size": 100,
                    "hidden_size": 64,
                    "ffn_hidden_size": 128,
                    "num_heads": 2,
                    "num_layers": 2,
                },
                "optimizer": {"lr": 1.0e-3, "betas": [0.9, 0.99]},
                "data": {"source": "synthetic"},
                "growth": [{"start_step": 10, "hidden_size": 96, "ramp_steps": 5}],
            }
        )
    )
    config = load_config(
        path,
        [
            "optimizer.lr=3e-4",
            "growth.0.num_layers=4",
            "growth.1.start_step=30",
            "growth.1.num_heads=4",
        ],
    )
    assert config.optimizer.lr == pytest.approx(3e-4)  # YAML reads "3e-4" as a string
    assert config.optimizer.betas == (0.9, 0.99)
    assert [s.start_step for s in config.growth] == [10, 30]
    models = config.stage_models()
    assert [(m.hidden_size, m.num_heads, m.num_layers) for m in models] == [
        (64, 2, 2),
        (96, 2, 4),
        (96, 4, 4),
    ]
    assert config.stage_at(9) == 0 and config.stage_at(10) == 1 and config.stage_at(31) == 2


def test_derived_batch_and_dp():
    config = _resolve("batch.micro_batch_size=2", "batch.global_batch_size=16", world_size=4)
    assert (config.parallel.dp, config.batch.grad_accum, config.batch.global_batch_size) == (
        4,
        2,
        16,
    )
    config = _resolve(
        "batch.micro_batch_size=3", "batch.grad_accum=2", "parallel.tp=2", world_size=2
    )
    assert (config.parallel.dp, config.batch.global_batch_size) == (1, 6)
    assert config.lr.decay_steps == 50


@pytest.mark.parametrize(
    ("overrides", "world", "fragments"),
    [
        (
            ["parallel.tp=2", "parallel.dp=2"],
            2,
            ["parallel.tp (2)", "parallel.dp (2)", "world size (2)"],
        ),
        (
            ["parallel.tp=4", "model.num_heads=2", "model.ffn_hidden_size=128"],
            4,
            ["num_heads (2)", "tensor parallel size (4)"],
        ),
        (
            ["batch.micro_batch_size=2", "batch.global_batch_size=7"],
            2,
            ["global_batch_size (7)", "micro_batch_size (2)", "dp (2)"],
        ),
        (
            ["batch.micro_batch_size=2", "batch.grad_accum=2", "batch.global_batch_size=6"],
            1,
            ["global_batch_size (6)", "grad_accum (2)"],
        ),
        (
            ["growth.0.start_step=10", "growth.0.hidden_size=32"],
            1,
            ["growth.0", "hidden_size 64 -> 32"],
        ),
        (
            [
                "growth.0.start_step=10",
                "growth.0.hidden_size=96",
                "growth.0.ramp_steps=10",
                "growth.1.start_step=15",
                "growth.1.num_layers=4",
            ],
            1,
            ["growth.1.start_step (15)", "(start + ramp_steps = 20)"],
        ),
        (
            ["growth.0.start_step=0", "growth.0.num_layers=4"],
            1,
            ["growth.0.start_step (0)", "must be after the previous stage"],
        ),
        (["growth.0.start_step=5", "growth.0.num_layers=2"], 1, ["does not grow anything"]),
        (
            ["growth.0.start_step=5", "growth.0.num_layers=3", "growth.0.moment_policy=magic"],
            1,
            ["growth.0.moment_policy", "'magic'"],
        ),
        (
            ["growth.0.start_step=5", "growth.0.num_layers=3", "growth.0.operator=net2net"],
            1,
            ["growth.0.ramp_steps must be 0 with operator net2net", "got 100"],
        ),
        (
            ["growth.0.start_step=5", "growth.0.num_layers=3", "growth.0.operator=copy"],
            1,
            ["growth.0.operator must be one of ('msg', 'net2net')", "'copy'"],
        ),
        (["train.dtype=bf16"], 1, ["bf16", "zero_stage"]),
        (["data.seq_len=128"], 1, ["data.seq_len (128)", "max_seq_len (64)"]),
        (["lr.min_lr=1.0", "optimizer.lr=0.1"], 1, ["lr.min_lr (1.0)", "optimizer.lr (0.1)"]),
    ],
)
def test_validation_names_values(overrides, world, fragments):
    with pytest.raises(ConfigError) as info:
        _resolve(*overrides, world_size=world)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_all_problems_in_one_error():
    with pytest.raises(ConfigError) as info:
        _resolve("parallel.tp=2", "optimizer.lr=-1", "train.steps=0", world_size=1)
    text = str(info.value)
    assert "world size (1)" in text and "optimizer.lr must be > 0" in text and "train.steps" in text


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optimizer.lrr=1", "optimizer.lrr"),
        ("model.hiden_size=3", "hiden_size"),
        ("bogus=1", "bogus"),
        ("growth.0.statr_step=3", "growth.0.statr_step"),
        ("optimizer.lr=abc", "optimizer.lr must be of type float"),
        ("parallel.tp=1.5", "parallel.tp must be of type int"),
        ("growth.3.start_step=1", "index 3 is past the end"),
        ("noequals", "key=value"),
    ],
)
def test_bad_keys_are_named(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, override])
    assert fragment in str(info.value)


def test_resolved_config_round_trips(tmp_path):
    config = _resolve(
        "growth.0.start_step=10", "growth.0.num_layers=4", "optimizer.betas=[0.8, 0.9]"
    )
    path = write_resolved(config, tmp_path / "run")
    again = load_config(path).resolve(world_size=1)
    assert again == config
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_resume_rejects_a_changed_schedule_or_batch():
    from megatron_msg.training.checkpoint import RunState
    from megatron_msg.training.loop import _check_resumable

    saved = _resolve("growth.0.start_step=10", "growth.0.num_layers=4", "batch.micro_batch_size=2")
    run = RunState(step=12, stage=1, consumed_samples=24, lr={}, ramp=None, config=saved.to_dict())
    _check_resumable(saved, run, "step_00000012")
    changed = _resolve(
        "growth.0.start_step=10", "growth.0.num_layers=3", "batch.micro_batch_size=2"
    )
    with pytest.raises(
        ConfigError, match=r"\(64, 128, 2, 4\) but this config's stage 1 is \(64, 128, 2, 3\)"
    ):
        _check_resumable(changed, run, "step_00000012")
    rebatched = _resolve(
        "growth.0.start_step=10", "growth.0.num_layers=4", "batch.micro_batch_size=4"
    )
    with pytest.raises(
        ConfigError, match=r"consumed 24 samples in 12 steps.*global_batch_size \(4\)"
    ):
        _check_resumable(rebatched, run, "step_00000012")
    shrunk = _resolve("batch.micro_batch_size=2")
    with pytest.raises(ConfigError, match="growth stage 1 but the config has only 0"):
        _check_resumable(shrunk, run, "step_00000012")


def test_missing_or_malformed_config_file_is_a_config_error(tmp_path):
    """A bad config file is reported by name, never as a traceback from yaml or open()."""
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"cannot read config file .*absent\.yaml"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(listing)
