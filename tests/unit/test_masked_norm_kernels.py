"""Fused masked LayerNorm/RMSNorm kernels (CPU) against the PyTorch reference.

Every comparison is against the fp64 reference run on the same (rounded)
inputs, so only the kernel's own error is measured. Error metric: max |got -
truth| / scale, scale = max(max |truth|, the quantity's natural size) so that
outputs that are ~0 by cancellation (hidden size 1) are judged against the
size of the terms that cancelled:
    dx: max|dy| * max|w| * max(rstd);  dw and db: max_col sum_rows |dy|
    (xhat is O(1)).
Tolerances: fp32 1e-5, bf16 1e-2 (about two bf16 ulps at the largest value),
fp16 2e-3, fp64 1e-12.

The helpers take a device so tests/gpu/test_masked_norm_cuda.py runs the same
checks on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from megatron_msg.ops import masked_layer_norm, masked_rms_norm
from megatron_msg.ops.reference import reference_masked_layer_norm, reference_masked_rms_norm

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
MASK_KINDS = ("none", "ones", "tail", "ramp", "random")
EPS = 1e-5


@pytest.fixture(autouse=True)
def _force_fused(monkeypatch):
    """A broken build must fail these tests, not pass through the fallback."""
    monkeypatch.setenv("MEGATRON_MSG_NORM_IMPL", "fused")


def make_mask(kind: str, hidden: int, device: str = "cpu") -> torch.Tensor | None:
    """MSG-like masks: old channels first (1), grown channels last (0, 0.3 or random)."""
    if kind == "none":
        return None
    mask = torch.ones(hidden, dtype=torch.float32)
    keep = max(1, (3 * hidden) // 4)
    if kind == "tail":
        mask[keep:] = 0.0
    elif kind == "ramp":
        mask[keep:] = 0.3
    elif kind == "random":
        mask = torch.rand(hidden)
        mask[0] = 1.0  # sum(mask) > 0
    elif kind != "ones":
        raise ValueError(kind)
    return mask.to(device)


def make_inputs(rows: int, hidden: int, dtype: torch.dtype, w_dtype: torch.dtype, device: str):
    """x with a non-zero mean and spread (so centring matters), weights around 1."""
    x = (torch.randn(rows, hidden, dtype=torch.float64) * 2.0 + 0.7).to(dtype)
    w = (1.0 + 0.5 * torch.randn(hidden, dtype=torch.float64)).to(w_dtype)
    b = (0.2 * torch.randn(hidden, dtype=torch.float64)).to(w_dtype)
    dy = torch.randn(rows, hidden, dtype=torch.float64).to(dtype)
    return x.to(device), w.to(device), b.to(device), dy.to(device)


def run_norm(fn, x, w, b, mask, dy, *, rms: bool):
    """Forward and backward; returns y, dx, dw, db (db None for RMSNorm)."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if rms else b.detach().clone().requires_grad_()
    y = fn(x, w, mask, EPS) if rms else fn(x, w, b, mask, EPS)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, None if rms else b.grad


def truth(x, w, b, mask, dy, *, rms: bool):
    """fp64 reference outputs, gradients and natural scales (see module docstring)."""
    f64 = [t.double() if t is not None else None for t in (x, w, b, mask, dy)]
    ref = reference_masked_rms_norm if rms else reference_masked_layer_norm
    outs = run_norm(ref, *f64, rms=rms)
    x64, w64, _, m64, dy64 = f64
    c = torch.ones_like(w64) if m64 is None else m64
    mean = 0.0 if rms else (c * x64).sum(-1, keepdim=True) / c.sum()
    rstd = torch.rsqrt((c * (x64 - mean) ** 2).sum(-1, keepdim=True) / c.sum() + EPS)
    scales = [
        outs[0].abs().max().item(),
        dy64.abs().max().item() * w64.abs().max().item() * rstd.max().item(),
        dy64.abs().sum(0).max().item(),
        dy64.abs().sum(0).max().item(),
    ]
    return outs, scales


def assert_matches_truth(got, want, scales, *, tol: float, what: str) -> None:
    for name, g, t, scale in zip(("y", "dx", "dw", "db"), got, want, scales):
        if t is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        assert g is not None and g.shape == t.shape, f"{what}: {name} shape"
        bound = tol * max(t.abs().max().item(), scale, 1e-30)
        err = (g.double() - t).abs().max().item()
        assert err <= bound, f"{what}: {name} max|err| {err:.3e} > {bound:.3e} (tol {tol})"


def check_against_reference(
    *,
    rows: int,
    hidden: int,
    mask_kind: str,
    rms: bool,
    dtype: torch.dtype,
    w_dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> None:
    x, w, b, dy = make_inputs(rows, hidden, dtype, w_dtype or dtype, device)
    mask = make_mask(mask_kind, hidden, device)
    fn = masked_rms_norm if rms else masked_layer_norm
    got = run_norm(fn, x, w, b, mask, dy, rms=rms)
    assert got[0].dtype == dtype and got[2].dtype == w.dtype
    want, scales = truth(x, w, b, mask, dy, rms=rms)
    what = f"{'rms' if rms else 'ln'} {rows}x{hidden} {dtype}/{w.dtype} mask={mask_kind}"
    assert_matches_truth(got, want, scales, tol=TOL[dtype], what=what)


def check_zero_tail_preserves_small_norm(*, rms: bool, dtype: torch.dtype, device: str) -> None:
    """Grown channels at mask 0: the old channels see exactly the small model's norm,
    and the grown channels get exactly zero output and zero gradients."""
    rows, small, big = 6, 40, 64
    x, w, b, dy = make_inputs(rows, big, dtype, dtype, device)
    mask = torch.zeros(big, device=device)
    mask[:small] = 1.0
    fn = masked_rms_norm if rms else masked_layer_norm
    y, dx, dw, db = run_norm(fn, x, w, b, mask, dy, rms=rms)
    sb = None if rms else b[:small]
    y_s, dx_s, dw_s, db_s = run_norm(fn, x[:, :small], w[:small], sb, None, dy[:, :small], rms=rms)
    tol = TOL[dtype]
    for got, want in ((y[:, :small], y_s), (dx[:, :small], dx_s), (dw[:small], dw_s)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.all(y[:, small:] == 0) and torch.all(dx[:, small:] == 0)
    assert torch.all(dw[small:] == 0)
    if not rms:
        torch.testing.assert_close(db[:small], db_s, rtol=tol, atol=tol)
        assert torch.all(db[small:] == 0)


# Hidden sizes x rows: every hidden size of the issue, rows kept so each case is
# at most ~0.5M elements (the fp64 reference dominates the cost).
SIZES = [(1, 5), (7, 3), (100, 33), (1000, 17), (1024, 64), (5120, 24), (10240, 9)]


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize(("hidden", "rows"), [(h, r) for h, r in SIZES])
def test_fp32_matches_reference(hidden, rows, mask_kind, rms):
    check_against_reference(
        rows=rows, hidden=hidden, mask_kind=mask_kind, rms=rms, dtype=torch.float32
    )


@pytest.mark.parametrize("rows", [1, 2, 31, 513, 8192])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_fp32_row_counts(rows, rms):
    check_against_reference(rows=rows, hidden=24, mask_kind="random", rms=rms, dtype=torch.float32)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["w_bf16", "w_fp32"])
@pytest.mark.parametrize("mask_kind", ["none", "ramp", "random"])
@pytest.mark.parametrize(("hidden", "rows"), [(7, 3), (100, 33), (5120, 8)])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_bf16_matches_reference(rms, hidden, rows, mask_kind, w_dtype):
    check_against_reference(
        rows=rows,
        hidden=hidden,
        mask_kind=mask_kind,
        rms=rms,
        dtype=torch.bfloat16,
        w_dtype=w_dtype,
    )


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_fp64_matches_reference(mask_kind, rms):
    check_against_reference(rows=9, hidden=37, mask_kind=mask_kind, rms=rms, dtype=torch.float64)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("mask_kind", ["none", "tail", "ramp", "random"])
@pytest.mark.parametrize("hidden", [1, 7])
def test_gradcheck_fp64(hidden, mask_kind, rms):
    x, w, b, _ = make_inputs(3, hidden, torch.float64, torch.float64, "cpu")
    mask = make_mask(mask_kind, hidden)
    mask = None if mask is None else mask.double()
    inputs = [t.requires_grad_() for t in ((x, w) if rms else (x, w, b))]
    if rms:
        assert torch.autograd.gradcheck(lambda x, w: masked_rms_norm(x, w, mask), inputs)
    else:
        assert torch.autograd.gradcheck(lambda x, w, b: masked_layer_norm(x, w, b, mask), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_zero_tail_mask_preserves_small_norm(rms, dtype):
    check_zero_tail_preserves_small_norm(rms=rms, dtype=dtype, device="cpu")


def test_layer_norm_without_bias_matches_reference():
    x, w, _, dy = make_inputs(5, 48, torch.float32, torch.float32, "cpu")
    mask = make_mask("ramp", 48)
    got = run_norm(
        lambda x, w, c, eps: masked_layer_norm(x, w, None, c, eps), x, w, None, mask, dy, rms=True
    )
    want, scales = truth(x, w, torch.zeros_like(w), mask, dy, rms=False)  # bias 0 == no bias
    assert_matches_truth(got, (*want[:3], None), scales, tol=TOL[torch.float32], what="ln no bias")
