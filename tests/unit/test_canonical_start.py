"""``checkpoint.load`` checks: a canonical store that does not fit the run's config is refused
before any engine exists, with the offending values named; the store is never modified."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_msg.checkpoint.canonical import (
    CanonicalCheckpointError,
    CanonicalMeta,
    save_canonical,
)
from megatron_msg.checkpoint.resume import open_canonical_start
from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model import GPTModel
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.training.config import TrainConfig, load_config
from tests.distributed.test_reshard_resume import tree_digest

MODEL = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    ffn_hidden_size=64,
    num_heads=2,
    head_dim=16,
    num_layers=2,
    max_seq_len=16,
)
BASE = [f"model.{k}={v}" for k, v in MODEL.to_dict().items() if v is not None] + [
    "data.source=synthetic",
    "data.seq_len=16",
    "batch.micro_batch_size=2",
    "batch.global_batch_size=8",
    "train.steps=10",
]


def _config(*extra: str, world_size: int = 1) -> TrainConfig:
    return load_config(None, [*BASE, *extra]).resolve(world_size=world_size)


def _store(path: Path, *, step: int = 4, adam_step: dict[str, int] | None = None, **data) -> Path:
    weights = GPTModel(MODEL, groups=ProcessGroups.single(), init_seed=1).to_canonical()
    moments = {n: torch.full_like(t, 0.5) for n, t in weights.items()}
    meta = CanonicalMeta(
        model=MODEL,
        step=step,
        adam_step=adam_step or {},
        data={"consumed_samples": step * 8, "seq_len": 16, **data},
        lr={"anchor_step": 0, "anchor_lr": 0.0, "anchor_warmup": 0, "rewinds": []},
    )
    return save_canonical(path, weights=weights, exp_avg=moments, exp_avg_sq=moments, meta=meta)


def test_a_matching_store_opens_with_its_position(tmp_path: Path) -> None:
    store = _store(tmp_path / "c")
    before = tree_digest(store)
    start = open_canonical_start(store, _config())
    try:
        assert (start.stage, start.step, start.ramp) == (0, 4, None)
        assert set(start.adam_steps.values()) == {4}
        assert start.counters["tokens"] == 4 * 8 * 16
    finally:
        start.reader.close()
    assert tree_digest(store) == before


def test_a_store_before_a_growth_stage_starting_at_its_step_is_stage_0(tmp_path: Path) -> None:
    store = _store(tmp_path / "c")
    grow = ["growth.0.start_step=4", "growth.0.hidden_size=48", "growth.0.num_layers=3"]
    start = open_canonical_start(store, _config(*grow))
    start.reader.close()
    assert start.stage == 0  # the trainer grows it at step 4


@pytest.mark.parametrize(
    ("overrides", "store_args", "message"),
    [
        (["model.hidden_size=48"], {}, r"hidden_size.*\(32, 48\)"),
        (["batch.global_batch_size=16", "batch.grad_accum=8"], {}, "consumed 32 samples in 4"),
        (["train.steps=3"], {}, r"step 4, past train.steps \(3\)"),
        (["parallel.zero_stage=1"], {"adam_step": {"final_norm.weight": 2}}, "ZeRO stage 1"),
        ([], {"seq_len": 32}, "seq_len 32"),
    ],
)
def test_mismatches_are_named(
    tmp_path: Path, overrides: list[str], store_args: dict, message: str
) -> None:
    store = _store(tmp_path / "c", **store_args)
    before = tree_digest(store)
    with pytest.raises(ConfigError, match=message):
        open_canonical_start(store, _config(*overrides))
    assert tree_digest(store) == before


def test_per_tensor_adam_steps_are_kept_at_zero_0(tmp_path: Path) -> None:
    store = _store(tmp_path / "c", adam_step={"final_norm.weight": 2})
    start = open_canonical_start(store, _config("parallel.zero_stage=0"))
    start.reader.close()
    assert start.adam_steps["final_norm.weight"] == 2 and start.adam_steps["embed.word.weight"] == 4


def test_missing_or_truncated_store(tmp_path: Path) -> None:
    with pytest.raises(CanonicalCheckpointError, match="no canonical checkpoint"):
        open_canonical_start(tmp_path / "absent", _config())
    store = _store(tmp_path / "c")
    shard = sorted(store.glob("exp_avg-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CanonicalCheckpointError, match=shard.name):
        open_canonical_start(store, _config())


def test_config_validation_names_a_missing_store_unless_the_run_resumes(tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    run = [f"train.run_dir={tmp_path / 'run'}", f"checkpoint.load={absent}"]
    with pytest.raises(
        ConfigError,
        match=r"checkpoint\.load \(.*absent\) is not a canonical checkpoint \(no meta\.json",
    ):
        _config(*run)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000004\n")
    assert _config(*run).checkpoint.load == str(absent)  # the run's own checkpoint wins
    with pytest.raises(ConfigError, match=r"no meta\.json"):
        _config(*run, "checkpoint.resume=false")
