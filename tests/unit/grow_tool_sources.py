"""Source checkpoints for the growth-tool tests: a real small GPTModel plus synthetic Adam state."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from megatron_msg.checkpoint.canonical import CanonicalMeta, save_canonical
from megatron_msg.config import ModelConfig
from megatron_msg.model import GPTModel
from megatron_msg.parallel.groups import ProcessGroups

SMALL = ModelConfig(
    vocab_size=100,
    hidden_size=32,
    ffn_hidden_size=64,
    num_heads=2,
    head_dim=16,
    num_layers=2,
    max_seq_len=32,
)
# Every other variant at once: RMSNorm, SwiGLU (gate tensors), RoPE, untied head, no biases.
SMALL_VARIANT = SMALL.replace(
    norm="rmsnorm",
    activation="swiglu",
    position_embedding="rope",
    tie_embeddings=False,
    use_bias=False,
)
GROWN_SIZES = {"hidden": 48, "ffn": 96, "heads": 3, "layers": 4}
STEP = 7
# A tensor whose Adam step differs from the global step (e.g. it joined at a growth).
ODD_STEP = {"layers.0.mlp.fc1.weight": 5, "layers.1.attn.qkv.weight": 3}


def write_source(
    path: Path,
    config: ModelConfig = SMALL,
    *,
    seed: int = 1,
    masks: dict[str, torch.Tensor] | None = None,
    shard_bytes: int = 40_000,
) -> dict[str, dict[str, torch.Tensor]]:
    """Write a canonical checkpoint of a real GPTModel with synthetic moments; return its tensors.

    ``shard_bytes`` is small so every kind spans several shard files.
    """
    model = GPTModel(config, groups=ProcessGroups.single(), init_seed=seed)
    weights = model.to_canonical()
    gen = torch.Generator().manual_seed(seed + 100)
    exp_avg = {n: torch.randn(t.shape, generator=gen) * 1e-3 for n, t in weights.items()}
    exp_avg_sq = {n: torch.rand(t.shape, generator=gen) * 1e-6 for n, t in weights.items()}
    weights.update(masks or {})
    meta = CanonicalMeta(
        model=config,
        step=STEP,
        stage=2,
        adam_step=dict(ODD_STEP),
        data={"consumed_samples": 1234},
        lr={"last_lr": 1e-4},
    )
    save_canonical(
        path,
        weights=weights,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        meta=meta,
        shard_bytes=shard_bytes,
    )
    return {"weights": weights, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (names relative), plus each file's mode and mtime."""
    out = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        out[str(file.relative_to(path))] = f"{digest} {stat.st_mode:o} {stat.st_mtime_ns}"
    return out


def siblings(path: Path) -> list[str]:
    """Everything next to ``path`` whose name mentions it (temporary directories included)."""
    return sorted(p.name for p in path.parent.iterdir() if path.name in p.name)
