"""Learning-rate schedule: linear warmup, cosine/linear/constant decay, rewind at growth.

The learning rate is a pure function of the optimizer step and of the last
rewind, so a resumed run reproduces it exactly from :meth:`LRSchedule.state_dict`.

Rewind (MSG paper for the first growths; FLM-101B at every stage): at a growth
event at step ``g`` the rate restarts from ``min_lr``, rises linearly to the
peak over ``rewarmup_steps`` and then decays again to ``min_lr`` at
``decay_steps``, so the new units are trained at a useful rate instead of at
the tail of the old schedule.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_msg.config import ConfigError

DECAY_STYLES = ("cosine", "linear", "constant")


class LRSchedule:
    """``lr_at(step)`` for 0-based optimizer step ``step``."""

    def __init__(
        self,
        *,
        peak_lr: float,
        min_lr: float = 0.0,
        warmup_steps: int = 0,
        decay_steps: int,
        decay_style: str = "cosine",
        rewarmup_steps: int = 0,
    ) -> None:
        if decay_style not in DECAY_STYLES:
            raise ConfigError(f"decay_style must be one of {DECAY_STYLES}, got {decay_style!r}")
        if not 0.0 <= min_lr <= peak_lr:
            raise ConfigError(f"need 0 <= min_lr ({min_lr}) <= peak_lr ({peak_lr})")
        if warmup_steps < 0 or rewarmup_steps < 0 or decay_steps < warmup_steps:
            raise ConfigError(
                f"need 0 <= warmup_steps ({warmup_steps}) <= decay_steps ({decay_steps}) "
                f"and rewarmup_steps ({rewarmup_steps}) >= 0"
            )
        self.peak_lr, self.min_lr = peak_lr, min_lr
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.decay_style, self.rewarmup_steps = decay_style, rewarmup_steps
        # The current segment: starts at anchor_step, warms up from anchor_lr.
        self.anchor_step = 0
        self.anchor_lr = 0.0
        self.anchor_warmup = warmup_steps
        self.rewinds: list[int] = []

    def lr_at(self, step: int) -> float:
        if step < self.anchor_step:
            raise ValueError(f"step ({step}) is before the last rewind ({self.anchor_step})")
        into = step - self.anchor_step
        if into < self.anchor_warmup:
            frac = (into + 1) / self.anchor_warmup
            return self.anchor_lr + (self.peak_lr - self.anchor_lr) * frac
        start = self.anchor_step + self.anchor_warmup
        span = self.decay_steps - start
        progress = 1.0 if span <= 0 else min(max((step - start) / span, 0.0), 1.0)
        return self._decayed(progress)

    def _decayed(self, progress: float) -> float:
        if self.decay_style == "constant":
            return self.peak_lr
        if self.decay_style == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.peak_lr - self.min_lr) * factor

    def rewind(self, *, step: int) -> None:
        """Restart at ``step``: from ``min_lr`` up to the peak over ``rewarmup_steps``, then decay."""
        if step < self.anchor_step:
            raise ValueError(f"rewind step ({step}) is before the last rewind ({self.anchor_step})")
        self.anchor_step, self.anchor_lr = step, self.min_lr
        self.anchor_warmup = self.rewarmup_steps
        self.rewinds.append(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor_step": self.anchor_step,
            "anchor_lr": self.anchor_lr,
            "anchor_warmup": self.anchor_warmup,
            "rewinds": list(self.rewinds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"anchor_step", "anchor_lr", "anchor_warmup", "rewinds"} - set(state)
        if missing:
            raise ValueError(f"LR state lacks {sorted(missing)}")
        self.anchor_step = int(state["anchor_step"])
        self.anchor_lr = float(state["anchor_lr"])
        self.anchor_warmup = int(state["anchor_warmup"])
        self.rewinds = [int(s) for s in state["rewinds"]]
