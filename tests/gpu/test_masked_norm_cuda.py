"""Fused masked LayerNorm/RMSNorm on CUDA: the checks of tests/unit/test_masked_norm_kernels.py.

Skipped without a CUDA device. On a CUDA machine the extension must be built
(setup.py builds it when torch has CUDA and a toolkit is found): a missing
build fails test_cuda_extension_is_built_and_used instead of passing on the
fallback. Tolerances as on CPU (fp32 1e-5, bf16 1e-2, fp16 2e-3, against the
fp64 reference on the same inputs). fp64 inputs have no CUDA kernel (they use
the reference), so the fp64 gradcheck lives in the CPU tests only; the CUDA
backward is checked against the reference's autograd here.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from megatron_msg.ops import _dispatch, fused_norm_available, masked_layer_norm, masked_rms_norm
from tests.unit.test_masked_norm_kernels import (
    MASK_KINDS,
    check_against_reference,
    check_zero_tail_preserves_small_norm,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FUSED_NODE = "FusedMaskedNormBackward"
SIZES = [(1, 5), (7, 3), (100, 33), (1000, 17), (1024, 64), (5120, 24), (10240, 9)]


@pytest.fixture(autouse=True)
def _force_fused(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "fused")


def test_cuda_extension_is_built_and_used(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR)
    ext = importlib.import_module("megatron_msg._masked_norm_cuda")
    assert {"float32", "float16", "bfloat16"} <= set(ext.input_dtypes)
    assert fused_norm_available("cuda", torch.bfloat16)
    x = torch.randn(4, 64, device="cuda", requires_grad=True)
    w = torch.randn(64, device="cuda", requires_grad=True)
    assert masked_rms_norm(x, w, torch.rand(64, device="cuda")).grad_fn.name() == FUSED_NODE
    assert masked_layer_norm(x, w, None).grad_fn.name() == FUSED_NODE


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize(("hidden", "rows"), SIZES)
def test_fp32_matches_reference(hidden, rows, mask_kind, rms):
    check_against_reference(
        rows=rows, hidden=hidden, mask_kind=mask_kind, rms=rms, dtype=torch.float32, device="cuda"
    )


@pytest.mark.parametrize("rows", [1, 2, 31, 513, 8192])
@pytest.mark.parametrize("hidden", [24, 1030])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_fp32_row_counts(rows, hidden, rms):
    check_against_reference(
        rows=rows, hidden=hidden, mask_kind="random", rms=rms, dtype=torch.float32, device="cuda"
    )


@pytest.mark.parametrize("w_dtype", ["same", torch.float32], ids=["w_same", "w_fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask_kind", ["none", "ramp", "random"])
@pytest.mark.parametrize(("hidden", "rows"), [(7, 3), (100, 33), (1024, 64), (5120, 8), (10240, 4)])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_half_precision_matches_reference(rms, hidden, rows, mask_kind, dtype, w_dtype):
    check_against_reference(
        rows=rows,
        hidden=hidden,
        mask_kind=mask_kind,
        rms=rms,
        dtype=dtype,
        w_dtype=dtype if w_dtype == "same" else w_dtype,
        device="cuda",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_zero_tail_mask_preserves_small_norm(rms, dtype):
    check_zero_tail_preserves_small_norm(rms=rms, dtype=dtype, device="cuda")


def _fwd_bwd(x, w, b, mask, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = masked_layer_norm(x, w, b, mask)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("layout", ["transposed", "offset_by_one", "3d"])
def test_non_contiguous_and_misaligned_inputs(layout):
    hidden = 64
    if layout == "transposed":
        x = torch.randn(hidden, 6, device="cuda").t()
    elif layout == "offset_by_one":  # contiguous but not 16-byte aligned: scalar loads
        x = torch.randn(6 * hidden + 1, device="cuda")[1:].view(6, hidden)
    else:
        x = torch.randn(2, 3, hidden, device="cuda")
    w, b, mask = (torch.randn(hidden, device="cuda") for _ in range(3))
    mask = mask.abs()
    dy = torch.randn(x.shape, device="cuda")
    got = _fwd_bwd(x, w, b, mask, dy)
    want = _fwd_bwd(x.cpu(), w.cpu(), b.cpu(), mask.cpu(), dy.cpu())
    for g, t in zip(got, want):
        torch.testing.assert_close(g.cpu(), t, rtol=1e-5, atol=1e-5)


def test_weight_grads_are_deterministic():
    x, w, b = torch.randn(4097, 1000, device="cuda"), *torch.randn(2, 1000, device="cuda")
    mask, dy = torch.rand(1000, device="cuda"), torch.randn(4097, 1000, device="cuda")
    first, second = _fwd_bwd(x, w, b, mask, dy), _fwd_bwd(x, w, b, mask, dy)
    for g, t in zip(first, second):
        assert torch.equal(g, t)


def test_zero_rows_and_device_mismatch():
    x = torch.randn(0, 8, device="cuda", requires_grad=True)
    w = torch.randn(8, device="cuda", requires_grad=True)
    y = masked_rms_norm(x, w, torch.rand(8, device="cuda"))
    y.sum().backward()
    assert y.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))
    with pytest.raises(ValueError, match="cpu"):
        masked_rms_norm(x, w, torch.rand(8))
