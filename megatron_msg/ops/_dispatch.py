"""Input checks and the choice between the fused kernels and the PyTorch reference.

``MEGATRON_MSG_NORM_IMPL`` forces a path (read on every call, so tests and
benchmarks can switch it):

- ``auto`` (default): the fused kernel for the tensor's device when its
  extension is built and takes the dtype, else the reference (warned once);
- ``fused``: the fused kernel or a RuntimeError saying why it cannot run;
- ``reference``: always the PyTorch reference.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

ENV_VAR = "MEGATRON_MSG_NORM_IMPL"
IMPLS = ("auto", "fused", "reference")
_EXTENSIONS = {"cpu": "megatron_msg._masked_norm_cpu", "cuda": "megatron_msg._masked_norm_cuda"}


@functools.cache
def load_extension(device_type: str) -> tuple[ModuleType | None, str]:
    """The compiled kernels for a device type, or None and the reason."""
    name = _EXTENSIONS.get(device_type)
    if name is None:
        return None, f"there is no fused masked-norm kernel for device type {device_type!r}"
    try:
        return importlib.import_module(name), ""
    except ImportError as err:
        return None, f"{name} is not built ({err}); build it with `make build`"


def requested_impl() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in IMPLS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(IMPLS)}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fused_or_reason(device: torch.device, dtype: torch.dtype) -> tuple[ModuleType | None, str]:
    ext, why = load_extension(device.type)
    if ext is not None and _dtype_name(dtype) not in ext.input_dtypes:
        taken = ", ".join(ext.input_dtypes)
        return None, f"the fused {device.type} kernel takes x in {taken}, not {_dtype_name(dtype)}"
    return ext, why


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"megatron_msg.ops: masked norms use the PyTorch reference (slower): {reason}",
        RuntimeWarning,
        stacklevel=4,
    )


def select_kernel(x: torch.Tensor) -> ModuleType | None:
    """The extension module to run for x, or None for the PyTorch reference."""
    impl = requested_impl()
    if impl == "reference":
        return None
    ext, why = _fused_or_reason(x.device, x.dtype)
    if ext is None:
        if impl == "fused":
            raise RuntimeError(f"{ENV_VAR}=fused but {why}")
        _warn_once(why)
    return ext


def fused_norm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether masked_layer_norm/masked_rms_norm would run a fused kernel here."""
    if requested_impl() == "reference":
        return False
    return _fused_or_reason(torch.device(device), dtype)[0] is not None


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_vector(name: str, v: object, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    hidden = x.shape[-1]
    if v.shape != (hidden,):
        raise ValueError(
            f"{name} must have shape [{hidden}] (the last dimension of x {_shape(x)}), "
            f"got {_shape(v)}"
        )
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}")
    if not v.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {v.dtype}")
    return v


def check_norm_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    eps: float,
) -> None:
    """Raises ValueError naming the offending shapes/dtypes; the same rules on every path."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension, got shape {_shape(x)}")
    _check_vector("weight", weight, x)
    if weight.dtype not in (torch.float32, x.dtype):
        raise ValueError(
            f"weight dtype must be float32 or x's dtype ({x.dtype}), got {weight.dtype} "
            f"(weight {_shape(weight)}, x {_shape(x)})"
        )
    if bias is not None and _check_vector("bias", bias, x).dtype != weight.dtype:
        raise ValueError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    if mask is not None:
        _check_vector("mask", mask, x)
        if mask.requires_grad:
            raise ValueError(
                "mask requires grad, but masks are buffers and are not differentiated; "
                "pass mask.detach()"
            )
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
