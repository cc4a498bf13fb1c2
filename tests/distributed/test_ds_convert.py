"""`megatron-msg convert`: real DeepSpeed checkpoints -> canonical store, checked against the live engine.

Four runs of a tiny GPT on gloo (shared by every test here, see ``runs``):

- ``tp1dp2_z1``: TP=1, DP=2, ZeRO-1, fp32;
- ``tp2dp1_z0``: TP=2, DP=1, ZeRO-0, fp32, grown at step 2 (hidden, ffn, heads,
  layers) so the checkpoint holds fractional masks mid-ramp;
- ``pp2_z1``: TP=1, PP=2, DP=1, ZeRO-1, grown the same way: DeepSpeed's
  pipeline layout (per-layer files, parameters named by pipeline item, the
  tied word embedding's copy on the last stage, ``masks.hidden`` in no file
  and rebuilt from the saved ramp);
- ``tp2dp2_z2_bf16``: TP=2, DP=2, ZeRO-2, bf16 (fp32 masters in DeepSpeed's
  bf16 partitions).

Each run trains a few steps and saves through the trainer; then, in the same
processes, the live engine's canonical state (``get_state()``, gathered online
through DeepSpeed's ``safe_get_full_*``) is recorded, rank 0 converts the
checkpoint offline, and (pp == 1) every rank builds a model from the converted
store at the run's own topology and dtype.

Expected: fp32 masters, both Adam moments, masks and Adam steps bitwise equal
to the live state (the converter only copies fp32 bytes out of the partitions,
no arithmetic); logits of the converted model bitwise equal to the live
model's (same weights, same topology, same kernels); for the pipeline run, a
single-process model from the store gives the live pipeline's probe loss
bitwise (TP=1: the same per-layer kernels, the stages only pass activations).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.dist_utils import run_distributed
from tests.tiny_run import TINY_RUN

BASE = [
    *TINY_RUN,
    "lr.warmup_steps=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.interval=0",
]
GROW = [
    "growth.0.start_step=2",
    "growth.0.hidden_size=48",
    "growth.0.ffn_hidden_size=96",
    "growth.0.num_heads=4",
    "growth.0.num_layers=3",
    "growth.0.ramp_steps=4",
]
CASES = {
    "tp1dp2_z1": (2, ["parallel.dp=2", "parallel.zero_stage=1", "train.steps=2"]),
    "tp2dp1_z0": (2, ["parallel.tp=2", "parallel.zero_stage=0", "train.steps=3", *GROW]),
    "pp2_z1": (2, ["parallel.pp=2", "parallel.zero_stage=1", "train.steps=3", *GROW]),
    "tp2dp2_z2_bf16": (
        4,
        [
            "parallel.tp=2",
            "parallel.dp=2",
            "parallel.zero_stage=2",
            "train.dtype=bf16",
            "train.steps=2",
        ],
    ),
}
KINDS = ("weights", "exp_avg", "exp_avg_sq")


def _run_case(rank: int, root: str, name: str, overrides: list[str]) -> None:
    import torch.distributed as dist

    from megatron_msg.checkpoint.deepspeed_io import convert_to_canonical
    from megatron_msg.training.config import load_config
    from megatron_msg.training.loop import Trainer

    out = Path(root) / name
    trainer = Trainer(load_config(None, [*BASE, f"train.run_dir={out / 'run'}", *overrides]))
    trainer.run()  # trains and saves the final step through the trainer's checkpointing
    state = trainer.engine.get_state()
    probe_loss = trainer.engine.eval_loss(*trainer.probe)
    if rank == 0:
        tensors = {f"{k}/{n}": t for k in KINDS for n, t in getattr(state, k).items()}
        tensors |= {f"masks/{n}": t for n, t in state.masks.items()}
        tensors |= {"probe/tokens": trainer.probe[0], "probe/labels": trainer.probe[1]}
        ramp = trainer.ramp.state_dict() if trainer.ramp is not None else None
        if ramp is not None:
            tensors |= {f"ramp/{n}": t for n, t in ramp.pop("start").items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "online.safetensors"))
        info = {
            "step": state.step,
            "run_step": trainer.step,
            "ramp": ramp,
            "lr": trainer.lr.state_dict(),
            "probe_loss": probe_loss,
        }
        (out / "online.json").write_text(json.dumps(info))
        convert_to_canonical(load=out / "run", save=out / "canonical")
    dist.barrier()
    if trainer.groups.pp_size == 1:
        _converted_logits(rank, out, trainer)
    trainer.engine.destroy()
    dist.barrier()


def _converted_logits(rank: int, out: Path, trainer: Any) -> None:
    """Logits of the live module and of a model built from the converted store, same topology."""
    from megatron_msg.checkpoint.canonical import load_canonical
    from megatron_msg.model import GPTModel
    from megatron_msg.parallel.random import gather_tensor

    converted = load_canonical(out / "canonical")
    module = trainer.engine.module
    model = GPTModel.from_canonical(
        converted.weights, converted.meta.model, groups=trainer.groups, dtype=trainer.dtype
    )
    tokens = trainer.probe[0]
    module.eval()
    with torch.no_grad():
        live, ours = module(tokens), model(tokens)
    full = {
        "live": gather_tensor(live.float(), dim=-1, groups=trainer.groups),
        "converted": gather_tensor(ours.float(), dim=-1, groups=trainer.groups),
    }
    save_file(
        {k: v.contiguous() for k, v in full.items()}, str(out / f"logits_rank{rank}.safetensors")
    )


def _body(rank: int, world_size: int, root: str, names: list[str]) -> None:
    for name in names:
        _run_case(rank, root, name, CASES[name][1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds_convert")
    for world in (2, 4):
        names = [n for n, (w, _) in CASES.items() if w == world]
        run_distributed(_body, world_size=world, args=(str(root), names), timeout=500)
    return root


def _online(case: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    flat = load_file(str(case / "online.safetensors"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        kind, _, name = key.partition("/")
        parts.setdefault(kind, {})[name] = value
    return parts, json.loads((case / "online.json").read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_converted_state_is_the_live_state_bitwise(runs: Path, name: str) -> None:
    from megatron_msg.checkpoint.canonical import load_canonical

    online, info = _online(runs / name)
    converted = load_canonical(runs / name / "canonical")
    params = online["weights"]
    assert set(converted.exp_avg) == set(params) == set(converted.exp_avg_sq)
    assert set(converted.weights) == set(params) | set(online.get("masks", {}))
    for kind in KINDS:
        ours = getattr(converted, kind)
        for tensor_name, value in online[kind].items():
            assert ours[tensor_name].dtype == torch.float32
            assert torch.equal(ours[tensor_name], value), (kind, tensor_name)
    for mask_name, value in online.get("masks", {}).items():
        assert torch.equal(converted.weights[mask_name], value), mask_name
    assert float(converted.exp_avg_sq["final_norm.weight"].abs().sum()) > 0  # moments are real
    meta = converted.meta
    assert meta.step == info["run_step"]
    assert all(meta.adam_step.get(n, meta.step) == info["step"] for n in params)
    assert meta.lr == info["lr"]
    assert meta.data["consumed_samples"] == info["run_step"] * 8


def test_converted_masks_and_ramp(runs: Path) -> None:
    from megatron_msg.checkpoint.canonical import load_canonical
    from megatron_msg.checkpoint.run_meta import decode_ramp

    online, info = _online(runs / "tp2dp1_z0")
    converted = load_canonical(runs / "tp2dp1_z0" / "canonical")
    meta = converted.meta
    assert meta.stage == 1 and meta.model.num_layers == 3 and meta.model.hidden_size == 48
    hidden = converted.weights["masks.hidden"]
    assert 0.0 < float(hidden.min()) < 1.0  # mid-ramp: new channels are fractional
    ramp = decode_ramp(meta.masks)
    assert ramp is not None and ramp["steps_done"] == info["ramp"]["steps_done"] == 1
    assert ramp["ramp_steps"] == 4
    assert set(ramp["start"]) == set(online["ramp"])
    assert all(torch.equal(ramp["start"][n], v) for n, v in online["ramp"].items())


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("pp")])
def test_converted_model_logits_equal_live(runs: Path, name: str) -> None:
    world = CASES[name][0]
    for rank in range(world):
        logits = load_file(str(runs / name / f"logits_rank{rank}.safetensors"))
        assert logits["live"].shape[-1] == 128  # padded vocab, gathered over TP
        assert torch.equal(logits["converted"], logits["live"]), (name, rank)


def test_pipeline_checkpoint_probe_loss_and_hidden_mask(runs: Path) -> None:
    from megatron_msg.checkpoint.canonical import load_canonical
    from megatron_msg.model import GPTModel
    from megatron_msg.parallel.groups import ProcessGroups

    online, info = _online(runs / "pp2_z1")
    converted = load_canonical(runs / "pp2_z1" / "canonical")
    assert converted.meta.model.num_layers == 3 and info["ramp"]["steps_done"] == 1
    assert list((runs / "pp2_z1" / "run" / "checkpoints").glob("*/layer_04-model_00-*"))
    # No DeepSpeed file holds masks.hidden under pipeline parallelism.
    assert torch.equal(converted.weights["masks.hidden"], online["masks"]["masks.hidden"])
    model = GPTModel.from_canonical(
        converted.weights, converted.meta.model, groups=ProcessGroups.single()
    )
    model.eval()
    with torch.no_grad():
        loss = model.loss(online["probe"]["tokens"], online["probe"]["labels"])
    assert float(loss) == info["probe_loss"]


# ---- the CLI, and the input left untouched -------------------------------------


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_cli_converts_and_leaves_input_untouched(runs: Path, tmp_path: Path) -> None:
    from megatron_msg.checkpoint.canonical import load_canonical
    from megatron_msg.cli import main

    run_dir = runs / "tp2dp2_z2_bf16" / "run"
    before = _digest(run_dir)
    out = tmp_path / "canon"
    assert main(["convert", "--load", str(run_dir), "--save", str(out), "--quiet"]) == 0
    assert _digest(run_dir) == before
    first, again = load_canonical(runs / "tp2dp2_z2_bf16" / "canonical"), load_canonical(out)
    for kind in KINDS:
        a, b = getattr(first, kind), getattr(again, kind)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # An existing output is refused unless --overwrite.
    assert main(["convert", "--load", str(run_dir), "--save", str(out), "--quiet"]) == 1
    tag = run_dir / "checkpoints" / "step_00000002"
    assert main(["convert", "--load", str(tag), "--save", str(out), "--overwrite", "--quiet"]) == 0


# ---- bad input: a clear error naming the file, nothing written ----------------------


class NotAllowed:
    """A type a DeepSpeed file never contains; unpickling it must be refused."""


def _tag_copy(runs: Path, tmp_path: Path, name: str) -> Path:
    source = next((runs / name / "run" / "checkpoints").glob("step_*"))
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    return copy


def _expect_error(tag: Path, tmp_path: Path, *needles: str) -> None:
    from megatron_msg.checkpoint.deepspeed_files import DeepSpeedCheckpointError
    from megatron_msg.checkpoint.deepspeed_io import convert_to_canonical

    out = tmp_path / "out"
    with pytest.raises(DeepSpeedCheckpointError) as info:
        convert_to_canonical(load=tag, save=out)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_rank_file(runs: Path, tmp_path: Path) -> None:
    tag = _tag_copy(runs, tmp_path, "tp2dp2_z2_bf16")
    (tag / "bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()
    _expect_error(tag, tmp_path, "missing", "bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt")
    (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").rename(
        tag / "bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt"
    )
    (tag / "mp_rank_01_model_states.pt").unlink()
    _expect_error(tag, tmp_path, "mp_rank_01_model_states.pt", "tp=2 pp=1 dp=2")


def test_topology_mismatch(runs: Path, tmp_path: Path) -> None:
    tag = _tag_copy(runs, tmp_path, "tp1dp2_z1")
    shutil.copy(tag / "mp_rank_00_model_states.pt", tag / "mp_rank_01_model_states.pt")
    _expect_error(tag, tmp_path, "mp_rank_01_model_states.pt", "do not belong")
    (tag / "mp_rank_01_model_states.pt").unlink()
    # Metadata claiming a different DP size than the files were written with.
    meta = json.loads((tag / "msg_meta.json").read_text())
    meta["config"]["parallel"]["dp"] = 1
    (tag / "msg_meta.json").write_text(json.dumps(meta))
    _expect_error(tag, tmp_path, "zero_pp_rank_1_mp_rank_00_optim_states.pt", "do not belong")
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _expect_error(tag, tmp_path, "mp_rank_00_model_states.pt", "dp_world_size")


def test_truncated_file(runs: Path, tmp_path: Path) -> None:
    tag = _tag_copy(runs, tmp_path, "tp1dp2_z1")
    victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    _expect_error(tag, tmp_path, str(victim), "truncated")


def test_unsafe_pickle_refused(runs: Path, tmp_path: Path) -> None:
    tag = _tag_copy(runs, tmp_path, "tp1dp2_z1")
    victim = tag / "mp_rank_00_model_states.pt"
    states = torch.load(victim, weights_only=True, map_location="cpu")  # plain tensors + dicts
    states["client_state"] = NotAllowed()
    torch.save(states, victim)
    _expect_error(tag, tmp_path, str(victim), "NotAllowed", "refusing to unpickle")


def test_fragment_layout_mismatch(runs: Path, tmp_path: Path) -> None:
    from megatron_msg.checkpoint.deepspeed_files import _safe_globals

    tag = _tag_copy(runs, tmp_path, "tp1dp2_z1")
    victim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with torch.serialization.safe_globals(_safe_globals()):
        states = torch.load(victim, weights_only=True, map_location="cpu")
    mapping = states["optimizer_state_dict"]["param_slice_mappings"][0]
    first = next(iter(mapping))
    mapping[first].numel -= 1  # one element of the parameter lost
    torch.save(states, victim)
    _expect_error(tag, tmp_path, first, "elements")


def test_missing_checkpoint_and_tag(tmp_path: Path) -> None:
    from megatron_msg.checkpoint.deepspeed_files import DeepSpeedCheckpointError, find_tag_dir

    with pytest.raises(DeepSpeedCheckpointError, match="no training checkpoint"):
        find_tag_dir(tmp_path)
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
    with pytest.raises(DeepSpeedCheckpointError, match=r"msg_meta\.json is missing"):
        find_tag_dir(tmp_path)


def test_pipeline_tied_copies_must_agree(runs: Path, tmp_path: Path) -> None:
    from megatron_msg.checkpoint.deepspeed_files import _safe_globals

    tag = _tag_copy(runs, tmp_path, "pp2_z1")
    victim = tag / "zero_pp_rank_0_mp_rank_01_optim_states.pt"  # the last stage
    with torch.serialization.safe_globals(_safe_globals()):
        states = torch.load(victim, weights_only=True, map_location="cpu")
    optim = states["optimizer_state_dict"]
    group, address = next(
        (g, m["4.tied_word"])
        for g, m in enumerate(optim["param_slice_mappings"])
        if "4.tied_word" in m
    )
    optim["base_optimizer_state"]["state"][group]["exp_avg"][address.start] += 1.0
    torch.save(states, victim)
    _expect_error(tag, tmp_path, "exp_avg of embed.word.weight differs", "'4.tied_word'")
