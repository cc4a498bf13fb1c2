"""FLOPs per token (checked against a count of the model's own matmuls), MFU, logs, plot."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_msg.config import ModelConfig
from megatron_msg.plot import main as plot_main
from megatron_msg.training.metrics import (
    JsonlLog,
    format_step,
    forward_flops_per_token,
    mfu,
    read_jsonl,
    training_flops_per_token,
)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_flops_match_weight_matmuls(activation):
    """Every weight matrix costs 2 FLOPs per entry per token; attention adds 4*s*n*d per layer."""
    from megatron_msg.model import parameter_specs

    config = ModelConfig(
        vocab_size=100,
        hidden_size=48,
        ffn_hidden_size=96,
        num_heads=3,
        head_dim=16,
        num_layers=2,
        activation=activation,
        max_seq_len=32,
    )
    matmul_entries = sum(
        torch.Size(spec.shape).numel()
        for name, spec in parameter_specs(config).items()
        if name.endswith(".weight") and len(spec.shape) == 2 and "embed.pos" not in name
    )  # includes the tied embedding once: it is the logits matmul
    seq = 32
    attention = config.num_layers * 4 * seq * config.num_heads * config.head_dim
    assert forward_flops_per_token(config, seq_len=seq) == 2 * matmul_entries + attention
    assert training_flops_per_token(config, seq_len=seq) == 3 * forward_flops_per_token(
        config, seq_len=seq
    )


def test_mfu_arithmetic():
    assert mfu(
        tokens_per_s=1000.0, flops_per_token=1e9, peak_flops=1e12, devices=2
    ) == pytest.approx(0.5)


def test_jsonl_resume_drops_replayed_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLog(path)
    for step in range(1, 6):
        log.write({"kind": "step", "step": step, "loss": 1.0 / step})
        if step == 3:  # a growth event after step 3, i.e. after a checkpoint at step 3
            log.write({"kind": "growth", "step": 3})
    log.close()
    log = JsonlLog(path, resume_step=3)
    log.write({"kind": "step", "step": 4, "loss": 0.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [
        (1, 1.0),
        (2, 0.5),
        (3, 1 / 3),
        (4, 0.0),
    ]
    JsonlLog(path).close()  # a fresh run starts a fresh log
    assert read_jsonl(path) == []


def test_console_line():
    line = format_step(
        {
            "step": 7,
            "loss": 2.5,
            "lr": 1e-3,
            "grad_norm": 0.5,
            "tokens_per_s": 1234.4,
            "mfu": 0.0123,
            "skipped": 1,
        }
    )
    assert (
        line
        == "step 7 | loss 2.5000 | lr 1.00e-03 | gnorm 0.500 | tok/s 1234 | mfu 1.23% | skipped 1"
    )


def test_plot_writes_png(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"kind": "step", "step": s, "loss": 5.0 - 0.1 * s, "elapsed": 2.0 * s} for s in range(1, 21)
    ]
    records.insert(10, {"kind": "growth", "step": 10, "elapsed": 20.5, "shape": [64, 128, 4, 4]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_main([str(run)]) == 0
    data = (run / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # A directory without a log is a one-line error, not a traceback.
    assert plot_main([str(tmp_path)]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
