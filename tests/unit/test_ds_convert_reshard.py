"""Pieces of `megatron-msg convert` that need no DeepSpeed run.

- Pipeline stages + TP slices -> canonical tensors (``reshard``): a real
  model's canonical state is cut the way a PP=2 x TP=2 run holds it (whole
  layers per stage, counted locally on each stage; embeddings on the first
  stage and, tied, again on the last; every tensor TP-sliced by its split
  rule) and must come back bitwise, for any local layer naming (the real
  pipeline layout is converted in tests/distributed/test_ds_convert.py).
- The run state -> ``meta.json`` fields (``run_meta``): the ramp start values
  survive the run-length encoding bitwise, Adam steps are recorded where they
  differ from the run's step.
"""

from __future__ import annotations

import pytest
import torch

from megatron_msg.checkpoint.reshard import (
    TopologyError,
    layer_offset_naming,
    locate_stages,
    merge_tp,
    pipeline_module_naming,
)
from megatron_msg.config import ModelConfig
from megatron_msg.model import GPTModel
from megatron_msg.model.canonical import canonical_specs
from megatron_msg.parallel.groups import ProcessGroups

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_heads=4, head_dim=8,
    num_layers=4, max_seq_len=16, activation="swiglu", norm="rmsnorm",
    position_embedding="rope", tie_embeddings=True,
)  # fmt: skip
FIRST_LAYERS = (0, 3)  # stage 0 holds layers 0-2, stage 1 layer 3 (uneven on purpose)


def _canonical_state() -> dict[str, torch.Tensor]:
    model = GPTModel(CONFIG, groups=ProcessGroups.single(), init_seed=7)
    state = model.to_canonical()
    state["masks.hidden"] = torch.linspace(0.25, 1.0, CONFIG.hidden_size)
    state["layers.3.masks.heads"] = torch.tensor([1.0, 1.0, 0.5, 0.5])
    return state


def _stage_of(name: str) -> list[int]:
    if name.startswith("layers."):
        index = int(name.split(".")[1])
        return [0 if index < FIRST_LAYERS[1] else 1]
    if name.startswith("embed."):
        return [0, 1]  # tied: the last stage holds the output embedding too
    if name == "masks.hidden":
        return [0, 1]
    return [1]  # final norm


def _local_name(stage: int, name: str) -> str:
    if not name.startswith("layers."):
        return name
    _, index, rest = name.split(".", 2)
    return f"layers.{int(index) - FIRST_LAYERS[stage]}.{rest}"


def _shard(full: torch.Tensor, dim: int | None, rank: int, tp: int) -> torch.Tensor:
    return full if dim is None else full.chunk(tp, dim=dim)[rank].clone()


def _pp2_tp2(state: dict[str, torch.Tensor]) -> list[list[dict[str, torch.Tensor]]]:
    """ranks[pp][tp] = {local name: local slice}."""
    specs = canonical_specs(CONFIG)
    ranks: list[list[dict[str, torch.Tensor]]] = [[{}, {}], [{}, {}]]
    for name, full in state.items():
        for stage in _stage_of(name):
            for tp in range(2):
                ranks[stage][tp][_local_name(stage, name)] = _shard(
                    full, specs[name].split_dim, tp, 2
                )
    return ranks


def test_pipeline_and_tp_slices_merge_back_bitwise() -> None:
    state = _canonical_state()
    ranks = _pp2_tp2(state)
    naming = layer_offset_naming(FIRST_LAYERS)
    where = locate_stages([list(r[0]) for r in ranks], CONFIG, naming=naming)
    assert list(where) == [n for n in canonical_specs(CONFIG) if n in state]  # canonical order
    assert [s for s, _ in where["embed.word.weight"]] == [0, 1]
    assert where["layers.3.mlp.gate.weight"] == [(1, "layers.0.mlp.gate.weight")]
    specs = canonical_specs(CONFIG)
    for name, places in where.items():
        stage, local = places[0]
        merged = merge_tp(name, [ranks[stage][tp][local] for tp in range(2)], specs[name])
        assert torch.equal(merged, state[name]), name


def test_stage_errors_name_the_tensors() -> None:
    state = _canonical_state()
    naming = layer_offset_naming(FIRST_LAYERS)
    stages = [sorted(r[0]) for r in _pp2_tp2(state)]
    with pytest.raises(TopologyError, match=r"on no stage: layers\.3\.attn\.qkv\.weight"):
        locate_stages(
            [stages[0], [n for n in stages[1] if n != "layers.0.attn.qkv.weight"]],
            CONFIG,
            naming=naming,
        )
    # A layer's tensors spread over two stages (a wrong layer offset does this).
    with pytest.raises(TopologyError, match=r"layers\.2 on stages \[0, 1\]"):
        locate_stages(stages, CONFIG, naming=layer_offset_naming((0, 2)))
    with pytest.raises(TopologyError, match=r"not in the canonical table.*layers\.9"):
        locate_stages([stages[0], [*stages[1], "layers.6.norm1.weight"]], CONFIG, naming=naming)


def test_pipeline_module_naming() -> None:
    rename = pipeline_module_naming(CONFIG.num_layers)  # items: embedding, 4 blocks, head
    assert rename(0, "0.embed.word.weight") == "embed.word.weight"
    assert rename(1, "4.block.mlp.gate.weight") == "layers.3.mlp.gate.weight"
    assert rename(1, "4.block.masks.ffn") == "layers.3.masks.ffn"
    assert rename(1, "5.tied_word") == "embed.word.weight"
    assert rename(1, "5.final_norm.weight") == "final_norm.weight"
    assert rename(1, "masks.hidden") == "masks.hidden"
    with pytest.raises(TopologyError, match="item 6"):
        rename(1, "6.final_norm.weight")
    with pytest.raises(TopologyError, match="not a block tensor"):
        rename(0, "2.attn.qkv.weight")


def test_merge_tp_checks_slice_shapes() -> None:
    spec = canonical_specs(CONFIG)["layers.0.attn.qkv.weight"]  # split along dim 0
    full = torch.randn(spec.shape)
    assert torch.equal(merge_tp("qkv", list(full.chunk(2, dim=0)), spec), full)
    with pytest.raises(TopologyError, match="qkv"):
        merge_tp("qkv", [full[:40], full[40:]], spec)
    replicated = canonical_specs(CONFIG)["final_norm.weight"]
    value = torch.randn(replicated.shape)
    assert merge_tp("final_norm.weight", [value, value.clone()], replicated) is value


def test_ramp_round_trip_is_bitwise() -> None:
    from megatron_msg.checkpoint.run_meta import decode_ramp, encode_ramp

    start = {
        "masks.hidden": torch.cat([torch.ones(20), torch.zeros(12)]),
        "layers.1.masks.ffn": torch.rand(64),  # no runs at all
        "layers.2.masks.depth": torch.tensor(0.0),
        "layers.0.masks.heads": torch.tensor([1.0, 1.0, 1 / 3, 1 / 3]),
    }
    state = {"ramp_steps": 10, "steps_done": 3, "start": start}
    encoded = encode_ramp(state)
    assert encoded["start"]["masks.hidden"]["runs"] == [[1.0, 20], [0.0, 12]]
    decoded = decode_ramp({"ramp": encoded})
    assert decoded is not None
    assert decoded["ramp_steps"] == 10 and decoded["steps_done"] == 3
    for name, value in start.items():
        assert decoded["start"][name].shape == value.shape
        assert torch.equal(decoded["start"][name], value), name
    assert decode_ramp({}) is None
    broken = {"ramp": {**encoded, "start": {"masks.hidden": {"shape": [32], "runs": [[1.0, 5]]}}}}
    with pytest.raises(ValueError, match=r"masks\.hidden"):
        decode_ramp(broken)


def test_canonical_meta_from_run_state() -> None:
    from megatron_msg.checkpoint.run_meta import canonical_meta
    from megatron_msg.training.checkpoint import RunState
    from megatron_msg.training.config import load_config

    config = load_config(
        None, ["model.vocab_size=64", "model.hidden_size=32", "model.num_heads=2",
               "model.head_dim=16", "model.ffn_hidden_size=64", "model.num_layers=2",
               "growth.0.start_step=5", "growth.0.hidden_size=48"],
    )  # fmt: skip
    lr = {"anchor_step": 5, "anchor_lr": 1e-3, "anchor_warmup": 0, "rewinds": [5]}
    run = RunState(step=9, stage=1, consumed_samples=72, lr=lr, ramp=None, skipped_steps=2)
    meta = canonical_meta(
        run=run, config=config, adam_step={"a": 7, "b": 9}, source={"tag": "step_00000009"}
    )
    assert meta.model.hidden_size == 48 and meta.stage == 1 and meta.step == 9
    assert meta.adam_step == {"a": 7}  # only where it differs from the run's step
    assert meta.masks == {} and meta.lr == lr
    assert meta.data["consumed_samples"] == 72 and meta.extra["skipped_steps"] == 2
