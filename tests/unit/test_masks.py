"""MSG masks: folding, the linear ramp, persistence, and the DESIGN.md formulas.

The reference forward below is written from DESIGN.md alone (fp64, explicit
loops over heads, no model code) and checked against the model with every mask
kind at fractional values.
"""

import math

import pytest
import torch

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.masks import (
    MaskRamp,
    fold_masks,
    get_mask,
    get_masks,
    present_masks,
    set_mask,
    set_masks,
)
from megatron_msg.model import GPTModel
from megatron_msg.parallel.groups import ProcessGroups

SINGLE = ProcessGroups.single()


def tiny(**changes) -> ModelConfig:
    base = dict(
        vocab_size=100, hidden_size=32, ffn_hidden_size=64, num_heads=4, head_dim=8,
        num_layers=2, max_seq_len=16,
    )  # fmt: skip
    return ModelConfig(**(base | changes))


# ---- independent reference -----------------------------------------------------


def ref_norm(x, s, prefix, c, config):
    w, b = s[f"{prefix}.weight"], s.get(f"{prefix}.bias")
    c = torch.ones_like(w) if c is None else c
    n = c.sum()
    if config.norm == "layernorm":
        mu = (c * x).sum(-1, keepdim=True) / n
        var = (c * (x - mu) ** 2).sum(-1, keepdim=True) / n
        y = w * (x - mu) / torch.sqrt(var + config.norm_eps) + (0 if b is None else b)
    else:
        rms = torch.sqrt((c * x * x).sum(-1, keepdim=True) / n + config.norm_eps)
        y = w * x / rms
    return c * y


def ref_linear(x, s, prefix):
    y = x @ s[f"{prefix}.weight"].T
    return y + s[f"{prefix}.bias"] if f"{prefix}.bias" in s else y


def ref_rope(x, base):  # x [s, d]; pairs (i, i + d/2) rotated by pos * base^(-2i/d)
    seq, d = x.shape
    out = x.clone()
    for p in range(seq):
        for i in range(d // 2):
            theta = p * base ** (-2 * i / d)
            a, b = x[p, i], x[p, i + d // 2]
            out[p, i] = a * math.cos(theta) - b * math.sin(theta)
            out[p, i + d // 2] = b * math.cos(theta) + a * math.sin(theta)
    return out


def ref_attention(h, s, p, config, heads_mask):
    seq, d = h.shape[0], config.head_dim
    qkv = ref_linear(h, s, f"{p}.attn.qkv")
    outs = []
    for j in range(config.num_heads):
        rows = qkv[:, 3 * d * j : 3 * d * (j + 1)]
        q, k, v = rows[:, :d], rows[:, d : 2 * d], rows[:, 2 * d :]
        if config.position_embedding == "rope":
            q, k = ref_rope(q, config.rope_base), ref_rope(k, config.rope_base)
        scores = q @ k.T / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
        o = torch.softmax(scores, -1) @ v
        outs.append(o * (1.0 if heads_mask is None else heads_mask[j]))
    return ref_linear(torch.cat(outs, -1), s, f"{p}.attn.proj")


def ref_mlp(h, s, p, config, ffn_mask):
    if config.activation == "swiglu":
        u = ref_linear(h, s, f"{p}.mlp.gate")
        act = u * torch.sigmoid(u) * ref_linear(h, s, f"{p}.mlp.fc1")
    else:
        z = ref_linear(h, s, f"{p}.mlp.fc1")
        act = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    return ref_linear(act * (1.0 if ffn_mask is None else ffn_mask), s, f"{p}.mlp.fc2")


def reference_logits(state, config, tokens):
    """One sequence [s] -> logits [s, V_pad], straight from the DESIGN.md formulas."""
    s = dict(state)
    ch = s.get("masks.hidden")
    one = 1.0 if ch is None else ch
    x = s["embed.word.weight"][tokens]
    if config.position_embedding == "learned":
        x = x + s["embed.pos.weight"][: len(tokens)]
    x = x * one
    for i in range(config.num_layers):
        p = f"layers.{i}"
        a = ref_attention(
            ref_norm(x, s, f"{p}.norm1", ch, config), s, p, config, s.get(f"{p}.masks.heads")
        )
        h1 = x + a * one
        m = ref_mlp(
            ref_norm(h1, s, f"{p}.norm2", ch, config), s, p, config, s.get(f"{p}.masks.ffn")
        )
        block = h1 + m * one
        c = s.get(f"{p}.masks.depth", torch.tensor(1.0, dtype=torch.float64))
        x = c * block + (1 - c) * x
    x = ref_norm(x, s, "final_norm", ch, config)
    return x @ s.get("lm_head.weight", s["embed.word.weight"]).T


def grown_masks(config, value):
    """Masks of a just-grown model: old units at 1, the new ones (last of each axis) at value."""
    h, n, f = config.hidden_size, config.num_heads, config.ffn_hidden_size
    hidden = torch.ones(h)
    hidden[h - 8 :] = value
    heads = torch.ones(n)
    heads[-1] = value
    ffn = torch.ones(f)
    ffn[f - 16 :] = value
    return {"masks.hidden": hidden, "layers.0.masks.heads": heads, "layers.1.masks.ffn": ffn,
            "layers.1.masks.depth": torch.tensor(value)}  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [{}, {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
          "tie_embeddings": False, "use_bias": False}],
)  # fmt: skip
def test_halfway_ramp_matches_design_formulas(changes):
    """After 1 of 2 ramp steps the new units sit at c=0.5 and the fp64 model equals the
    reference: logits and parameter gradients to 1e-10."""
    config = tiny(**changes)
    model = GPTModel(config, groups=SINGLE, dtype=torch.float64, init_seed=9)
    set_masks(model, grown_masks(config, 0.0))
    ramp = MaskRamp.from_model(model, ramp_steps=2)
    ramp.step(model)
    masks = get_masks(model)
    for name, want in grown_masks(config, 0.5).items():
        assert torch.equal(masks[name], want), name
    tokens = torch.randint(0, 100, (2, 10))
    got = model(tokens)
    probe = torch.randn_like(got)
    (got * probe).sum().backward()
    state = {k: v.clone().requires_grad_(".masks." not in k and not k.startswith("masks."))
             for k, v in model.to_canonical().items()}  # fmt: skip
    want = torch.stack([reference_logits(state, config, tokens[b]) for b in range(2)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # Gradients too (the model applies some masks through weights; the reference doesn't).
    (want * probe).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, state[name].grad, rtol=0, atol=1e-10, msg=name)
    ramp.step(model)
    assert ramp.done and present_masks(model) == []  # ramp complete -> folded


def test_all_ones_masks_equal_folded_model():
    config = tiny(norm="rmsnorm", activation="swiglu")
    model = GPTModel(config, groups=SINGLE, init_seed=2)
    tokens = torch.randint(0, 100, (2, 16))
    plain = model(tokens)
    set_masks(
        model, {name: 1.0 for name in grown_masks(config, 1.0)} | {"layers.0.masks.depth": 1.0}
    )
    assert len(present_masks(model)) == 5
    masked = model(tokens)
    assert (masked - plain).abs().max() <= 1e-6
    assert sorted(fold_masks(model)) == sorted([*grown_masks(config, 1.0), "layers.0.masks.depth"])
    assert not any(".masks." in n or n.startswith("masks.") for n in model.state_dict())
    assert not any("masks" in n for n, _ in model.named_buffers())
    torch.testing.assert_close(model(tokens), plain, rtol=0, atol=0)


def test_fold_keeps_fractional_masks():
    model = GPTModel(tiny(), groups=SINGLE, init_seed=2)
    set_masks(model, grown_masks(model.config, 0.3) | {"layers.0.masks.ffn": 1.0})
    assert fold_masks(model) == ["layers.0.masks.ffn"]
    assert len(present_masks(model)) == 4
    assert fold_masks(model, ["masks.hidden"]) == []


def test_masks_survive_state_dict_save_and_load(tmp_path):
    config = tiny()
    model = GPTModel(config, groups=SINGLE, init_seed=3)
    set_masks(model, grown_masks(config, 0.25))
    tokens = torch.randint(0, 100, (2, 16))
    want = model(tokens)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = GPTModel(config, groups=SINGLE, init_seed=0)  # no masks, other weights
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert present_masks(fresh) == present_masks(model)
    torch.testing.assert_close(fresh(tokens), want, rtol=0, atol=0)
    # Loading a mask-free state folds the masks again (strict load).
    fresh.load_state_dict(GPTModel(config, groups=SINGLE, init_seed=3).state_dict())
    assert present_masks(fresh) == []


def test_ramp_resume_is_exact():
    config = tiny()
    start = grown_masks(config, 0.0) | {"layers.0.masks.ffn": torch.rand(64)}
    a = GPTModel(config, groups=SINGLE, init_seed=1)
    set_masks(a, start)
    ramp = MaskRamp.from_model(a, ramp_steps=7)
    for _ in range(3):
        ramp.step(a)
    saved = ramp.state_dict()
    b = GPTModel(config, groups=SINGLE, init_seed=1)
    resumed = MaskRamp.from_state_dict(saved)
    resumed.apply(b)
    for _ in range(2):
        ramp.step(a)
        resumed.step(b)
    ma, mb = get_masks(a), get_masks(b)
    assert list(ma) == list(mb)
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    frac = 5 / 7
    torch.testing.assert_close(ma["layers.1.masks.depth"], torch.tensor(frac), rtol=0, atol=1e-7)
    old = start["layers.0.masks.ffn"]
    torch.testing.assert_close(ma["layers.0.masks.ffn"], old + (1 - old) * frac, rtol=0, atol=1e-7)
    assert torch.equal(ma["masks.hidden"][:24], torch.ones(24))  # old units stay at 1
    for _ in range(5):
        ramp.step(a)
    assert ramp.done and present_masks(a) == []


def test_bad_mask_input_raises_before_changing_anything():
    model = GPTModel(tiny(), groups=SINGLE, init_seed=1)
    with pytest.raises(ConfigError, match=r"unknown mask 'layers\.2\.masks\.ffn'"):
        set_mask(model, "layers.2.masks.ffn", 0.5)
    with pytest.raises(ConfigError, match=r"shape \(4,\), got \(3,\)"):
        set_masks(model, {"masks.hidden": 0.5, "layers.0.masks.heads": torch.ones(3)})
    with pytest.raises(ConfigError, match=r"values must lie in \[0, 1\]"):
        set_mask(model, "layers.0.masks.depth", 1.5)
    with pytest.raises(ConfigError, match="at least one non-zero"):
        set_mask(model, "masks.hidden", 0.0)
    assert present_masks(model) == []
    assert get_mask(model, "masks.hidden") is None
    with pytest.raises(ConfigError, match="ramp_steps must be a positive integer"):
        MaskRamp({}, ramp_steps=0)
    with pytest.raises(ConfigError, match="cannot ramp folded"):
        MaskRamp.from_model(model, ramp_steps=3, names=["masks.hidden"])
    with pytest.raises(ConfigError, match="steps_done"):
        MaskRamp.from_state_dict({"ramp_steps": 2, "steps_done": 3, "start": {}})
