"""Throughput, model FLOPs utilisation, and the run's logs (JSONL, TensorBoard, console).

FLOPs are *model* FLOPs (what the network computes, not what the hardware did
with recomputation): a training token costs 3x its forward FLOPs (forward, and
twice that for the backward). A grown model computes at its full size while
its masks ramp, so the current config is always what counts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from megatron_msg.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s); fp32 runs use the TF32 figure (half).
_GPU_PEAK_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40", 181e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("V100", 125e12),
)
# A rough CPU figure per core: AVX2 FMA, 2 x 8 fp32 lanes x 2 ops at ~3 GHz.
_CPU_FLOPS_PER_CORE = 96e9


def forward_flops_per_token(config: ModelConfig, *, seq_len: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one token of a ``seq_len`` sequence.

    Counts every matmul: qkv, attention scores and weighted values (full square,
    as Megatron and PaLM count it), output projection, MLP (two up-projections
    for SwiGLU) and the logits. Norms, softmax and embeddings are negligible.
    """
    h, f, n_layers = config.hidden_size, config.ffn_hidden_size, config.num_layers
    inner = config.num_heads * config.head_dim
    up_projections = 2 if config.activation == "swiglu" else 1
    per_layer = (
        2 * h * 3 * inner  # qkv
        + 2 * 2 * seq_len * inner  # q @ k^T and p @ v
        + 2 * inner * h  # attn.proj
        + 2 * h * f * up_projections  # fc1 (and gate)
        + 2 * f * h  # fc2
    )
    logits = 2 * h * config.padded_vocab_size()
    return float(n_layers * per_layer + logits)


def training_flops_per_token(config: ModelConfig, *, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(config, seq_len=seq_len)


def default_peak_flops(*, device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of one device of this kind (a table for GPUs, a rough figure for CPUs)."""
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAK_BF16:
            if key in name:
                return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2
        return 100e12
    return _CPU_FLOPS_PER_CORE * torch.get_num_threads()


def mfu(*, tokens_per_s: float, flops_per_token: float, peak_flops: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    return tokens_per_s * flops_per_token / (peak_flops * devices)


class JsonlLog:
    """One JSON object per line; on resume, records after the resumed checkpoint are
    dropped first (they belong to the part of the interrupted run that is replayed)."""

    def __init__(self, path: str | os.PathLike[str], *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._handle: TextIO = self.path.open("a")

    def _truncate_after(self, step: int) -> None:
        # A checkpoint at step N is taken right after step N's record; anything else
        # stamped N (a growth event before step N+1) happened after it and is replayed.
        def kept(record: dict[str, Any]) -> bool:
            at = record.get("step", 0)
            return bool(at < step or (at == step and record.get("kind") == "step"))

        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines if kept(json.loads(line))))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


class TensorBoardLog:
    """Scalars to TensorBoard when ``torch.utils.tensorboard`` is importable (else inactive)."""

    def __init__(self, log_dir: str | os.PathLike[str], *, enabled: bool) -> None:
        self.writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: JSONL still has everything
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_step(record: dict[str, Any]) -> str:
    """The compact console line of one logged step."""
    parts = [
        f"step {record['step']}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
    ]
    if record.get("grad_norm") is not None:
        parts.append(f"gnorm {record['grad_norm']:.3f}")
    parts.append(f"tok/s {record['tokens_per_s']:.0f}")
    parts.append(f"mfu {100 * record['mfu']:.2f}%")
    if record.get("skipped"):
        parts.append(f"skipped {record['skipped']}")
    return " | ".join(parts)


class Console:
    """A tqdm progress bar over optimizer steps, with the compact line printed above it."""

    def __init__(self, *, total: int, initial: int, enabled: bool, progress_bar: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        if enabled and progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def step(self, line: str | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if line is not None:
                self.bar.write(line)
            self.bar.update(1)
        elif line is not None:
            print(line, file=sys.stdout, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
