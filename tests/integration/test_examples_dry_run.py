"""Every launch script of examples/flm101b and examples/gpt2_msg resolves and plans with --dry-run.

The dry runs need no GPU, cluster or data: they check the configs with the
planner (strict: a layout that does not fit fails), resolve paths and the world
size against the hostfile, and print the command a real launch would run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLM = ROOT / "examples" / "flm101b"
GPT2 = ROOT / "examples" / "gpt2_msg"


def _dry_run(script: Path, *args: str, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HOSTFILE", "DATA_PREFIX", "CKPT_ROOT", "RUNS_ROOT", "EXAMPLE_DIR")
    }
    environ |= {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    environ |= env
    return subprocess.run(
        [
            "bash",
            str(script),
            *args,
            "--ckpt-root",
            str(tmp / "ckpt"),
            "--runs-root",
            str(tmp / "runs"),
        ],
        cwd=tmp,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _commands(out: str) -> list[str]:
    return [line.split("command: ", 1)[1] for line in out.splitlines() if "] command: " in line]


@pytest.mark.parametrize(
    ("script", "args", "launcher", "config"),
    [
        ("stage1_16b.sh", (), "deepspeed --hostfile", "stage1_16b.yaml"),
        ("grow_16b_to_51b.sh", (), "megatron_msg.cli grow --load", "stage2_51b.yaml"),
        ("stage2_51b.sh", (), "deepspeed --hostfile", "stage2_51b.yaml"),
        ("grow_51b_to_101b.sh", (), "megatron_msg.cli grow --load", "stage3_101b.yaml"),
        ("stage3_101b.sh", (), "deepspeed --hostfile", "stage3_101b.yaml"),
        (
            "slurm_stage.sbatch",
            ("stage2_51b",),
            "torchrun --nnodes 24 --nproc_per_node 8",
            "stage2_51b.yaml",
        ),
    ],
)
def test_flm_scripts_dry_run(
    tmp_path: Path, script: str, args: tuple[str, ...], launcher: str, config: str
) -> None:
    result = _dry_run(FLM / script, *args, "--dry-run", tmp=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    (command,) = _commands(out)
    assert launcher in command and str(FLM / config) in command
    assert "dry run done" in out and "-> fits" in out
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()
    if "grow" in script:
        assert f"--save {tmp_path}/ckpt/{config[:-5]}_grown" in command
        assert "grow " in out and "reads" in out and "writes" in out
    elif script.startswith("stage") and not script.startswith("stage1"):
        assert f"checkpoint.load={tmp_path}/ckpt/{config[:-5]}_grown" in command


def test_gpt2_workflow_dry_run(tmp_path: Path) -> None:
    result = _dry_run(GPT2 / "run.sh", "--dry-run", "--gpus-per-node", "8", tmp=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    commands = _commands(out)
    assert len(commands) == 7  # four training stages, three growth steps between them
    assert [("cli grow " in c) for c in commands] == [False, True, False, True, False, True, False]
    for k in range(1, 5):
        assert str(GPT2 / f"stage{k}.yaml") in commands[2 * (k - 1)]
    assert out.count("-> fits") == 4 and "MSG can grow num_heads" in out
    resumed = _dry_run(GPT2 / "run.sh", "--dry-run", "--from-stage", "3", tmp=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    later = _commands(resumed.stdout)  # grow 2 -> 3, train 3, grow 3 -> 4, train 4
    assert (
        len(later) == 4 and "cli grow --load" in later[0] and str(GPT2 / "stage3.yaml") in later[1]
    )
    assert "checkpoint of the stage before" in resumed.stdout


def test_dry_run_rejects_a_hostfile_of_the_wrong_size(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=8\nnode-b slots=8\n")
    result = _dry_run(FLM / "stage1_16b.sh", "--dry-run", "--hostfile", str(hosts), tmp=tmp_path)
    assert result.returncode != 0
    assert "= 192 to equal the GPUs (16)" in result.stdout
    assert "the planner rejected the configuration" in result.stderr


def test_real_launch_stops_on_missing_data_before_launching(tmp_path: Path) -> None:
    (tmp_path / "hostfile").write_text("".join(f"node{i} slots=8\n" for i in range(24)))
    result = _dry_run(FLM / "stage1_16b.sh", "--hostfile", str(tmp_path / "hostfile"), tmp=tmp_path)
    assert result.returncode == 1
    assert "error: indexed dataset" in result.stderr and "not found" in result.stderr
    assert "command:" not in result.stdout
