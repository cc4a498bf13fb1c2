"""`megatron-msg grow` straight from a `megatron-msg train` checkpoint (DeepSpeed native files):
converted on the fly, grown exactly as the converted store would be, the run left untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_msg import cli
from megatron_msg.checkpoint.canonical import load_canonical
from megatron_msg.growth.grow_tool import GrowOptions, grow_checkpoint
from tests.tiny_run import TINY_MODEL_DATA
from tests.unit.grow_tool_sources import siblings, tree_digest

ROOT = Path(__file__).resolve().parents[2]
RUN = [
    *TINY_MODEL_DATA,
    "batch.micro_batch_size=4",
    "batch.grad_accum=1",
    "parallel.zero_stage=1",
    "train.steps=2",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]


def _train(run_dir: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_msg.train", *RUN, f"train.run_dir={run_dir}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_grow_from_a_training_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _train(run_dir)
    before = tree_digest(run_dir)
    grown = tmp_path / "grown"
    args = ["--load", run_dir, "--save", grown, "--hidden", "48", "--layers", "3", "--no-progress"]
    assert cli.main(["grow", *map(str, args)]) == 0
    assert tree_digest(run_dir) == before
    assert siblings(grown) == ["grown"]  # the converted copy is gone

    # The same as converting first and growing the canonical store.
    from megatron_msg.checkpoint.deepspeed_io import convert_to_canonical

    convert_to_canonical(load=run_dir, save=tmp_path / "converted")
    options = GrowOptions(progress=False, verify="off")
    sizes = {"hidden": 48, "layers": 3}
    grow_checkpoint(
        load=tmp_path / "converted", save=tmp_path / "ref", sizes=sizes, options=options
    )
    ours, ref = load_canonical(grown), load_canonical(tmp_path / "ref")
    for kind in ("weights", "exp_avg", "exp_avg_sq"):
        a, b = getattr(ours, kind), getattr(ref, kind)
        assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a), kind
    assert ours.meta.step == 2 and ours.meta.model.hidden_size == 48
    assert ours.meta.adam_step == ref.meta.adam_step and ours.meta.data == ref.meta.data
    assert ours.meta.masks == ref.meta.masks and ours.meta.lr == ref.meta.lr
