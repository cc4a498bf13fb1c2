"""`megatron-msg grow` and tools/grow_checkpoint.py end to end: growth from a stage YAML or
explicit sizes, every bad-input case (clear error, nothing written), input never modified."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from megatron_msg import cli
from megatron_msg.checkpoint.canonical import load_canonical
from megatron_msg.growth.verify import measure_preservation
from tests.unit.grow_tool_sources import SMALL, siblings, tree_digest, write_source

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("source") / "stage1"
    write_source(path)
    return path


def _stage_yaml(path: Path, **model: object) -> Path:
    """A next-stage training config like examples/*/stageN.yaml (with a plan: section)."""
    sizes = {"hidden_size": 48, "ffn_hidden_size": 96, "num_heads": 3, "num_layers": 4}
    config = {
        "model": {**SMALL.to_dict(), **sizes, **model},
        "parallel": {"tp": 1, "pp": 2, "dp": 1, "zero_stage": 1},
        "batch": {"micro_batch_size": 2, "global_batch_size": 4},
        "train": {"steps": 10},
        "plan": {"gpus": 2, "gpu_memory_gb": 80},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _grow(*args: str | Path) -> int:
    return cli.main(["grow", *map(str, args), "--no-progress"])


def test_cli_grows_from_a_stage_config(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_digest(source)
    config = _stage_yaml(tmp_path / "stage2.yaml")
    save = tmp_path / "stage2_grown"
    assert _grow("--load", source, "--save", save, "--target-config", config) == 0
    out = capsys.readouterr().out
    assert "(32, 64, 2, 2) -> (48, 96, 3, 4)" in out
    assert "verification: full check on a probe batch: ok" in out
    assert tree_digest(source) == before
    small, grown = load_canonical(source), load_canonical(save)
    assert grown.meta.model.num_layers == 4 and grown.meta.masks["ramp"]["ramp_steps"] == 100
    tokens = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(3))
    report = measure_preservation(
        small.weights, small.meta.model, grown.weights, grown.meta.model, tokens=tokens
    )
    assert report.max_abs_logits <= 1e-5, report
    assert siblings(save) == [save.name]  # no temporary directories left behind


def test_tool_script_layer_by_layer_with_progress(source: Path, tmp_path: Path) -> None:
    before = tree_digest(source)
    save = tmp_path / "grown"
    args = ["--load", source, "--save", save, "--hidden", "64", "--layers", "3", "--verify"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "grow_checkpoint.py"), *map(str, args), "layers"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "B/s" in proc.stderr  # the progress bar reports throughput
    assert "layers check on a probe batch: ok" in proc.stdout
    meta = json.loads((save / "meta.json").read_text())
    assert meta["model"]["hidden_size"] == 64 and meta["model"]["num_layers"] == 3
    assert meta["model"]["num_heads"] == 2  # sizes not given stay as they were
    assert tree_digest(source) == before


def _missing_shard(src: Path) -> str:
    victim = sorted(src.glob("exp_avg-00002-of-*.safetensors"))[0]
    victim.unlink()
    return f"{victim.name}: shard file is missing"


def _truncated(src: Path) -> str:
    victim = sorted(src.glob("weights-00001-of-*.safetensors"))[0]
    os.truncate(victim, victim.stat().st_size - 100)
    return "truncated"


def _meta_shapes(src: Path) -> str:
    meta = json.loads((src / "meta.json").read_text())
    meta["model"]["hidden_size"] = 40  # the tensors are 32 wide
    (src / "meta.json").write_text(json.dumps(meta))
    return "wrong shape: embed.word.weight (128, 32) (expected (128, 40))"


def _nothing(src: Path) -> str:
    return ""


BAD_SOURCES: dict[str, tuple[Callable[[Path], str], list[str]]] = {
    "missing-shard": (_missing_shard, ["--hidden", "48"]),
    "truncated-file": (_truncated, ["--hidden", "48"]),
    "meta-config-vs-shapes": (_meta_shapes, ["--hidden", "48"]),
    "shrinking-target": (_nothing, ["--hidden", "16", "--layers", "4"]),
    "same-shape": (_nothing, ["--hidden", "32"]),
    "tp-not-holdable": (_nothing, ["--heads", "3", "--tp", "2"]),
    "bad-ramp-steps": (_nothing, ["--hidden", "48", "--ramp-steps", "0"]),
}
MESSAGES = {
    "shrinking-target": "growth cannot shrink the model: hidden_size 32 -> 16",
    "same-shape": "nothing to grow",
    "tp-not-holdable": "num_heads (3) must be divisible by tensor parallel size (2)",
    "bad-ramp-steps": "ramp_steps must be a positive integer, got 0",
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_input_errors_clearly_and_writes_nothing(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    src = tmp_path / "src"
    shutil.copytree(source, src)
    corrupt, args = BAD_SOURCES[case]
    message = corrupt(src) or MESSAGES[case]
    before = tree_digest(src)
    save = tmp_path / "out"
    assert _grow("--load", src, "--save", save, *args) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert "nothing was written" in err
    assert tree_digest(src) == before
    assert siblings(save) == []


def test_mismatched_target_config(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_digest(source)
    save = tmp_path / "out"
    for model, message in [
        ({"head_dim": 32}, "growth cannot change head_dim: 16 -> 32"),
        ({"vocab_size": 200}, "growth cannot change vocab_size: 100 -> 200"),
        ({"hiden_size": 48}, "unknown model option(s) ['hiden_size']"),
    ]:
        config = _stage_yaml(tmp_path / "stage2.yaml", **model)
        assert _grow("--load", source, "--save", save, "--target-config", config) == 1
        assert message in capsys.readouterr().err
        assert siblings(save) == [] and tree_digest(source) == before
    config = _stage_yaml(tmp_path / "stage2.yaml")
    assert _grow("--load", source, "--save", save, "--target-config", config, "--hidden", "64") == 1
    assert "not both" in capsys.readouterr().err


def test_existing_output_needs_overwrite(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save = tmp_path / "out"
    save.mkdir()
    (save / "keep.txt").write_text("not a checkpoint")
    before = tree_digest(source)
    assert _grow("--load", source, "--save", save, "--hidden", "48") == 1
    assert f"output {save} already exists; pass --overwrite" in capsys.readouterr().err
    assert (save / "keep.txt").read_text() == "not a checkpoint"
    assert _grow("--load", source, "--save", save, "--hidden", "48", "--overwrite") == 0
    assert not (save / "keep.txt").exists() and (save / "meta.json").is_file()
    assert siblings(save) == [save.name] and tree_digest(source) == before


def test_paths_and_option_names(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_digest(source)
    assert _grow("--load", source, "--save", source / "inside", "--hidden", "48") == 1
    assert "overlap" in capsys.readouterr().err
    assert _grow("--load", tmp_path / "nowhere", "--save", tmp_path / "o", "--hidden", "48") == 1
    assert "no canonical checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _grow("--load", source, "--save", tmp_path / "o", "--hiden", "48")
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --hiden" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _grow("--load", source, "--save", tmp_path / "o", "--moment-policy", "adam")
    assert "invalid choice: 'adam'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and tree_digest(source) == before
