"""Builds the C++/CUDA extensions of megatron_msg.

- ``megatron_msg._masked_norm_cpu``: fused masked LayerNorm/RMSNorm for CPU (always).
- ``megatron_msg._masked_norm_cuda``: the same for CUDA, only when a CUDA toolkit
  and a CUDA build of torch are both present (so ``pip install -e .`` works on
  machines with no CUDA compiler).
- ``megatron_msg._data_helpers``: the GPT sample-index builder (plain pybind11).

An extension whose sources are absent is skipped, so a partial checkout still
installs; the Python side falls back to its PyTorch/NumPy reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
NORM_DIR = Path("csrc") / "masked_norm"
DATA_DIR = Path("csrc") / "data"


def _have(*paths: Path) -> bool:
    return all((ROOT / p).exists() for p in paths)


def _openmp_flags() -> tuple[list[str], list[str]]:
    if sys.platform == "darwin":
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _cuda_wanted() -> bool:
    if os.environ.get("MEGATRON_MSG_NO_CUDA", "0") == "1":
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _build_ext_class() -> type:
    """torch's BuildExtension with ninja, building one extension at a time.

    Its ninja builds write build_temp/build.ninja, one file for all extensions,
    so `build_ext -j N` (extensions built concurrently) made them overwrite each
    other's file and link stale objects. Ninja still compiles the sources of
    each extension in parallel.
    """
    from torch.utils.cpp_extension import BuildExtension

    class SerialBuildExtension(BuildExtension.with_options(use_ninja=True)):  # type: ignore[misc]
        def finalize_options(self) -> None:
            super().finalize_options()
            self.parallel = None

    return SerialBuildExtension


def _extensions() -> tuple[list, dict]:
    ext_modules: list = []
    cmdclass: dict = {}
    omp_compile, omp_link = _openmp_flags()
    # No -std here: torch's BuildExtension adds the standard its headers need
    # (C++20 from torch 2.10, C++17 before).
    cxx_flags = ["-O3", *omp_compile]

    cpu_sources = [NORM_DIR / "cpu.cpp", NORM_DIR / "cpu_bindings.cpp"]
    if _have(*cpu_sources):
        from torch.utils.cpp_extension import CppExtension

        ext_modules.append(
            CppExtension(
                "megatron_msg._masked_norm_cpu",
                [str(p) for p in cpu_sources],
                include_dirs=[str(ROOT / NORM_DIR)],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=omp_link,
            )
        )
        cmdclass["build_ext"] = _build_ext_class()

    cuda_sources = [NORM_DIR / "cuda.cu", NORM_DIR / "cuda_bindings.cpp"]
    if _have(*cuda_sources) and _cuda_wanted():
        from torch.utils.cpp_extension import CUDAExtension

        ext_modules.append(
            CUDAExtension(
                "megatron_msg._masked_norm_cuda",
                [str(p) for p in cuda_sources],
                include_dirs=[str(ROOT / NORM_DIR)],
                # No --use_fast_math: the kernels are memory-bound, and IEEE
                # division/sqrt keep them within the fp32 tolerance of the tests.
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            )
        )
        cmdclass["build_ext"] = _build_ext_class()

    data_sources = [DATA_DIR / "helpers.cpp"]
    if _have(*data_sources):
        from pybind11.setup_helpers import Pybind11Extension

        ext_modules.append(
            Pybind11Extension(
                "megatron_msg._data_helpers",
                [str(p) for p in data_sources],
                cxx_std=17,
                # No fused multiply-add: the blending index must match the NumPy
                # fallback bit for bit on targets with FMA (aarch64).
                extra_compile_args=["-O3", "-ffp-contract=off"],
            )
        )
    return ext_modules, cmdclass


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
