"""`megatron-msg train` from a canonical checkpoint (``checkpoint.load``) at another topology.

Two launches of real DeepSpeed runs of a tiny GPT on gloo (shared by every test, see ``runs``):

1. four ranks: the headline source run, TP=2 x DP=2 with ZeRO-1 in fp32, 2 steps; it
   is converted (``convert_to_canonical``) and grown (``grow_checkpoint``: hidden
   32->48, ffn 64->96, heads 2->4, layers 2->3, masks at 0, ramp over 3 steps). The
   probe-batch loss of the small model is recorded. The grown store is resumed at
   TP=2/PP=2/DP=1 (pipeline engine, selective recomputation), as below.
2. two ranks:
   - the same for a bf16 source (TP=2/DP=1, ZeRO-1) and a ZeRO-2 source (TP=1/DP=2);
   - reshard only: an uninterrupted 8-step run (TP=2/DP=1, ZeRO-1, with full activation
     recomputation, which must change nothing) and the same 8 steps
     in four segments of 2, each converted and resumed at the next topology
     TP=2/DP=1 -> TP=1/DP=2 -> TP=2/DP=1 (ZeRO-0) -> TP=1/DP=2 (three changes); then
     segment 2 restarted with ``checkpoint.load`` naming a later store resumes from its
     own run directory (the run-dir checkpoint wins);
   - the grown stores resumed: fp32 ZeRO-1 at TP=1/DP=2 and at TP=1/PP=2/DP=1 (the
     pipeline engine, full recomputation; both pipeline runs' losses must equal the
     TP=1/DP=2 run's within 2e-5), bf16 at TP=1/DP=2 (ZeRO-1), ZeRO-2 at TP=2/DP=1; first the probe loss and the live canonical state (gathered
     through DeepSpeed's safe_get_full_*), then 4 more steps.

Expected (tolerances): reshard losses equal the uninterrupted run's within 2e-5
relative (fp32; only TP/DP reduction order differs); after growth the probe loss
equals the small model's within 1e-5 relative in fp32 (1e-3 in bf16, whose
matmuls round differently at other shapes), the live fp32 masters and both moments
equal the grown store bitwise, and so their old entries equal the source's
bitwise; the loss then falls; every input directory is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.dist_utils import run_distributed
from tests.tiny_run import TINY_RUN

BASE = [
    *TINY_RUN,
    "lr.warmup_steps=1",
    "lr.decay_steps=12",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.interval=0",
]
GROWN = {"hidden_size": 48, "ffn_hidden_size": 96, "num_heads": 4, "num_layers": 3}
GROW_SIZES = {"hidden": 48, "ffn": 96, "heads": 4, "layers": 3}  # grow_checkpoint's names
SOURCE_STEPS, GROWN_STEPS = 2, 6
TOTAL_STEPS = 12  # train.steps of runs that stop early (advance): no final save
SOURCES = {  # name: (world size, source topology, resume topology)
    "fp32_z1": (
        4,
        ["parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=1"],
        ["parallel.dp=2", "parallel.zero_stage=1"],
    ),
    "bf16_z1": (
        2,
        ["parallel.tp=2", "parallel.zero_stage=1", "train.dtype=bf16"],
        ["parallel.dp=2", "parallel.zero_stage=1", "train.dtype=bf16"],
    ),
    "fp32_z2": (
        2,
        ["parallel.dp=2", "parallel.zero_stage=2"],
        ["parallel.tp=2", "parallel.zero_stage=2"],
    ),
}
# name: (source, world size, resume topology); the pipeline cases resume the fp32
# ZeRO-1 store at PP=2 (the headline TP=2/PP=2/DP=1 on the four ranks).
RESUMES = {name: (name, 2, topology) for name, (_, _, topology) in SOURCES.items()}
# They also recompute activations (full, selective), which must change no loss.
RESUMES["fp32_z1_pp2"] = (
    "fp32_z1",
    2,
    ["parallel.pp=2", "parallel.zero_stage=1", "train.recompute=full"],
)
RESUMES["fp32_z1_tp2pp2"] = (
    "fp32_z1",
    4,
    ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1", "train.recompute=selective"],
)
SEGMENTS = [  # (parallel overrides, steps at the end of the segment)
    (["parallel.tp=2", "parallel.zero_stage=1"], 2),
    (["parallel.dp=2", "parallel.zero_stage=1"], 4),
    (["parallel.tp=2", "parallel.zero_stage=0"], 6),
    (["parallel.dp=2", "parallel.zero_stage=1"], 8),
]
KINDS = ("weights", "exp_avg", "exp_avg_sq")


def tree_digest(path: Path) -> str:
    """Hash of every entry's relative path and every file's bytes under ``path``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*")):
        digest.update(str(file.relative_to(path)).encode())
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _trainer(overrides: list[str]):
    from megatron_msg.training.config import load_config
    from megatron_msg.training.loop import Trainer

    return Trainer(load_config(None, [*BASE, *overrides]))


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value))


# ---- launch 1: sources (4 ranks) ------------------------------------------------


def _sources_body(rank: int, world_size: int, root: str) -> None:
    import torch.distributed as dist

    from megatron_msg.checkpoint.deepspeed_io import convert_to_canonical
    from megatron_msg.growth.grow_tool import GrowOptions, grow_checkpoint

    base = Path(root)
    for name, (world, overrides, _) in SOURCES.items():
        if world != world_size:
            continue
        run = base / name / "run"
        trainer = _trainer([f"train.steps={SOURCE_STEPS}", f"train.run_dir={run}", *overrides])
        trainer.run()
        probe = trainer.engine.eval_loss(*trainer.probe)
        trainer.engine.destroy()
        if rank == 0:
            before = tree_digest(run)
            convert_to_canonical(load=run, save=base / name / "small")
            small = tree_digest(base / name / "small")
            grow_checkpoint(
                load=base / name / "small",
                save=base / name / "grown",
                sizes=GROW_SIZES,
                options=GrowOptions(ramp_steps=3, progress=False),
            )
            info = {
                "probe": probe,
                "losses": trainer.summary.losses,
                "run_unchanged": before == tree_digest(run),
                "small_unchanged": small == tree_digest(base / name / "small"),
            }
            _write_json(base / name / "source.json", info)
        dist.barrier()
    if world_size == 4:
        for name, (_, world, _) in RESUMES.items():
            if world == world_size:
                _grown_resume(rank, base, name)


# ---- launch 2: reshard chain and grown resumes (2 ranks) ------------------------


def _reshard_chain(rank: int, base: Path) -> None:
    import torch.distributed as dist

    from megatron_msg.checkpoint.deepspeed_io import convert_to_canonical

    reference = _trainer(
        [
            "parallel.tp=2",
            "parallel.zero_stage=1",
            "train.recompute=full",  # recomputation changes nothing: the segments run without
            f"train.steps={TOTAL_STEPS}",
            f"train.run_dir={base / 'ref'}",
        ]
    )
    reference.advance(to=SEGMENTS[-1][1])
    reference.close()
    reference.engine.destroy()
    results: dict[str, object] = {"reference": reference.summary.losses, "segments": []}
    previous: Path | None = None
    for index, (parallel, steps) in enumerate(SEGMENTS):
        run = base / f"seg{index}"
        load = [] if previous is None else [f"checkpoint.load={previous}"]
        digest = tree_digest(previous) if previous is not None and rank == 0 else ""
        trainer = _trainer([*parallel, f"train.steps={steps}", f"train.run_dir={run}", *load])
        start = trainer.step
        trainer.run()
        trainer.engine.destroy()
        if rank == 0:
            unchanged = previous is None or digest == tree_digest(previous)
            segment = {"start": start, "losses": trainer.summary.losses, "unchanged": unchanged}
            results["segments"].append(segment)  # type: ignore[union-attr]
            convert_to_canonical(load=run, save=base / f"canon{index}")
        dist.barrier()
        previous = base / f"canon{index}"
    results["run_dir_wins"] = _run_dir_wins(base)
    if rank == 0:
        _write_json(base / "reshard.json", results)


def _run_dir_wins(base: Path) -> list[object]:
    """Segment 1 restarted with checkpoint.load naming a later store: its own checkpoint wins."""
    parallel, steps = SEGMENTS[1]
    trainer = _trainer(
        [
            *parallel,
            f"train.steps={steps}",
            f"train.run_dir={base / 'seg1'}",
            f"checkpoint.load={base / 'canon2'}",
        ]
    )
    trainer.close()
    trainer.engine.destroy()
    return [trainer.step, trainer.summary.resumed_from]


def _grown_resume(rank: int, base: Path, name: str) -> None:
    import torch.distributed as dist

    source, _, topology = RESUMES[name]
    grown = base / source / "grown"
    digest = tree_digest(grown) if rank == 0 else ""
    model = [f"model.{k}={v}" for k, v in GROWN.items()]
    trainer = _trainer(
        [
            *model,
            *topology,
            f"train.steps={TOTAL_STEPS}",
            f"train.run_dir={base / name / 'resumed'}",
            f"checkpoint.load={grown}",
        ]
    )
    start, stage = trainer.step, trainer.stage
    probe = trainer.engine.eval_loss(*trainer.probe)
    state = trainer.engine.get_state()
    ramp = None if trainer.ramp is None else trainer.ramp.state_dict()
    trainer.advance(to=GROWN_STEPS)
    trainer.close()
    trainer.engine.destroy()
    if rank == 0:
        tensors = {f"{k}/{n}": t for k in KINDS for n, t in getattr(state, k).items()}
        tensors |= {f"masks/{n}": t for n, t in state.masks.items()}
        (base / name).mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(base / name / "live.st"))
        info = {
            "start": start,
            "stage": stage,
            "adam_step": state.step,
            "probe": probe,
            "losses": trainer.summary.losses,
            "ramp": None if ramp is None else {k: ramp[k] for k in ("ramp_steps", "steps_done")},
            "unchanged": digest == tree_digest(grown),
        }
        _write_json(base / name / "resumed.json", info)
    dist.barrier()


def _resume_body(rank: int, world_size: int, root: str) -> None:
    base = Path(root)
    _sources_body(rank, world_size, root)
    _reshard_chain(rank, base)
    for name, (_, world, _) in RESUMES.items():
        if world == world_size:
            _grown_resume(rank, base, name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reshard_resume")
    run_distributed(_sources_body, world_size=4, args=(str(root),), timeout=400)
    run_distributed(_resume_body, world_size=2, args=(str(root),), timeout=400)
    return root


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- tests ----------------------------------------------------------------------


def test_reshard_chain_continues_the_uninterrupted_run(runs: Path) -> None:
    result = _read(runs / "reshard.json")
    reference = {int(k): v for k, v in result["reference"].items()}
    assert sorted(reference) == list(range(1, 9))
    seen: dict[int, float] = {}
    for index, segment in enumerate(result["segments"]):
        assert segment["start"] == SEGMENTS[index - 1][1] if index else segment["start"] == 0
        assert segment["unchanged"], f"segment {index} changed its input store"
        seen |= {int(k): v for k, v in segment["losses"].items()}
    assert sorted(seen) == sorted(reference)
    for step, loss in reference.items():
        assert seen[step] == pytest.approx(loss, rel=2e-5, abs=0), step
    assert reference[8] < reference[1] - 0.1  # it learned: the comparison is not trivial
    assert result["run_dir_wins"] == [4, "step_00000004"]


@pytest.mark.parametrize("name", list(RESUMES))
def test_grown_resume_preserves_function_and_state(runs: Path, name: str) -> None:
    from megatron_msg.checkpoint.canonical import load_canonical
    from megatron_msg.growth.operators import plan_growth

    origin = runs / RESUMES[name][0]
    source, resumed = _read(origin / "source.json"), _read(runs / name / "resumed.json")
    assert resumed["start"] == SOURCE_STEPS and resumed["stage"] == 0
    assert resumed["adam_step"] == SOURCE_STEPS
    assert resumed["ramp"] == {"ramp_steps": 3, "steps_done": 0}
    tolerance = 1e-3 if name.startswith("bf16") else 1e-5
    assert resumed["probe"] == pytest.approx(source["probe"], rel=tolerance, abs=0)

    small, grown = load_canonical(origin / "small"), load_canonical(origin / "grown")
    live = load_file(str(runs / name / "live.st"))
    for kind in KINDS:  # the live engine holds exactly the grown store ...
        stored = getattr(grown, kind)
        names = {k.partition("/")[2] for k in live if k.startswith(kind + "/")}
        params = {n for n in stored if ".masks." not in n and not n.startswith("masks.")}
        assert names == params, kind
        for tensor_name in names:
            assert torch.equal(live[f"{kind}/{tensor_name}"], stored[tensor_name]), tensor_name
    masks = {k.partition("/")[2]: v for k, v in live.items() if k.startswith("masks/")}
    assert masks and all(float(v.min()) == 0.0 for n, v in masks.items() if n != "masks.hidden")
    shapes = {n: tuple(t.shape) for n, t in small.weights.items()}
    plan = plan_growth(shapes, small.meta.model, grown.meta.model)
    checked = 0
    for tensor_name, tmap in plan.maps.tensors.items():  # ... whose old entries are the source's
        if tmap.source is None or tmap.source not in small.exp_avg:  # new, or a mask
            continue
        for kind in KINDS:
            old = getattr(small, kind)[tmap.source]
            assert torch.equal(live[f"{kind}/{tensor_name}"][tmap.index], old), (kind, tensor_name)
            checked += 1
    assert checked >= 3 * len(small.exp_avg)
    assert float(small.exp_avg_sq["final_norm.weight"].abs().sum()) > 0  # real moments


@pytest.mark.parametrize("name", list(RESUMES))
def test_grown_training_continues_and_loss_falls(runs: Path, name: str) -> None:
    resumed = _read(runs / name / "resumed.json")
    losses = {int(k): v for k, v in resumed["losses"].items()}
    assert sorted(losses) == list(range(SOURCE_STEPS + 1, GROWN_STEPS + 1))
    values = [losses[s] for s in sorted(losses)]
    assert all(v == v for v in values)  # finite
    assert sum(values[-2:]) / 2 < values[0]


@pytest.mark.parametrize("name", ["fp32_z1_pp2", "fp32_z1_tp2pp2"])
def test_pipeline_resumes_train_like_the_data_parallel_one(runs: Path, name: str) -> None:
    reference = _read(runs / "fp32_z1" / "resumed.json")["losses"]
    losses = _read(runs / name / "resumed.json")["losses"]
    assert losses.keys() == reference.keys()
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=2e-5, abs=0), step


@pytest.mark.parametrize("name", list(RESUMES))
def test_inputs_are_byte_identical(runs: Path, name: str) -> None:
    origin = runs / RESUMES[name][0]
    source, resumed = _read(origin / "source.json"), _read(runs / name / "resumed.json")
    assert source["run_unchanged"] and source["small_unchanged"] and resumed["unchanged"]
