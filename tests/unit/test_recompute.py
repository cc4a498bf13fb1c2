"""Activation recomputation: same losses and gradients (bitwise, with dropout), less kept memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.model import GPTModel
from megatron_msg.parallel.groups import ProcessGroups
from megatron_msg.training.config import load_config

CONFIG = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    ffn_hidden_size=64,
    num_heads=4,
    head_dim=8,
    num_layers=3,
    max_seq_len=32,
    dropout=0.2,
)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    sample = torch.randint(0, CONFIG.vocab_size, (2, 17), generator=gen)
    return sample[:, :-1], sample[:, 1:]


def _run(mode: str, *, steps: int = 2) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """Losses of ``steps`` forward/backward passes, the last gradients, saved bytes of the last."""
    model = GPTModel(CONFIG, groups=ProcessGroups.single(), init_seed=3)
    model.set_recompute(mode)
    model.train()
    tokens, labels = _batch()
    losses, saved = [], [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        saved[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.loss(tokens, labels)
        loss.backward()
        losses.append(float(loss.detach()))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert model.rng is not None
    after = model.rng.state_dict()["default"]
    return losses, grads | {"rng.default": after.float()}, saved[0]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_matches_plain_bitwise_with_dropout(mode: str) -> None:
    base_losses, base_grads, base_saved = _run("none")
    losses, grads, saved = _run(mode)
    assert losses == base_losses  # fp32, same ops in the same order: bitwise
    assert losses[0] != losses[1]  # dropout is live: the two passes drew different masks
    # The recomputation replays the dropout streams without advancing them: the
    # "rng.default" entry (stream state after the run) matches too.
    assert grads.keys() == base_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, base_grads[name]), name
    assert saved < base_saved


def test_full_keeps_less_than_selective() -> None:
    *_, full = _run("full", steps=1)
    *_, selective = _run("selective", steps=1)
    *_, none = _run("none", steps=1)
    assert full < selective < none


def test_eval_and_no_grad_do_not_checkpoint() -> None:
    model = GPTModel(CONFIG, groups=ProcessGroups.single(), init_seed=3)
    tokens, _ = _batch()
    model.eval()
    reference = model(tokens)
    model.set_recompute("full")
    with torch.no_grad():
        assert torch.equal(model(tokens), reference)


def test_bad_mode_is_named() -> None:
    model = GPTModel(CONFIG, groups=ProcessGroups.single(), init_seed=3)
    with pytest.raises(ValueError, match="'some'"):
        model.set_recompute("some")
    with pytest.raises(ConfigError, match=r"train\.recompute must be one of"):
        load_config(
            None,
            [f"model.{k}={v}" for k, v in CONFIG.to_dict().items() if v is not None]
            + ["train.recompute=some"],
        )


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES.glob("*/stage*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_example_stage_configs_are_training_configs(path: Path) -> None:
    """The planner's stage YAMLs (with their plan: section) pass the training validation."""
    config = load_config(path)
    p = config.parallel
    resolved = config.resolve(world_size=p.tp * p.pp * p.dp)
    assert resolved.train.recompute == ("full" if path.parent.name == "flm101b" else "none")
    assert resolved.plan.gpu_memory_gb > 0
    with pytest.raises(ConfigError, match="world size"):
        config.resolve(world_size=1)
