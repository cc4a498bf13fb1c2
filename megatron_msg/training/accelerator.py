"""DeepSpeed's accelerator choice, made before DeepSpeed is first imported."""

from __future__ import annotations

import os


def default_to_cpu_accelerator() -> None:
    """Without CUDA, tell DeepSpeed to use its CPU accelerator (gloo); a ``DS_ACCELERATOR``
    the user set is kept. DeepSpeed reads it once, at its first import."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
