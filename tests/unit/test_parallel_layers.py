"""At TP=1 the parallel layers, mappings and loss are the plain torch operations.

Layers: bitwise equal to nn.Linear / nn.Embedding (same kernels, no communication).
Cross entropy: same maths as F.cross_entropy computed differently (explicit
max-subtract, exp, log): fp64 agrees to 1e-12, fp32 to 1e-6.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_msg.config import ConfigError
from megatron_msg.parallel import (
    ColumnParallelLinear,
    ProcessGroups,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    scatter_to_tp,
    vocab_parallel_cross_entropy,
)

SINGLE = ProcessGroups.single()


def test_mappings_are_identity_at_tp1():
    x = torch.randn(3, 4)
    for fn in (copy_to_tp, reduce_from_tp, scatter_to_tp, gather_from_tp):
        assert fn(x, SINGLE) is x


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_linear_matches_nn_linear(cls):
    layer = cls(12, 20, groups=SINGLE, seed=4)
    ref = nn.Linear(12, 20)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(torch.randn(20))
        layer.bias.copy_(ref.bias)
    x = torch.randn(2, 3, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 3, 20)
    y, y_ref = layer(x), ref(x_ref)
    assert torch.equal(y, y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(layer.weight.grad, ref.weight.grad)
    assert torch.equal(layer.bias.grad, ref.bias.grad)


def test_linear_without_bias():
    layer = RowParallelLinear(8, 4, groups=SINGLE, bias=False, input_is_parallel=False)
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), x @ layer.weight.T)


def test_embedding_matches_nn_embedding():
    emb = VocabParallelEmbedding(32, 8, groups=SINGLE, seed=2)
    ids = torch.randint(0, 32, (3, 7))
    ref = F.embedding(ids, emb.weight.detach().clone().requires_grad_(True))
    assert torch.equal(emb(ids), ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_entropy_matches_torch(dtype):
    logits = (3 * torch.randn(4, 5, 37, dtype=dtype)).requires_grad_(True)
    target = torch.randint(0, 37, (4, 5))
    target[0, :2] = -100
    ref_logits = logits.detach().clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(logits, target, SINGLE)
    ref = F.cross_entropy(ref_logits.view(-1, 37), target.view(-1), reduction="none").view(4, 5)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    assert torch.all(loss[0, :2] == 0)
    weight = torch.rand(4, 5, dtype=dtype)  # a loss mask with arbitrary weights
    (loss * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=tol, atol=tol)
    assert torch.all(logits.grad[0, :2] == 0)


def test_cross_entropy_bf16_computes_in_fp32():
    logits = (3 * torch.randn(6, 50)).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, 50, (6,))
    loss = vocab_parallel_cross_entropy(logits, target, SINGLE)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.detach().float(), target, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_cross_entropy_bad_input():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ConfigError, match=r"target id 10 outside the vocabulary \[0, 10\)"):
        vocab_parallel_cross_entropy(logits, torch.full((2, 3), 10), SINGLE)
    with pytest.raises(ConfigError, match=r"target id -1 outside"):
        vocab_parallel_cross_entropy(logits, torch.full((2, 3), -1), SINGLE)
    with pytest.raises(ConfigError, match=r"target shape \(2, 4\) must equal .* \(2, 3\)"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long), SINGLE)
    with pytest.raises(ConfigError, match="integer tensor"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 3), SINGLE)
