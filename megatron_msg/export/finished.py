"""Is a checkpoint's model finished (every MSG mask at 1), and if not, how far off?

A Hugging Face model has no masks, so only a model whose masks are all ones
computes the same thing without them. Folded masks are absent from the
canonical state; a present mask that is all ones is folded here. A present
mask with any entry below 1 is still ramping: export is refused, with the
steps left read from the ramp state that ``meta.json`` records.

Ramp state in ``meta.masks``: any JSON object in it (at any depth, e.g. one per
growth stage) that carries integer ``ramp_steps`` and ``steps_done`` — the
scalar fields of ``growth.masks.MaskRamp.state_dict()``. The steps left are
the largest ``ramp_steps - steps_done`` over those objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypeGuard

import torch

from megatron_msg.export.hf import ExportError


def _ramps(node: Any) -> Iterator[tuple[int, int]]:
    if isinstance(node, Mapping):
        done, total = node.get("steps_done"), node.get("ramp_steps")
        if _is_int(done) and _is_int(total):
            yield done, total
        for value in node.values():
            yield from _ramps(value)
    elif isinstance(node, list):
        for value in node:
            yield from _ramps(value)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def ramp_progress(masks_meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(steps_done, ramp_steps)`` of the ramp furthest from done, or None if none is recorded."""
    ramps = list(_ramps(masks_meta))
    if not ramps:
        return None
    return max(ramps, key=lambda r: r[1] - r[0])


def foldable_masks(
    masks: Mapping[str, torch.Tensor], *, masks_meta: Mapping[str, Any], step: int
) -> list[str]:
    """Names of the present ``masks`` (all ones: folded at export).

    Raises ExportError when a mask has an entry below 1 (still ramping: the
    message says how many optimizer steps remain) or outside [0, 1].
    """
    invalid = [n for n, v in masks.items() if not bool(((v >= 0) & (v <= 1)).all())]
    if invalid:
        raise ExportError(f"mask values outside [0, 1] (or NaN) in {invalid[:8]}")
    below = {n: float(v.min()) for n, v in masks.items() if v.numel() and float(v.min()) < 1.0}
    if not below:
        return list(masks)
    lowest = min(below, key=lambda n: below[n])
    detail = (
        f"{len(below)} mask(s) below 1, e.g. {', '.join(list(below)[:4])}; "
        f"lowest {lowest} min={below[lowest]:.4g}"
    )
    progress = ramp_progress(masks_meta)
    if progress is None or progress[0] >= progress[1]:
        state = "records no ramp state" if progress is None else "records a finished ramp"
        raise ExportError(
            f"masks not finished (values min={below[lowest]:.4g}): {detail}; meta.json {state}, "
            "so the steps left are unknown. Export a checkpoint taken after the ramp ends"
        )
    done, total = progress
    left = total - done
    raise ExportError(
        f"masks are still ramping: {left} optimizer step(s) remain (ramp at {done}/{total} "
        f"steps, checkpoint step {step}); {detail}. Train {left} more step(s), to step "
        f"{step + left}, and export that checkpoint"
    )
