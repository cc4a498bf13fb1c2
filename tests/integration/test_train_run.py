"""A real DeepSpeed run of a tiny GPT on CPU (one spawned rank, ZeRO-1, grad accumulation 2).

One process is shared by several checks because DeepSpeed's start-up is slow on
CPU: loss falls; growth inside the run preserves the function on a fixed probe
batch (fp32, rel <= 1e-5) and leaves old fp32 weights, Adam moments and step
bitwise unchanged; the ramp advances once per optimizer step; a run stopped
mid-ramp and resumed from its checkpoint gives bitwise the same losses; a
non-finite loss skips the update and too many in a row stop the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed
from tests.tiny_run import TINY_MODEL_DATA

TINY = [
    *TINY_MODEL_DATA,
    "batch.micro_batch_size=4",
    "batch.grad_accum=2",
    "optimizer.lr=3e-3",
    "lr.warmup_steps=2",
    "lr.decay_steps=16",
    "lr.min_lr=3e-4",
    "lr.rewind_on_growth=true",
    "lr.rewarmup_steps=2",
    "growth.0.start_step=6",
    "growth.0.hidden_size=48",
    "growth.0.ffn_hidden_size=96",
    "growth.0.num_heads=3",
    "growth.0.ramp_steps=4",
    "growth.0.moment_policy=mean_sq",
    "growth.1.start_step=12",
    "growth.1.num_layers=3",
    "growth.1.ramp_steps=3",
    "parallel.zero_stage=1",
    "logging.interval=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.interval=5",
]


def _config(run_dir: str, *extra: str):
    from megatron_msg.training.config import load_config

    return load_config(None, [*TINY, f"train.run_dir={run_dir}", *extra])


def _leading(tensor, shape):
    return tensor[tuple(slice(0, s) for s in shape)]


def _check_growth_keeps_old_state(trainer) -> dict:
    """Grow at the current step: old entries of every tensor must be bitwise unchanged,
    new moment entries must follow the stage's moment policy."""
    import torch

    before = trainer.engine.get_state()
    event = trainer.maybe_grow()
    assert event is not None
    policy = trainer.config.growth[event["stage"] - 1].moment_policy
    after = trainer.engine.get_state()
    assert after.step == before.step > 0
    rel = abs(event["loss_after"] - event["loss_before"]) / event["loss_before"]
    assert rel <= 1e-5, event
    for part in ("weights", "exp_avg", "exp_avg_sq"):
        old, new = getattr(before, part), getattr(after, part)
        for name, value in old.items():
            assert torch.equal(_leading(new[name], value.shape), value), (part, name)
            if part != "weights" and new[name].shape != value.shape:
                fresh = torch.ones_like(new[name], dtype=torch.bool)
                fresh[tuple(slice(0, s) for s in value.shape)] = False
                entries = new[name][fresh]
                if part == "exp_avg_sq" and policy == "mean_sq":
                    assert bool((entries > 0).all()), name  # the mean of the old entries
                else:
                    assert bool((entries == 0).all()), (part, name)
    return event


def _write_indexed(prefix: str, *, seed: int, documents: int) -> None:
    """Arithmetic token documents of random length, as a Megatron .bin/.idx pair."""
    import numpy as np

    from megatron_msg.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for _ in range(documents):
            start, stride, length = rng.integers(64), rng.integers(1, 4), rng.integers(8, 40)
            writer.add_document((start + stride * np.arange(length)) % 64)


def _indexed_run(tmp: str) -> None:
    """The same loop on a blend of two indexed datasets (the real data path)."""
    from megatron_msg.training.loop import Trainer

    prefixes = [os.path.join(tmp, "data", name) for name in ("a", "b")]
    for seed, prefix in enumerate(prefixes):
        _write_indexed(prefix, seed=seed, documents=200)
    overrides = [
        "data.source=indexed",
        f"data.prefixes=[{prefixes[0]}, {prefixes[1]}]",
        "data.weights=[0.7, 0.3]",
        "data.split=98,2,0",
        "growth=[]",
        "train.steps=6",
        "checkpoint.interval=0",
    ]
    trainer = Trainer(_config(os.path.join(tmp, "indexed"), *overrides))
    summary = trainer.run()
    assert type(trainer.dataset).__name__ == "BlendedDataset"
    assert summary.losses[6] < summary.losses[1] - 0.1, summary.losses


def _body(rank: int, world_size: int, tmp: str) -> None:
    import torch

    from megatron_msg.growth.masks import get_masks
    from megatron_msg.training.loop import Trainer, TrainingError

    # ---- one uninterrupted run, stepping through both growth events -----------------
    full = Trainer(_config(os.path.join(tmp, "full"), "train.steps=16"))
    full.advance(to=6)
    event = _check_growth_keeps_old_state(full)
    assert event["shape"] == [48, 96, 3, 2]
    full.advance(to=8)  # two optimizer steps (of 2 micro-batches each) into a 4-step ramp
    assert full.ramp is not None and full.ramp.steps_done == 2
    hidden = get_masks(full.engine.module)["masks.hidden"]
    assert torch.equal(hidden[:32], torch.ones(32)) and torch.equal(
        hidden[32:], torch.full((16,), 0.5)
    )
    full.advance(to=12)
    assert not get_masks(full.engine.module)  # ramp done: every mask folded
    event = _check_growth_keeps_old_state(full)
    assert event["shape"] == [48, 96, 3, 3]
    full.advance(to=16)
    full.close()
    losses = full.summary.losses
    assert sorted(losses) == list(range(1, 17))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (14, 15, 16)) / 3
    assert last < first - 0.3, losses

    with open(os.path.join(tmp, "full_losses.json"), "w") as handle:
        json.dump(losses, handle)

    # ---- non-finite loss: the update is skipped; 2 in a row stop the run -----------
    bad = Trainer(
        _config(
            os.path.join(tmp, "nan"),
            "train.steps=8",
            "train.max_nonfinite_in_row=2",
            "growth=[]",
            "checkpoint.interval=0",
        )
    )
    bad.advance(to=1)
    state = bad.engine.get_state()
    with torch.no_grad():
        bad.engine.module.final_norm.weight[0] = float("nan")  # the module copy the forward uses
    with pytest.raises(
        TrainingError, match=r"step 3: 2 consecutive steps .*max_nonfinite_in_row = 2"
    ):
        bad.run()
    assert bad.summary.skipped_steps == 2 and sorted(bad.summary.losses) == [1]
    after = bad.engine.get_state()
    assert after.step == state.step == 1
    assert all(torch.equal(after.weights[n], state.weights[n]) for n in state.weights)

    _indexed_run(tmp)


# Dies by SIGKILL in the middle of saving step 9 (mid-ramp: growth at 6, ramp 4),
# after DeepSpeed wrote its shards and before the checkpoint was published.
_KILLED_DURING_SAVE = """
import os, signal, sys
from megatron_msg.training import checkpoint
publish = checkpoint._publish
def dying_publish(root, tmp_dir, tag):
    if tag == "step_00000009":
        os.kill(os.getpid(), signal.SIGKILL)
    publish(root, tmp_dir, tag)
checkpoint._publish = dying_publish
from megatron_msg.train import main
sys.exit(main(sys.argv[1:]))
"""


def _train_cli(code: str | None, run_dir: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    args = [*TINY, f"train.run_dir={run_dir}", "train.steps=16", "checkpoint.interval=3"]
    command = (
        [sys.executable, "-c", code, *args]
        if code
        else [sys.executable, "-m", "megatron_msg.train", *args]
    )
    return subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)


def test_train_growth_resume_and_nonfinite(tmp_path):
    run_distributed(_body, world_size=1, args=(str(tmp_path),), timeout=400)
    full = {int(k): v for k, v in json.loads((tmp_path / "full_losses.json").read_text()).items()}

    run_dir = tmp_path / "killed"
    killed = _train_cli(_KILLED_DURING_SAVE, run_dir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"
    assert (checkpoints / ".tmp-step_00000009").is_dir()  # the interrupted save, never published

    resumed = _train_cli(None, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "step"}
    assert sorted(losses) == list(range(1, 17))  # the replayed steps 7-9 logged once
    assert losses == full  # bitwise: steps 1-6 before the kill, 7-16 after the resume
    assert [r["step"] for r in records if r["kind"] == "growth"] == [6, 12]
    assert sorted(p.name for p in checkpoints.iterdir() if "step" in p.name) == [
        "step_00000015",
        "step_00000016",
    ]
