"""MSG growth: masks, operators, optimizer-state remapping, schedules.

The main entry points are re-exported lazily (PEP 562), so importing one
submodule (e.g. ``growth.masks`` from the model side) never pulls in the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_msg.growth.operators import (
        GrowthMaps,
        GrowthResult,
        LayerMap,
        TensorMap,
        carry_over,
        grow,
    )
    from megatron_msg.growth.verify import (
        FunctionPreservationError,
        PreservationReport,
        check_function_preservation,
        measure_preservation,
    )

_EXPORTS = {
    "GrowthMaps": "operators",
    "GrowthResult": "operators",
    "LayerMap": "operators",
    "TensorMap": "operators",
    "carry_over": "operators",
    "grow": "operators",
    "FunctionPreservationError": "verify",
    "PreservationReport": "verify",
    "check_function_preservation": "verify",
    "measure_preservation": "verify",
}

__all__ = [
    "FunctionPreservationError",
    "GrowthMaps",
    "GrowthResult",
    "LayerMap",
    "PreservationReport",
    "TensorMap",
    "carry_over",
    "check_function_preservation",
    "grow",
    "measure_preservation",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
