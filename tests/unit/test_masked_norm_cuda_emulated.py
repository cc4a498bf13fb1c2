"""The CUDA kernels of csrc/masked_norm/cuda.cu, run on the host, against the reference.

No GPU here, and `make nvcc-check` only proves that cuda.cu compiles. This test
compiles cuda.cu itself with g++ against host stand-ins for the CUDA runtime
(csrc/masked_norm/testing: every CUDA thread is a fiber, __syncthreads and warp
shuffles are real barriers, one warp at a time is held back as far as the
barriers allow) and runs it through its own launch code: the pack/scalar
choice, block sizes, row rounds, block reductions and the two-stage weight
gradient. The checks and tolerances are those of test_masked_norm_kernels.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.unit.test_masked_norm_kernels import (
    TOL,
    assert_matches_truth,
    make_inputs,
    make_mask,
    truth,
)

ROOT = Path(__file__).resolve().parents[2]
NORM = ROOT / "csrc" / "masked_norm"
LAUNCH = re.compile(r"(\b\w+_kernel(?:<[^<>;]*>)?)\s*<<<([^<>;]*)>>>\(")
CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
P, I64 = ctypes.c_void_p, ctypes.c_int64


def _build(lib: Path) -> None:
    source = (NORM / "cuda.cu").read_text()
    rewritten, launches = LAUNCH.subn(lambda m: f"emu::launch({m.group(2)})({m.group(1)}, ", source)
    assert launches > 0 and "<<<" not in rewritten, "every kernel launch must be rewritten"
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f".{lib.stem}.{os.getpid()}")
    inc = tmp.with_suffix(".inc")
    inc.write_text(rewritten)
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O1", "-fno-strict-aliasing", "-shared",
           "-fPIC", f"-I{NORM / 'testing'}", f"-I{NORM}", f'-DMN_EMULATED_CUDA_SOURCE="{inc}"',
           str(NORM / "testing" / "emulate_driver.cpp"), "-o", str(tmp)]  # fmt: skip
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"building the CUDA emulation failed:\n{result.stderr}"
        os.replace(tmp, lib)  # atomic: a concurrent run never loads a half-written file
    finally:
        inc.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def emu() -> ctypes.CDLL:
    sources = [NORM / n for n in ("cuda.cu", "masked_norm_cuda.h", "common.h", "params.h")]
    sources += sorted((NORM / "testing").iterdir())
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    lib_path = ROOT / "build" / "cuda_emu" / f"masked_norm_emu_{digest}.so"
    if not lib_path.exists():
        _build(lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.mn_emu_forward.argtypes = [P] * 7 + [I64, I64, ctypes.c_double] + [ctypes.c_int] * 3
    lib.mn_emu_backward.argtypes = [P] * 9 + [I64, I64] + [ctypes.c_int] * 3 + [P]
    lib.mn_emu_workspace_bytes.argtypes = [I64, I64]
    lib.mn_emu_workspace_bytes.restype = I64
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def emulated_norm(lib, x, w, b, mask, dy, *, rms: bool):
    """y, dx, dw, db from the emulated CUDA kernels (all tensors on the host)."""
    rows, hidden = x.shape
    y, mean, rstd = torch.empty_like(x), torch.empty(rows), torch.empty(rows)
    args = (rows, hidden, 1e-5, CODES[x.dtype], CODES[w.dtype], int(rms))
    assert lib.mn_emu_forward(*map(_ptr, (x, w, b, mask, y, mean, rstd)), *args) == 0
    dx, dw = torch.empty_like(x), torch.empty_like(w)
    db = None if rms else torch.empty_like(w)
    ws = torch.empty(lib.mn_emu_workspace_bytes(rows, hidden), dtype=torch.uint8)
    ptrs = map(_ptr, (dy, x, w, mask, None if rms else mean, rstd, dx, dw, db))
    codes = (CODES[x.dtype], CODES[w.dtype], int(rms))
    assert lib.mn_emu_backward(*ptrs, rows, hidden, *codes, ws.data_ptr()) == 0
    return y, dx, dw, db


CASES = [  # x dtype, w dtype, rows, hidden, mask, rms; the path each one takes
    (F32, F32, 3, 1, "none", False),  # hidden 1, scalar loads
    (F32, F32, 5, 7, "random", False),  # scalar (7 % 4 != 0)
    (F32, F32, 4, 100, "ramp", True),  # 4-wide packs
    (F32, F32, 2, 2052, "tail", False),  # packs, 513 packs: 2 rounds of 288 threads
    (F32, F32, 2, 1030, "random", True),  # scalar, 1030 packs: 3 rounds
    (F32, F32, 70, 12, "ramp", False),  # 3 row chunks in the weight-gradient reduction
    (F32, F32, 70, 12, "none", True),
    (BF16, F32, 3, 64, "ramp", False),  # 8-wide bf16 packs, fp32 weights
    (BF16, BF16, 3, 100, "random", True),  # scalar (100 % 8 != 0)
    (BF16, BF16, 2, 1032, "none", False),  # 8-wide, 129 packs
    (F16, F16, 3, 40, "tail", False),
    (F16, F32, 3, 24, "random", True),
]


@pytest.mark.parametrize(("dtype", "w_dtype", "rows", "hidden", "mask_kind", "rms"), CASES)
def test_emulated_cuda_matches_reference(emu, dtype, w_dtype, rows, hidden, mask_kind, rms):
    x, w, b, dy = make_inputs(rows, hidden, dtype, w_dtype, "cpu")
    mask = make_mask(mask_kind, hidden)
    got = emulated_norm(emu, x, w, b, mask, dy, rms=rms)
    want, scales = truth(x, w, b, mask, dy, rms=rms)
    what = f"emulated cuda {'rms' if rms else 'ln'} {rows}x{hidden} {dtype}/{w_dtype} {mask_kind}"
    assert_matches_truth(got, want, scales, tol=TOL[dtype], what=what)


def test_emulated_cuda_misaligned_input_takes_scalar_path(emu):
    """x one element past a 16-byte boundary: packs would be misaligned loads."""
    x, w, b, dy = make_inputs(3, 64, F32, F32, "cpu")
    shifted = torch.empty(3 * 64 + 1)[1:].view(3, 64)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    mask = make_mask("random", 64)
    got = emulated_norm(emu, shifted, w, b, mask, dy, rms=False)
    want, scales = truth(x, w, b, mask, dy, rms=False)
    assert_matches_truth(got, want, scales, tol=TOL[F32], what="misaligned x")


def test_emulated_cuda_zero_rows_gives_zero_weight_grads(emu):
    x = torch.empty(0, 16)
    w, b = torch.randn(16), torch.randn(16)
    dw, db = torch.full((16,), 7.0), torch.full((16,), 7.0)
    assert emu.mn_emu_forward(x.data_ptr(), w.data_ptr(), b.data_ptr(), None, x.data_ptr(),
                              None, None, 0, 16, 1e-5, 1, 1, 0) == 0  # fmt: skip
    ptrs = (x.data_ptr(), x.data_ptr(), w.data_ptr(), None, None, None, x.data_ptr())
    assert emu.mn_emu_backward(*ptrs, dw.data_ptr(), db.data_ptr(), 0, 16, 1, 1, 0, None) == 0
    assert torch.all(dw == 0) and torch.all(db == 0)


def test_emulated_cuda_refuses_bad_dtypes_and_sizes(emu):
    x, w = torch.randn(2, 8, dtype=F16), torch.randn(8, dtype=BF16)
    y = torch.empty_like(x)
    stats = torch.empty(2)
    bad_weight = (2, 8, 1e-5, CODES[F16], CODES[BF16], 0)  # weight neither fp32 nor x's dtype
    ptrs = (
        x.data_ptr(),
        w.data_ptr(),
        None,
        None,
        y.data_ptr(),
        stats.data_ptr(),
        stats.data_ptr(),
    )
    assert emu.mn_emu_forward(*ptrs, *bad_weight) == 1  # cudaErrorInvalidValue
    assert emu.mn_emu_forward(*ptrs, 2, 0, 1e-5, CODES[F16], CODES[F16], 0) == 1  # hidden 0
    assert emu.mn_emu_forward(*ptrs, 2, 8, 1e-5, 0, 0, 0) == 1  # fp64: not a CUDA input dtype
