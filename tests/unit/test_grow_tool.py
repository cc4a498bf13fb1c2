"""The streaming growth tool on real small GPT checkpoints: function preservation, exact
carry-over of weights, moments and Adam steps, moment policies, the ramp in meta, and
agreement with the in-memory grow()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_msg.checkpoint.canonical import CanonicalReader, load_canonical
from megatron_msg.checkpoint.run_meta import decode_ramp
from megatron_msg.config import ModelConfig
from megatron_msg.growth.grow_tool import GrowOptions, grow_checkpoint
from megatron_msg.growth.masks import MaskRamp
from megatron_msg.growth.operators import GrowthPlan, grow, is_mask_name, plan_growth
from megatron_msg.growth.optimizer_state import SquareMeans, carry_moments, carry_tensor
from megatron_msg.growth.unmapped_reader import UnmappedReader
from megatron_msg.growth.verify import measure_preservation
from megatron_msg.model.canonical import parameter_specs
from tests.unit.grow_tool_sources import (
    GROWN_SIZES,
    ODD_STEP,
    SMALL,
    SMALL_VARIANT,
    STEP,
    write_source,
)


def _grow(src: Path, dst: Path, **options: object) -> None:
    opts = GrowOptions(**{"progress": False, **options})  # type: ignore[arg-type]
    grow_checkpoint(load=src, save=dst, sizes=GROWN_SIZES, options=opts)


def _target(config: ModelConfig) -> ModelConfig:
    return config.replace(hidden_size=48, ffn_hidden_size=96, num_heads=3, num_layers=4)


def _plan(config: ModelConfig) -> GrowthPlan:
    shapes = {name: spec.shape for name, spec in parameter_specs(config).items()}
    return plan_growth(shapes, config, _target(config))


@pytest.mark.parametrize(
    ("config", "depth_strategy"),
    [(SMALL, "stack"), (SMALL_VARIANT, "interleave"), (SMALL, "random")],
    ids=["gelu-learned-tied-stack", "swiglu-rope-untied-interleave", "random-layers"],
)
def test_grown_checkpoint_gives_the_small_models_logits(
    tmp_path: Path, config: ModelConfig, depth_strategy: str
) -> None:
    source = write_source(tmp_path / "src", config)
    _grow(tmp_path / "src", tmp_path / "dst", depth_strategy=depth_strategy)
    grown = load_canonical(tmp_path / "dst")
    assert grown.meta.model == _target(config)
    tokens = torch.randint(
        0, config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(5)
    )
    report = measure_preservation(
        source["weights"], config, grown.weights, grown.meta.model, tokens=tokens
    )
    assert report.max_abs_logits <= 1e-5 and report.delta_loss <= 1e-5, report
    # Not trivially equal: the new units exist and are random.
    assert grown.weights["layers.0.mlp.fc1.weight"][64:].abs().sum() > 0


@pytest.mark.parametrize("policy", ["zero", "mean_sq"])
def test_old_entries_bitwise_new_entries_by_policy(tmp_path: Path, policy: str) -> None:
    source = write_source(tmp_path / "src")
    _grow(tmp_path / "src", tmp_path / "dst", moment_policy=policy, ramp_steps=37)
    grown = load_canonical(tmp_path / "dst")
    plan = _plan(SMALL)
    checked = 0
    for name, tmap in plan.maps.tensors.items():
        if is_mask_name(name):
            continue
        assert tmap.source is not None
        for kind in ("weights", "exp_avg", "exp_avg_sq"):
            new, old = getattr(grown, kind)[name], source[kind][tmap.source]
            assert torch.equal(new[tmap.index], old), (kind, name)
        fresh = torch.ones(tmap.new_shape, dtype=torch.bool)
        fresh[tmap.index] = False
        if fresh.any():
            checked += 1
            assert bool((grown.exp_avg[name][fresh] == 0).all())
            values = grown.exp_avg_sq[name][fresh].unique()
            assert values.numel() == 1, name  # one value for all new entries
            if policy == "zero":
                assert float(values) == 0.0
            else:  # the mean of the tensor's old exp_avg_sq
                mean = float(source["exp_avg_sq"][tmap.source].double().mean())
                assert float(values) == pytest.approx(mean, rel=1e-6), name
    assert checked > 20
    # Adam steps: copies of a layer take its step; everything else the global step.
    assert grown.meta.step == STEP and grown.meta.stage == 3
    assert grown.meta.adam_step == {
        **ODD_STEP,
        "layers.2.mlp.fc1.weight": 5,  # stack: layer 2 copies layer 0
        "layers.3.attn.qkv.weight": 3,
    }
    assert grown.meta.data == {"consumed_samples": 1234} and grown.meta.lr == {"last_lr": 1e-4}


def test_masks_at_zero_and_ramp_scheduled(tmp_path: Path) -> None:
    write_source(tmp_path / "src")
    _grow(tmp_path / "src", tmp_path / "dst", ramp_steps=37)
    with CanonicalReader(tmp_path / "dst") as reader:
        masks = {n: reader.get(n) for n in reader.names() if is_mask_name(n)}
        ramp_meta = reader.meta.masks["ramp"]
    assert torch.equal(masks["masks.hidden"], torch.cat([torch.ones(32), torch.zeros(16)]))
    assert torch.equal(masks["layers.1.masks.ffn"], torch.cat([torch.ones(64), torch.zeros(32)]))
    assert torch.equal(masks["layers.0.masks.heads"], torch.tensor([1.0, 1.0, 0.0]))
    assert float(masks["layers.3.masks.depth"]) == 0.0 and "layers.1.masks.depth" not in masks
    # The ramp a resumed run picks up: MaskRamp.state_dict() of a fresh ramp over every mask,
    # start values run-length encoded (as a converted training checkpoint stores them).
    assert ramp_meta["ramp_steps"] == 37 and ramp_meta["steps_done"] == 0
    assert ramp_meta["start"]["masks.hidden"] == {"shape": [48], "runs": [[1.0, 32], [0.0, 16]]}
    state = decode_ramp({"ramp": ramp_meta})
    assert state is not None
    ramp = MaskRamp.from_state_dict(state)
    assert ramp.ramp_steps == 37 and not ramp.done and sorted(ramp.start) == sorted(masks)
    assert all(torch.equal(ramp.start[n], masks[n]) for n in masks)


def test_streamed_growth_equals_in_memory_grow(tmp_path: Path) -> None:
    """One implementation: the tool's tensors are grow()'s and carry_moments()'s, bitwise."""
    source = write_source(tmp_path / "src")
    _grow(
        tmp_path / "src",
        tmp_path / "dst",
        depth_strategy="random",
        seed=11,
        moment_policy="mean_sq",
    )
    grown = load_canonical(tmp_path / "dst")
    expected = grow(source["weights"], SMALL, _target(SMALL), depth_strategy="random", seed=11)
    assert list(grown.weights) == list(expected.state)
    for name, tensor in expected.state.items():
        assert torch.equal(grown.weights[name], tensor), name
    avg, avg_sq = carry_moments(
        source["exp_avg"], source["exp_avg_sq"], expected.maps, policy="mean_sq"
    )
    for name in avg:
        assert torch.equal(grown.exp_avg[name], avg[name]), name
        assert torch.equal(grown.exp_avg_sq[name], avg_sq[name]), name
    # Brand-new layers' exp_avg_sq: the mean over that kind of tensor in the old layers.
    means = SquareMeans.accumulate(source["exp_avg_sq"].items())
    qkv = torch.cat(
        [source["exp_avg_sq"][f"layers.{i}.attn.qkv.weight"].reshape(-1) for i in (0, 1)]
    )
    assert means.by_kind["layers.*.attn.qkv.weight"] == pytest.approx(float(qkv.double().mean()))
    value = grown.exp_avg_sq["layers.3.attn.qkv.weight"].unique()
    assert value.numel() == 1 and float(value) == pytest.approx(
        float(qkv.double().mean()), rel=1e-6
    )


def test_growing_a_grown_checkpoint_mid_ramp(tmp_path: Path) -> None:
    """Source with fractional masks (a ramp in progress) and folded ones: preserved again."""
    partial = {"masks.hidden": torch.cat([torch.ones(24), torch.full((8,), 0.25)])}
    partial["layers.1.masks.heads"] = torch.tensor([1.0, 0.5])
    partial["layers.0.masks.depth"] = torch.tensor(0.75)
    source = write_source(tmp_path / "src", masks=partial)
    _grow(tmp_path / "src", tmp_path / "dst")
    grown = load_canonical(tmp_path / "dst")
    assert torch.equal(grown.weights["masks.hidden"][:32], partial["masks.hidden"])
    assert float(grown.weights["layers.0.masks.depth"]) == 0.75
    assert float(grown.weights["layers.2.masks.depth"]) == 0.0  # the copy of layer 0 is new
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    report = measure_preservation(
        source["weights"], SMALL, grown.weights, grown.meta.model, tokens=tokens
    )
    assert report.ok, report


def test_unmapped_reads_equal_reader_reads(tmp_path: Path) -> None:
    write_source(tmp_path / "src")
    with CanonicalReader(tmp_path / "src") as reader:
        plain = UnmappedReader(reader)
        for kind in ("weights", "exp_avg_sq"):
            for name in reader.names(kind):
                assert torch.equal(plain.read(name, kind=kind), reader.get(name, kind=kind))
        word = reader.get("embed.word.weight")
        assert torch.equal(plain.read_rows("embed.word.weight", 5, 9), word[5:9])
        assert plain.read_rows("embed.word.weight", 7, 7).shape == (0, 32)
        with pytest.raises(ValueError, match="out of range"):
            plain.read_rows("embed.word.weight", 120, 129)


def test_plan_from_shapes_and_consuming_builds(tmp_path: Path) -> None:
    source = write_source(tmp_path / "src")
    weights = source["weights"]
    shapes = {name: tuple(t.shape) for name, t in weights.items()}
    assert (
        plan_growth(shapes, SMALL, _target(SMALL)).maps == grow(weights, SMALL, _target(SMALL)).maps
    )
    deeper = plan_growth(shapes, SMALL, SMALL.replace(num_layers=3))
    name, tmap = "layers.2.attn.qkv.weight", deeper.maps.tensors["layers.2.attn.qkv.weight"]
    old = weights[str(tmap.source)]
    kept = deeper.build(name, old, dtype=torch.float32)
    assert kept is not old and torch.equal(kept, old)
    consumed = deeper.build(name, old, dtype=torch.float32, consume=True)
    assert consumed.data_ptr() == old.data_ptr()  # handed over, not copied
    moment = source["exp_avg_sq"][str(tmap.source)]
    assert (
        carry_tensor(name, tmap, moment, policy="mean_sq", moment="exp_avg_sq", consume=True)
        is moment
    )
    copied = carry_tensor(name, tmap, moment, policy="mean_sq", moment="exp_avg_sq")
    assert copied is not moment and torch.equal(copied, moment)
