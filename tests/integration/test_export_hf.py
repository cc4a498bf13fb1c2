"""`megatron-msg export --format hf`: the exported transformers model computes what ours does.

Each case builds a small GPTModel with random weights (large init so logits are
O(1); random biases and norm weights so a mis-mapped tensor shows), writes a
canonical checkpoint, exports it, loads it with ``AutoModelForCausalLM``
offline and compares logits over the real vocabulary (fp32, <= 1e-4: both
sides use fp32 kernels with different reduction orders) and 10 greedy tokens.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from megatron_msg import cli
from megatron_msg.checkpoint.canonical import CanonicalMeta, save_canonical
from megatron_msg.config import ModelConfig
from megatron_msg.data.tokenizer import SentencePieceTokenizer
from megatron_msg.data.train_tokenizer import train_sentencepiece
from megatron_msg.export import ExportError, choose_family, export_hf
from megatron_msg.growth.masks import MaskRamp, get_masks, set_masks
from megatron_msg.growth.operators import grow
from megatron_msg.model import GPTModel
from megatron_msg.parallel.groups import ProcessGroups

os.environ["HF_HUB_OFFLINE"] = "1"  # loading must not need the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

GPT2 = {"norm": "layernorm", "activation": "gelu", "position_embedding": "learned"}
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope"}
VOCAB = 200
SEQ = 24


def _texts(seed: int, n: int = 1500) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mu", "sen", "lo", "pa", "qui", "zé", "ñu", "x", "12", "3"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".,!?")
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("spm")
    out = {}
    for model_type, size in (("bpe", VOCAB), ("unigram", 150)):
        out[model_type] = train_sentencepiece(
            texts=iter(_texts(0)),
            model_prefix=str(root / model_type),
            vocab_size=size,
            model_type=model_type,
            hard_vocab_limit=False,
            character_coverage=1.0,
            minloglevel=2,
        )
    return out


def _model(variant: dict[str, str], seed: int = 0, **overrides: object) -> GPTModel:
    values: dict = dict(
        vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_heads=4, head_dim=16,
        num_layers=2, max_seq_len=SEQ, init_std=0.2, **variant,
    )  # fmt: skip
    values.update(overrides)
    model = GPTModel(ModelConfig(**values), groups=ProcessGroups.single(), init_seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _save(model: GPTModel, path: Path, **meta: object) -> Path:
    meta_ = CanonicalMeta(model=model.config, **meta)  # type: ignore[arg-type]
    save_canonical(path, weights=model.to_canonical(), meta=meta_)
    return path


def _load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _greedy(model: GPTModel, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    x = prompt
    for _ in range(steps):
        with torch.no_grad():
            logits = model(x)[:, -1, : model.config.vocab_size]
        x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)
    return x


def _assert_same_model(ours: GPTModel, hf: torch.nn.Module) -> None:
    from transformers import GenerationConfig

    tokens = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ours(tokens)[..., :VOCAB]
        got = hf(tokens).logits
    assert got.shape == expected.shape
    assert expected.std() > 0.5  # O(1) logits: the comparison means something
    assert (got - expected).abs().max().item() <= 1e-4
    prompt = tokens[:, :5]
    config = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    generated = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), generation_config=config
    )
    assert generated.tolist() == _greedy(ours, prompt, 10).tolist()


CASES = {
    "gpt2-tied-bias": (GPT2, {}, "GPT2LMHeadModel"),
    "gpt2-untied-nobias": (GPT2, {"tie_embeddings": False, "use_bias": False}, "GPT2LMHeadModel"),
    # heads * head_dim (4 * 24) != hidden (64): Llama's explicit head_dim.
    "llama-tied-headdim": (LLAMA, {"head_dim": 24, "use_bias": False}, "LlamaForCausalLM"),
    "llama-untied-bias": (LLAMA, {"tie_embeddings": False, "rope_base": 500.0}, "LlamaForCausalLM"),
    # hidden (64) % heads (6) != 0: LlamaConfig refuses it, Mistral is the same decoder.
    "mistral-6-heads": (LLAMA, {"num_heads": 6, "use_bias": False}, "MistralForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_matches_ours(case: str, tmp_path: Path, spm_models: dict) -> None:
    variant, overrides, architecture = CASES[case]
    ours = _model(variant, **overrides)
    ckpt = _save(ours, tmp_path / "ckpt")
    out = tmp_path / "hf"
    args = ["export", "--load", str(ckpt), "--out", str(out), "--format", "hf"]
    assert cli.main([*args, "--tokenizer-model", spm_models["bpe"]]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["vocab_size"] == VOCAB
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    hf = _load_hf(out)
    assert type(hf).__name__ == architecture
    _assert_same_model(ours, hf)
    assert cli.main(args) == 1  # the output exists: refused, left as it was


def test_sharded_bf16_export_loads(tmp_path: Path) -> None:
    ours = _model(LLAMA, seed=3)
    out = tmp_path / "hf"
    export_hf(
        load=_save(ours, tmp_path / "ckpt"), out=out, dtype=torch.bfloat16, shard_bytes=40_000
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    hf = _load_hf(out)
    assert hf.dtype == torch.bfloat16
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = (hf(tokens).logits.float() - ours(tokens)[..., :VOCAB]).abs().max().item()
    assert delta < 0.25  # bf16 weights and activations


def _grown(tmp_path: Path) -> GPTModel:
    """A model grown along every dimension (all new masks at 0), as a live model."""
    small = _model(LLAMA, seed=5)
    config = small.config.replace(hidden_size=96, ffn_hidden_size=128, num_heads=6, num_layers=3)
    state = grow(small.to_canonical(), small.config, config, seed=1).state
    return GPTModel.from_canonical(state, config, groups=ProcessGroups.single()).eval()


def test_ramping_masks_are_refused_with_steps_left(tmp_path: Path) -> None:
    model = _grown(tmp_path)
    ramp = MaskRamp.from_model(model, ramp_steps=10)
    for _ in range(3):
        ramp.step(model)
    ramp_meta = {k: v for k, v in ramp.state_dict().items() if k != "start"}
    ckpt = _save(model, tmp_path / "ckpt", step=103, masks={"stages": [{"ramp": ramp_meta}]})
    out = tmp_path / "hf"
    with pytest.raises(ExportError, match=r"still ramping: 7 optimizer step\(s\) remain") as err:
        export_hf(load=ckpt, out=out)
    assert "to step 110" in str(err.value) and "min=0.3" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".hf.*"))
    bare = _save(model, tmp_path / "bare")  # no ramp state recorded
    with pytest.raises(ExportError, match=r"masks not finished \(values min=0.3"):
        export_hf(load=bare, out=out)
    assert not out.exists()


def test_grown_model_with_masks_at_one_is_folded(tmp_path: Path) -> None:
    model = _grown(tmp_path)
    present = list(get_masks(model))
    assert "masks.hidden" in present and "layers.2.masks.depth" in present
    set_masks(model, dict.fromkeys(present, 1.0))  # finished, but not folded yet
    ckpt = _save(model, tmp_path / "ckpt", masks={"ramp_steps": 10, "steps_done": 10})
    report = export_hf(load=ckpt, out=tmp_path / "hf")
    assert sorted(report.folded_masks) == sorted(present)
    provenance = json.loads((tmp_path / "hf" / "megatron_msg_export.json").read_text())
    assert sorted(provenance["folded_masks"]) == sorted(present)
    _assert_same_model(model, _load_hf(tmp_path / "hf"))


def test_unrepresentable_variants_are_refused(tmp_path: Path) -> None:
    cases = [
        (GPT2, {"num_heads": 3, "head_dim": 16}, r"num_heads \(3\) \* head_dim \(16\) = 48 != hidden_size \(64\)"),
        (LLAMA, {"num_heads": 6}, r"hidden_size \(64\) to be a multiple of num_heads \(6\)"),
        ({**GPT2, "activation": "swiglu"}, {}, r"norm=layernorm, activation=swiglu, position_embedding=learned"),
        ({**LLAMA, "position_embedding": "learned"}, {}, r"rmsnorm\+swiglu\+rope"),
    ]  # fmt: skip
    for variant, overrides, message in cases:
        config = _model(variant, **overrides).config
        with pytest.raises(ExportError, match=message):
            choose_family(config)
    ckpt = _save(_model(*cases[0][:1], **cases[0][1]), tmp_path / "ckpt")
    assert (
        cli.main(["export", "--load", str(ckpt), "--out", str(tmp_path / "o"), "--format", "hf"])
        == 1
    )
    assert not (tmp_path / "o").exists()


def _strings(*, control: bool = True) -> list[str]:
    # Known difference (megatron_msg/export/tokenizer.py): a unigram model's HF
    # tokenizer matches control-piece strings ("<s>") inside texts.
    literal = ["literal <s> and </s> and <unk> inside"] if control else []
    return [
        *_texts(1, 40),
        "  leading  and   repeated spaces ",
        "Ünïcödé ﬁ ＡＢＣ full-width, tab\there, new\nline",
        *literal,
        "",
    ]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_encodes_like_sentencepiece(
    model_type: str, tmp_path: Path, spm_models: dict
) -> None:
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=spm_models[model_type])
    ours = _model(GPT2, vocab_size=sp.get_piece_size())
    out = tmp_path / "hf"
    export_hf(load=_save(ours, tmp_path / "ckpt"), out=out, tokenizer_model=spm_models[model_type])
    tok = AutoTokenizer.from_pretrained(str(out))
    for text in _strings(control=model_type == "bpe"):
        ids = sp.encode(text)
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == sp.decode(ids) or "<unk>" in tok.decode(ids)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert tok.eos_token_id == sp.eos_id()


def test_megatron_sentencepiece_tokenizer_specials(tmp_path: Path, spm_models: dict) -> None:
    from transformers import AutoTokenizer

    megatron = SentencePieceTokenizer(spm_models["bpe"])
    assert megatron.vocab_size > VOCAB  # <CLS>, <SEP>, <EOD>, <MASK>, ... appended
    ours = _model(GPT2, vocab_size=megatron.vocab_size)
    out = tmp_path / "hf"
    export_hf(
        load=_save(ours, tmp_path / "ckpt"),
        out=out,
        tokenizer_model=spm_models["bpe"],
        tokenizer_type="SentencePieceTokenizer",
    )
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == megatron.vocab_size and tok.eos_token_id == megatron.eod
    for text in [*_strings()[:5], "one doc<EOD>next <SEP> <s> <MASK>x", "<CLS>"]:
        assert tok(text)["input_ids"] == megatron.tokenize(text), text


def test_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path: Path, spm_models: dict) -> None:
    ckpt = _save(_model(GPT2, vocab_size=VOCAB - 10), tmp_path / "ckpt")
    with pytest.raises(
        ExportError, match=rf"has {VOCAB} ids but the model's vocab_size is {VOCAB - 10}"
    ):
        export_hf(load=ckpt, out=tmp_path / "hf", tokenizer_model=spm_models["bpe"])
    assert not (tmp_path / "hf").exists()


def test_training_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    run = tmp_path / "checkpoints"
    (run / "step_00000010").mkdir(parents=True)
    (run / "latest").write_text("step_00000010\n")
    with pytest.raises(
        ExportError, match=r"is a training checkpoint .*latest.*canonical checkpoints only"
    ):
        export_hf(load=run, out=tmp_path / "hf")
