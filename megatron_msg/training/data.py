"""Training samples and their assignment to steps, micro-batches and data-parallel ranks.

Samples are addressed by a global index, so the data position of a run is one
number (consumed samples) and is independent of the model: after a growth
event or a resume the next step reads exactly the samples it would have read.
As in Megatron's pretraining sampler, the optimizer step ``t`` reads samples
``[t*G, (t+1)*G)`` (G = global batch); micro-batch ``m`` of data-parallel rank
``r`` takes the ``micro_batch_size`` consecutive ones at
``t*G + (m*dp + r)*micro``. Tensor-parallel ranks of one replica read the
same samples themselves (no broadcast needed).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.training.config import TrainConfig


class SampleSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> np.ndarray: ...


class SyntheticDataset:
    """Arithmetic token sequences for tests and smoke runs (no files needed).

    Sample ``i`` starts at a random token and steps by a random stride in 1..3
    (mod vocab), both drawn from ``(seed, i)``: a model must read two tokens to
    predict the third, so the loss falls steadily from ln(vocab) towards 0.
    """

    def __init__(self, *, vocab_size: int, seq_len: int, num_samples: int, seed: int) -> None:
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, idx])
        start = int(rng.integers(self.vocab_size))
        stride = int(rng.integers(1, 4))
        return (start + stride * np.arange(self.seq_len + 1, dtype=np.int64)) % self.vocab_size


def build_train_dataset(config: TrainConfig) -> SampleSource:
    """The training split for ``config.train.steps`` optimizer steps; collective (index caches)."""
    d = config.data
    needed = config.train.steps * config.batch.global_batch_size
    if d.source == "synthetic":
        return SyntheticDataset(
            vocab_size=config.model.vocab_size, seq_len=d.seq_len, num_samples=needed, seed=d.seed
        )
    train, _, _ = _indexed_splits(config, num_samples=(needed, 0, 0))
    if train is None:
        raise ValueError(f"data.split {d.split!r} leaves no training documents in {d.prefixes}")
    return train  # type: ignore[no-any-return]


def _indexed_splits(
    config: TrainConfig, *, num_samples: tuple[int, int, int]
) -> tuple[Any, Any, Any]:
    """(train, valid, test) GPT datasets of the indexed (optionally blended) data."""
    from megatron_msg.data.blended import build_gpt_datasets

    d = config.data
    data_path: list[str] = list(d.prefixes)
    if d.weights:
        data_path = [str(x) for pair in zip(d.weights, d.prefixes) for x in pair]
    return build_gpt_datasets(  # type: ignore[no-any-return]
        data_path=data_path, split=d.split, seq_length=d.seq_len, num_samples=num_samples,
        seed=d.seed,
    )  # fmt: skip


def validation_batches(
    config: TrainConfig, *, count: int, device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` fixed held-out batches of ``micro_batch_size`` sequences: the validation
    split of indexed data, or synthetic samples past the training range. The same for
    every model shape and seed (they depend on the data settings only); collective."""
    d, size = config.data, config.batch.micro_batch_size
    needed = config.train.steps * config.batch.global_batch_size
    if d.source == "synthetic":
        held_out = SyntheticDataset(
            vocab_size=config.model.vocab_size,
            seq_len=d.seq_len,
            num_samples=needed + count * size,
            seed=d.seed,
        )
        return [_batch(held_out, range(needed + i * size, needed + (i + 1) * size), device)
                for i in range(count)]  # fmt: skip
    _, valid, _ = _indexed_splits(config, num_samples=(needed, count * size, 0))
    if valid is None or len(valid) < count * size:
        have = 0 if valid is None else len(valid)
        raise ValueError(
            f"data.split {d.split!r} of {d.prefixes} leaves {have} validation samples, "
            f"fewer than the {count * size} wanted; use a bigger corpus or split"
        )
    return [_batch(valid, range(i * size, (i + 1) * size), device) for i in range(count)]


def step_micro_batches(
    dataset: SampleSource,
    *,
    step: int,
    config: TrainConfig,
    groups: ProcessGroups,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, labels) [micro, seq_len] of every micro-batch of this rank at optimizer step ``step``."""
    b = config.batch
    first = step * b.global_batch_size
    batches = []
    for micro in range(b.grad_accum):
        start = first + (micro * groups.dp_size + groups.dp_rank) * b.micro_batch_size
        batches.append(_batch(dataset, range(start, start + b.micro_batch_size), device))
    return batches


def probe_batch(
    dataset: SampleSource, *, size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch (the first ``size`` samples) for before/after comparisons."""
    return _batch(dataset, range(min(size, len(dataset))), device)


def _batch(
    dataset: Any, indices: range, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(dataset[i], dtype=np.int64) for i in indices])  # [b, seq+1]
    sample = torch.from_numpy(rows).to(device)
    return sample[:, :-1].contiguous(), sample[:, 1:].contiguous()
