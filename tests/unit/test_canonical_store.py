"""The canonical checkpoint store: round trips, sharding, slices, atomicity, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_msg.checkpoint.canonical import (
    INDEX_FILE,
    META_FILE,
    CanonicalCheckpointError,
    CanonicalMeta,
    CanonicalReader,
    CanonicalWriter,
    load_canonical,
    save_canonical,
)
from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model.canonical import parameter_specs

CONFIG = ModelConfig(
    vocab_size=100, hidden_size=16, ffn_hidden_size=32, num_heads=2, head_dim=8,
    num_layers=2, max_seq_len=16,
)  # fmt: skip


def _state(config: ModelConfig = CONFIG, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    specs = parameter_specs(config)
    weights = {n: torch.randn(s.shape, generator=gen) for n, s in specs.items()}
    # Unfolded masks, including a fractional ramp value and a 0-dim depth mask.
    weights["masks.hidden"] = torch.cat([torch.ones(12), torch.zeros(4)])
    weights["layers.1.masks.depth"] = torch.tensor(0.25)
    avg = {n: torch.randn(s.shape, generator=gen) for n, s in specs.items()}
    avg_sq = {n: torch.rand(s.shape, generator=gen) for n, s in specs.items()}
    return {"weights": weights, "exp_avg": avg, "exp_avg_sq": avg_sq}


def _meta(config: ModelConfig = CONFIG) -> CanonicalMeta:
    return CanonicalMeta(
        model=config,
        step=42,
        stage=1,
        adam_step={"layers.1.mlp.fc1.weight": 7},
        masks={"hidden": {"start_step": 40, "ramp_steps": 10}},
        data={"consumed_samples": 1344},
        lr={"last_lr": 3e-4},
    )


def _save(path: Path, **kwargs) -> dict[str, dict[str, torch.Tensor]]:
    state = _state()
    save_canonical(path, meta=_meta(), **state, **kwargs)
    return state


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    raw = [t.reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*raw)


def test_round_trip_is_bitwise_for_all_kinds(tmp_path: Path) -> None:
    state = _save(tmp_path / "ckpt")
    loaded = load_canonical(tmp_path / "ckpt")
    for kind, tensors in state.items():
        got = getattr(loaded, kind)
        assert list(got) == list(tensors), kind
        for name, tensor in tensors.items():
            assert _bitwise_equal(got[name], tensor), (kind, name)
    assert loaded.meta == _meta()
    assert json.loads((tmp_path / "ckpt" / META_FILE).read_text())["format_version"] == 1


def test_small_shard_limit_gives_several_files(tmp_path: Path) -> None:
    state = _save(tmp_path / "ckpt", shard_bytes=4096)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    weights = [f for f in files if f.startswith("weights-")]
    assert len(weights) >= 3
    assert weights == [
        f"weights-{i:05d}-of-{len(weights):05d}.safetensors" for i in range(1, len(weights) + 1)
    ]
    assert any(f.startswith("exp_avg_sq-") for f in files)
    index = json.loads((tmp_path / "ckpt" / INDEX_FILE).read_text())
    assert set(index["files"]) == set(files)
    with CanonicalReader(tmp_path / "ckpt") as reader:
        for kind, tensors in state.items():
            for name, tensor in tensors.items():
                assert _bitwise_equal(reader.get(name, kind=kind), tensor)
                entry = reader.entry(name, kind=kind)
                assert entry.nbytes == tensor.nbytes and entry.shape == tuple(tensor.shape)
    # Each shard holds at most the limit unless a single tensor is bigger than it.
    for file in weights:
        tensors = [e for e in index["tensors"]["weights"].values() if e["file"] == file]
        assert len(tensors) == 1 or sum(e["nbytes"] for e in tensors) <= 4096


def test_slices_equal_slices_of_full_reads(tmp_path: Path) -> None:
    _save(tmp_path / "ckpt", shard_bytes=8192)
    with CanonicalReader(tmp_path / "ckpt") as reader:
        for kind in ("weights", "exp_avg"):
            qkv = reader.get("layers.0.attn.qkv.weight", kind=kind)  # [48, 16]
            got = reader.get_slice("layers.0.attn.qkv.weight", dim=0, start=24, stop=48, kind=kind)
            assert torch.equal(got, qkv[24:48]) and got.is_contiguous()
            proj = reader.get("layers.1.attn.proj.weight", kind=kind)  # [16, 16]
            got = reader.get_slice("layers.1.attn.proj.weight", dim=1, start=3, stop=11, kind=kind)
            assert torch.equal(got, proj[:, 3:11]) and got.is_contiguous()
            got = reader.get_slice("layers.1.attn.proj.weight", dim=-1, start=0, stop=0, kind=kind)
            assert got.shape == (16, 0)
        embed = reader.get("embed.word.weight")
        for rank in range(4):
            shard = reader.get_shard("embed.word.weight", dim=0, rank=rank, world=4)
            assert torch.equal(shard, embed.chunk(4, dim=0)[rank])
        with pytest.raises(ValueError, match=r"slice \[0:17\] out of range"):
            reader.get_slice("layers.1.attn.proj.weight", dim=1, start=0, stop=17)
        with pytest.raises(ValueError, match="no dim 0"):
            reader.get_slice("layers.1.masks.depth", dim=0, start=0, stop=1)
        with pytest.raises(ValueError, match="chunk 0 of 3"):
            reader.get_shard("layers.1.attn.proj.weight", dim=1, rank=0, world=3)


def test_reads_are_copies_not_views_of_the_mapping(tmp_path: Path) -> None:
    _save(tmp_path / "ckpt")
    with CanonicalReader(tmp_path / "ckpt") as reader:
        first = reader.get("final_norm.weight")
        expected = first.clone()
        first.add_(1.0)
        assert torch.equal(reader.get("final_norm.weight"), expected)


def _break_missing(store: Path) -> str:
    victim = sorted(store.glob("exp_avg-*.safetensors"))[-1]
    victim.unlink()
    return victim.name


def _break_truncated(store: Path) -> str:
    victim = sorted(store.glob("weights-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    return victim.name


def _edit_index_entry(store: Path, change: dict) -> str:
    index = json.loads((store / INDEX_FILE).read_text())
    entry = index["tensors"]["weights"]["layers.0.attn.qkv.weight"]
    entry.update(change)
    (store / INDEX_FILE).write_text(json.dumps(index))
    return entry["file"]


def _break_shape(store: Path) -> str:
    return _edit_index_entry(store, {"shape": [16, 48]})  # same byte size, other shape


def _break_dtype(store: Path) -> str:
    return _edit_index_entry(store, {"dtype": "I32"})  # same byte size, other dtype


def _break_version(store: Path) -> str:
    meta = json.loads((store / META_FILE).read_text())
    meta["format_version"] = 99
    (store / META_FILE).write_text(json.dumps(meta))
    return META_FILE


def _break_index_version(store: Path) -> str:
    index = json.loads((store / INDEX_FILE).read_text())
    index["format_version"] = 2
    (store / INDEX_FILE).write_text(json.dumps(index))
    return INDEX_FILE


def _break_config(store: Path) -> str:
    meta = json.loads((store / META_FILE).read_text())
    meta["model"]["hidden_size"] = 32  # tensors no longer match the model config
    (store / META_FILE).write_text(json.dumps(meta))
    return INDEX_FILE


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_break_missing, "shard file is missing"),
        (_break_truncated, "truncated"),
        (_break_shape, r"F32\[48, 16\] in the file header but F32\[16, 48\]"),
        (_break_dtype, r"F32\[48, 16\] in the file header but I32\[48, 16\]"),
        (_break_version, "format_version 99 is not supported"),
        (_break_index_version, "format_version 2 is not supported"),
        (_break_config, "does not match the model config"),
    ],
)
def test_corruption_raises_naming_the_file(tmp_path: Path, breaker, message: str) -> None:
    store = tmp_path / "ckpt"
    _save(store, shard_bytes=4096)
    file = breaker(store)
    with pytest.raises(CanonicalCheckpointError, match=message) as info:
        CanonicalReader(store)
    assert file in str(info.value)


def test_truncated_file_with_fixed_index_size_is_still_caught(tmp_path: Path) -> None:
    store = tmp_path / "ckpt"
    _save(store)
    name = _break_truncated(store)
    index = json.loads((store / INDEX_FILE).read_text())
    index["files"][name]["nbytes"] = (store / name).stat().st_size
    (store / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CanonicalCheckpointError, match=f"{name}: not a valid safetensors file"):
        CanonicalReader(store)


def test_interrupted_write_leaves_no_target(tmp_path: Path) -> None:
    state = _state()
    target = tmp_path / "ckpt"
    with (
        pytest.raises(RuntimeError, match="node lost"),
        CanonicalWriter(target, shard_bytes=2048) as writer,
    ):
        for i, (name, tensor) in enumerate(state["weights"].items()):
            writer.add(name, tensor)
            if i == 5:
                raise RuntimeError("node lost")
    assert list(tmp_path.iterdir()) == []


def test_leaving_the_writer_without_finalize_writes_nothing(tmp_path: Path) -> None:
    with (
        pytest.raises(CanonicalCheckpointError, match="without finalize"),
        CanonicalWriter(tmp_path / "ckpt") as writer,
    ):
        writer.add("final_norm.weight", torch.ones(16))
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_store_is_refused_at_finalize(tmp_path: Path) -> None:
    state = _state()
    with (
        pytest.raises(ConfigError, match=r"missing: embed\.word\.weight"),
        CanonicalWriter(tmp_path / "ckpt") as writer,
    ):
        for name, tensor in list(state["weights"].items())[1:]:
            writer.add(name, tensor)
        writer.finalize(_meta())
    assert list(tmp_path.iterdir()) == []


def test_save_checks_everything_before_writing(tmp_path: Path) -> None:
    state = _state()
    state["exp_avg"]["final_norm.weight"] = torch.zeros(15)
    with pytest.raises(ConfigError, match=r"moments of final_norm.weight have shapes \(15,\)"):
        save_canonical(tmp_path / "ckpt", meta=_meta(), **state)
    state = _state()
    del state["exp_avg_sq"]["embed.word.weight"]
    with pytest.raises(ConfigError, match="cover different tensors"):
        save_canonical(tmp_path / "ckpt", meta=_meta(), **state)
    state = _state()
    state["exp_avg"]["masks.hidden"] = state["exp_avg_sq"]["masks.hidden"] = torch.zeros(16)
    with pytest.raises(ConfigError, match="not a stored parameter"):
        save_canonical(tmp_path / "ckpt", meta=_meta(), **state)
    assert list(tmp_path.iterdir()) == []


def test_existing_target_is_refused_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(CanonicalCheckpointError, match="already exists; pass overwrite=True"):
        _save(target)
    assert (target / "keep.txt").read_text() == "precious"
    state = _save(target, overwrite=True)
    assert not (target / "keep.txt").exists()
    assert torch.equal(
        load_canonical(target).weights["embed.word.weight"], state["weights"]["embed.word.weight"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_meta_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"meta\.step must be a non-negative integer"):
        CanonicalMeta(model=CONFIG, step=-1)
    with pytest.raises(ConfigError, match="not JSON-serialisable"):
        CanonicalMeta(model=CONFIG, data={"pos": torch.ones(1)})
    with pytest.raises(ConfigError, match=r"unknown meta field\(s\) \['bogus'\]"):
        CanonicalMeta.from_dict({"model": CONFIG.to_dict(), "bogus": 1})


def test_model_round_trip_through_the_store(tmp_path: Path) -> None:
    from megatron_msg.model import GPTModel
    from megatron_msg.parallel.groups import ProcessGroups

    config = CONFIG.replace(activation="swiglu", norm="rmsnorm", tie_embeddings=False)
    groups = ProcessGroups.single()
    model = GPTModel(config, groups=groups, init_seed=3)
    model.mask_owner("masks.hidden")[0].put("hidden", torch.linspace(0, 1, 16))
    state = model.to_canonical()
    assert "masks.hidden" in state
    save_canonical(
        tmp_path / "ckpt", weights=state, meta=CanonicalMeta(model=config), shard_bytes=1024
    )
    loaded = load_canonical(tmp_path / "ckpt")
    clone = GPTModel.from_canonical(loaded.weights, loaded.meta.model, groups=groups)
    tokens = torch.randint(0, 100, (2, 8))
    assert torch.equal(clone(tokens), model(tokens))
    assert loaded.exp_avg == {} and loaded.exp_avg_sq == {}


def test_dtypes_survive_bitwise(tmp_path: Path) -> None:
    state = _state()
    weights = {n: t.to(torch.bfloat16) for n, t in state["weights"].items()}
    weights["final_norm.weight"] = state["weights"]["final_norm.weight"].double()
    save_canonical(tmp_path / "ckpt", weights=weights, meta=_meta(), exp_avg=state["exp_avg"],
                   exp_avg_sq=state["exp_avg_sq"])  # fmt: skip
    loaded = load_canonical(tmp_path / "ckpt")
    for name, tensor in weights.items():
        assert _bitwise_equal(loaded.weights[name], tensor), name
    with CanonicalReader(tmp_path / "ckpt") as reader:
        assert reader.entry("embed.word.weight").dtype == "BF16"
        assert reader.entry("final_norm.weight").dtype == "F64"
        assert reader.nbytes("weights") == sum(t.nbytes for t in weights.values())


def test_many_small_tensors_roll_over_when_the_header_space_is_full(tmp_path: Path) -> None:
    config = ModelConfig(vocab_size=64, hidden_size=8, ffn_hidden_size=8, num_heads=1,
                         head_dim=8, num_layers=80, max_seq_len=8)  # fmt: skip
    weights = {
        n: torch.full(s.shape, float(i)) for i, (n, s) in enumerate(parameter_specs(config).items())
    }
    assert len(weights) > 900  # more entries than one 64 KiB header holds
    save_canonical(tmp_path / "ckpt", weights=weights, meta=CanonicalMeta(model=config))
    assert len(list((tmp_path / "ckpt").glob("weights-*.safetensors"))) >= 2
    loaded = load_canonical(tmp_path / "ckpt")
    assert all(torch.equal(loaded.weights[n], t) for n, t in weights.items())


_STREAMING_PROBE = """
import resource, sys, torch
from megatron_msg.checkpoint.canonical import CanonicalWriter
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
tensor_mb, count = 32, 12
scratch = torch.empty(tensor_mb * 2**18)  # touch the allocator once so the baseline includes it
del scratch
base = peak_mb()
with CanonicalWriter(sys.argv[1]) as writer:
    for i in range(count):
        writer.add(f"t{i}", torch.full((tensor_mb * 2**18,), float(i)))  # 32 MiB each, made here
    writer.abort()
print(peak_mb() - base)
"""


def test_writer_memory_is_bounded_by_one_tensor_not_the_store(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _STREAMING_PROBE, str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    # 12 x 32 MiB streamed: peak growth stays near one tensor, far below the 384 MiB written.
    assert growth_mb < 3 * 32, growth_mb
    assert not (tmp_path / "ckpt").exists()
