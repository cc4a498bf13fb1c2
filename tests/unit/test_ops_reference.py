"""The reference masked norms reduce to the plain norms and follow DESIGN.md's formulas."""

import pytest
import torch
import torch.nn.functional as F

from megatron_msg.ops import masked_layer_norm, masked_rms_norm


def test_all_ones_mask_is_plain_layer_norm():
    x = torch.randn(4, 7, 33, dtype=torch.float64)
    w, b = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    got = masked_layer_norm(x, w, b, torch.ones(33, dtype=torch.float64))
    torch.testing.assert_close(got, F.layer_norm(x, (33,), w, b, 1e-5), rtol=0, atol=1e-12)


def test_zero_tail_mask_matches_small_norm():
    """Masked stats over the first k channels equal a plain norm of those channels."""
    x = torch.randn(5, 12, dtype=torch.float64)
    w, b = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    mask = torch.tensor([1.0] * 8 + [0.0] * 4, dtype=torch.float64)
    got = masked_layer_norm(x, w, b, mask)
    want = F.layer_norm(x[:, :8], (8,), w[:8], b[:8], 1e-5)
    torch.testing.assert_close(got[:, :8], want, rtol=0, atol=1e-12)
    assert torch.all(got[:, 8:] == 0)
    got_rms = masked_rms_norm(x, w, mask)
    want_rms = x[:, :8] * torch.rsqrt(x[:, :8].pow(2).mean(-1, keepdim=True) + 1e-5) * w[:8]
    torch.testing.assert_close(got_rms[:, :8], want_rms, rtol=0, atol=1e-12)
    assert torch.all(got_rms[:, 8:] == 0)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_fractional_mask_formula(norm):
    x = torch.randn(3, 10, dtype=torch.float64)
    w = torch.randn(10, dtype=torch.float64)
    b = torch.randn(10, dtype=torch.float64)
    c = torch.rand(10, dtype=torch.float64)
    n = c.sum()
    if norm == "layer":
        mu = (c * x).sum(-1, keepdim=True) / n
        var = (c * (x - mu) ** 2).sum(-1, keepdim=True) / n
        want = c * (w * (x - mu) / torch.sqrt(var + 1e-5) + b)
        got = masked_layer_norm(x, w, b, c)
    else:
        rms = torch.sqrt((c * x * x).sum(-1, keepdim=True) / n + 1e-5)
        want = c * w * x / rms
        got = masked_rms_norm(x, w, c)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
