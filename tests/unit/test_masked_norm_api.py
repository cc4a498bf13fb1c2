"""megatron_msg.ops masked norms: which path runs, input checks, layouts, determinism."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from megatron_msg.ops import _dispatch, fused_norm_available, masked_layer_norm, masked_rms_norm
from megatron_msg.ops.reference import reference_masked_layer_norm

FUSED_NODE = "FusedMaskedNormBackward"


def _ln(x, w, b, mask=None):
    return masked_layer_norm(x, w, b, mask)


def _inputs(rows: int = 4, hidden: int = 100, dtype: torch.dtype = torch.float32):
    x = torch.randn(rows, hidden, dtype=dtype, requires_grad=True)
    w = torch.randn(hidden, dtype=dtype, requires_grad=True)
    b = torch.randn(hidden, dtype=dtype, requires_grad=True)
    return x, w, b


def test_cpu_extension_is_built_and_is_the_path_used(monkeypatch):
    """With the sources in the tree the extension must import, and auto must pick it:
    a broken build fails here instead of passing quietly on the fallback."""
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    ext = importlib.import_module("megatron_msg._masked_norm_cpu")
    assert {"float32", "bfloat16", "float64"} <= set(ext.input_dtypes)
    assert fused_norm_available("cpu", torch.float32)
    x, w, b = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        y = _ln(x, w, b, torch.rand(100))
        y_rms = masked_rms_norm(x, w, None)
    assert y.grad_fn.name() == FUSED_NODE and y_rms.grad_fn.name() == FUSED_NODE
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert _ln(x, w, b, torch.rand(100)).grad_fn.name() != FUSED_NODE
    assert not fused_norm_available("cpu", torch.float32)


def test_unsupported_dtype_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "auto")
    _dispatch._warn_once.cache_clear()
    x, w, b = _inputs(dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="float16"):
        y = _ln(x, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ln(x, w, b)  # warned once only
    assert y.grad_fn.name() != FUSED_NODE
    torch.testing.assert_close(y, reference_masked_layer_norm(x, w, b))


def test_forcing_fused_on_an_unsupported_dtype_raises(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "fused")
    with pytest.raises(RuntimeError, match="float16"):
        _ln(*_inputs(dtype=torch.float16))


def test_bad_impl_env_value_is_refused(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="'fastest'"):
        _ln(*_inputs())


def _bad(name: str):
    """Inputs (x, w, b, mask, eps) for a 4x100 fp32 norm with one thing wrong."""
    x, w, b = (t.detach() for t in _inputs())
    mask, eps = torch.ones(100), 1e-5
    if name == "mask_shape":
        mask = torch.ones(99)
    elif name == "mask_2d":
        mask = torch.ones(1, 100)
    elif name == "mask_int":
        mask = torch.ones(100, dtype=torch.int64)
    elif name == "mask_bool":
        mask = torch.ones(100, dtype=torch.bool)
    elif name == "mask_grad":
        mask = torch.ones(100, requires_grad=True)
    elif name == "weight_shape":
        w = torch.ones(101)
    elif name == "weight_dtype":
        w = torch.ones(100, dtype=torch.float16)
    elif name == "bias_shape":
        b = torch.ones(100, 1)
    elif name == "bias_dtype":
        b = b.double()
    elif name == "x_int":
        x = torch.ones(4, 100, dtype=torch.int32)
    elif name == "x_scalar":
        x = torch.tensor(1.0)
    elif name == "eps":
        eps = -1.0
    return x, w, b, mask, eps


BAD = {  # what is wrong -> fragments the message must contain
    "mask_shape": ["mask", "[100]", "[4, 100]", "[99]"],
    "mask_2d": ["mask", "[1, 100]"],
    "mask_int": ["mask", "floating-point", "torch.int64"],
    "mask_bool": ["mask", "torch.bool"],
    "mask_grad": ["mask requires grad"],
    "weight_shape": ["weight", "[100]", "[101]", "[4, 100]"],
    "weight_dtype": ["weight", "torch.float16", "torch.float32"],
    "bias_shape": ["bias", "[100, 1]"],
    "bias_dtype": ["bias", "torch.float64"],
    "x_int": ["x", "torch.int32"],
    "x_scalar": ["x", "[]"],
    "eps": ["eps", "-1.0"],
}


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_naming_the_values(monkeypatch, case, impl):
    monkeypatch.setenv(_dispatch.ENV_VAR, impl)
    x, w, b, mask, eps = _bad(case)
    with pytest.raises(ValueError) as err:
        if case.startswith("bias"):
            masked_layer_norm(x, w, b, mask, eps)
        else:
            masked_rms_norm(x, w, mask, eps)
    for fragment in BAD[case]:
        assert fragment in str(err.value), f"{fragment!r} not in {err.value}"


def test_extension_refuses_bad_input_itself():
    ext = importlib.import_module("megatron_msg._masked_norm_cpu")
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"2-D"):
        ext.forward(x, w, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="mask dtype"):
        ext.forward(x[0], w, None, torch.ones(8, dtype=torch.float64), 1e-5, False)
    with pytest.raises(ValueError, match="contiguous"):
        ext.forward(torch.randn(8, 3).t(), torch.randn(3), None, None, 1e-5, False)


def _fwd_bwd(x, w, b, mask, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = masked_layer_norm(x, w, b, mask)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("layout", ["transposed", "strided_rows", "every_other", "3d"])
def test_non_contiguous_and_nd_inputs_match_contiguous(monkeypatch, layout):
    monkeypatch.setenv(_dispatch.ENV_VAR, "fused")
    hidden = 24
    if layout == "transposed":
        x = torch.randn(hidden, 6).t()
    elif layout == "strided_rows":
        x = torch.randn(6, hidden + 5)[:, :hidden]
    elif layout == "every_other":
        x = torch.randn(6, 2 * hidden)[:, ::2]
    else:
        x = torch.randn(6, 2, 3, hidden).permute(1, 0, 2, 3)
    assert x.shape[-1] == hidden and (layout == "3d" or not x.is_contiguous())
    w, b, mask = torch.randn(hidden), torch.randn(hidden), torch.rand(hidden)
    dy = torch.randn(x.shape)
    got = _fwd_bwd(x, w, b, mask, dy)
    want = _fwd_bwd(x.contiguous(), w, b, mask, dy)
    assert got[1].shape == x.shape
    for g, t in zip(got, want):
        assert torch.equal(g, t)  # same kernel on the same values: bitwise


def test_mask_dtype_is_converted_and_gets_no_gradient(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "fused")
    x, w, b = _inputs()
    mask32 = torch.rand(100)
    for mask in (mask32.double(), mask32.to(torch.bfloat16)):
        y = _ln(x, w, b, mask)
        torch.testing.assert_close(y, _ln(x, w, b, mask.float()), rtol=0, atol=0)
        y.sum().backward()
        assert mask.grad is None


def test_weight_grads_are_deterministic_and_only_computed_when_wanted(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "fused")
    x, w, b = (t.detach() for t in _inputs(rows=333, hidden=64))
    mask, dy = torch.rand(64), torch.randn(333, 64)
    first, second = _fwd_bwd(x, w, b, mask, dy), _fwd_bwd(x, w, b, mask, dy)
    for g, t in zip(first, second):
        assert torch.equal(g, t)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _fwd_bwd(x, w, b, mask, dy)
    finally:
        torch.set_num_threads(threads)
    for g, t in zip(single, first):  # another summation order only
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    masked_layer_norm(xg, w, b, mask).backward(dy)  # weight and bias without grad
    assert torch.equal(xg.grad, first[1]) and w.grad is None


def test_zero_rows(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "fused")
    x, w, b = _inputs(rows=0, hidden=8)
    y = masked_layer_norm(x, w, b, torch.rand(8))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(8)) and torch.equal(b.grad, torch.zeros(8))
    assert x.grad.shape == (0, 8)
