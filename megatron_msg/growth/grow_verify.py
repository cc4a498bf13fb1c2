"""The growth tool's verification gate: does the grown checkpoint compute what the small one did?

Two ways, both on a probe batch, in fp64 by default (weights and masks are
fp32 values, exact in fp64, so the two models differ only by reduction order
and a real defect stands out by orders of magnitude) or fp32, against the
DESIGN.md tolerance of that dtype (1e-10 fp64, 1e-5 fp32):

- ``full`` (models that fit, below :data:`DEFAULT_MAX_FULL_PARAMS` parameters):
  build both models on CPU and compare logits and loss with
  :func:`megatron_msg.growth.verify.measure_preservation`.
- ``layers`` (any size): one component at a time, loading only its tensors.
  The small model's hidden state ``x`` is carried through its layers; at
  every component the grown version runs on ``x`` padded with zeros to the
  new hidden size (new channels are 0 in a function-preserving model) and its
  output must equal the small output padded with zeros: the embedding, each
  layer of the grown model (a new layer, depth mask 0, must return its input;
  an old one what its source layer returns), and the head (logits and loss).
  Each component is checked on the same input as its small counterpart, so a
  failure names the component, and memory stays at about one layer of each
  model plus the embedding. Hidden states are compared relative to their
  scale, max |delta| / max(1, max |x|) (a trained residual stream can be far
  larger than 1); logits and loss absolutely, as DESIGN.md states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_msg.checkpoint.canonical import CanonicalReader
from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.operators import LayerMap, is_mask_name
from megatron_msg.growth.unmapped_reader import UnmappedReader
from megatron_msg.growth.verify import TOLERANCES, measure_preservation
from megatron_msg.model.attention import rope_tables
from megatron_msg.model.block import LAYER_MASKS, Block
from megatron_msg.model.canonical import layer_parameter_specs
from megatron_msg.model.maskset import apply_mask
from megatron_msg.model.norms import Norm
from megatron_msg.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_msg.parallel.groups import ProcessGroups

__all__ = [
    "DEFAULT_MAX_FULL_PARAMS",
    "VERIFY_DTYPES",
    "VERIFY_MODES",
    "GrowthVerificationError",
    "VerifyReport",
    "probe_batch",
    "verify_growth",
]

DEFAULT_MAX_FULL_PARAMS = 200_000_000
VERIFY_MODES: tuple[str, ...] = ("auto", "full", "layers")
VERIFY_DTYPES: dict[str, torch.dtype] = {"fp64": torch.float64, "fp32": torch.float32}
_HEAD_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class VerifyReport:
    """Max |delta| per compared component (``logits`` and ``loss`` always among them)."""

    mode: str
    deviations: tuple[tuple[str, float], ...]
    tolerance: float

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.deviations, key=lambda item: item[1])

    @property
    def failed(self) -> list[tuple[str, float]]:
        return [(n, d) for n, d in self.deviations if not d <= self.tolerance]

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        name, value = self.worst
        verdict = "ok" if self.ok else f"FAILED at {', '.join(n for n, _ in self.failed[:6])}"
        return (
            f"{self.mode} check on a probe batch: {verdict}; largest |delta| {value:.3e} "
            f"({name}) over {len(self.deviations)} comparison(s), tolerance {self.tolerance:.0e}"
        )


class GrowthVerificationError(AssertionError):
    """The grown checkpoint does not compute what the source did; ``report`` has the figures."""

    def __init__(self, report: VerifyReport) -> None:
        super().__init__(f"growth is not function-preserving: {report}")
        self.report = report


def probe_batch(config: ModelConfig, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small random (tokens, labels) batch [2, min(16, max_seq_len)] from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (2, min(16, config.max_seq_len)), generator=gen)
    return tokens, torch.roll(tokens, shifts=-1, dims=1)


def verify_growth(
    small: CanonicalReader,
    big: CanonicalReader,
    *,
    layers: Sequence[LayerMap],
    mode: str = "auto",
    max_full_params: int = DEFAULT_MAX_FULL_PARAMS,
    seed: int = 0,
    dtype: str = "fp64",
) -> VerifyReport:
    """Compare ``big`` (grown from ``small`` with layer plan ``layers``) on a probe batch.

    ``mode``: "full", "layers", or "auto" (full when the grown model has fewer
    than ``max_full_params`` parameters). ``dtype``: "fp64" or "fp32".
    """
    if mode not in VERIFY_MODES:
        raise ConfigError(f"verify mode must be one of {VERIFY_MODES}, got {mode!r}")
    if dtype not in VERIFY_DTYPES:
        raise ConfigError(f"verify dtype must be one of {tuple(VERIFY_DTYPES)}, got {dtype!r}")
    if len(layers) != big.meta.model.num_layers:
        raise ConfigError(
            f"layer plan has {len(layers)} layers, {big.path} has {big.meta.model.num_layers}"
        )
    if mode == "auto":
        params = sum(_numel(big, n) for n in big.names("weights") if not is_mask_name(n))
        mode = "full" if params < max_full_params else "layers"
    tokens, labels = probe_batch(small.meta.model, seed=seed)
    if mode == "full":
        return _verify_full(small, big, tokens, labels, VERIFY_DTYPES[dtype])
    return _verify_layers(small, big, layers, tokens, labels, VERIFY_DTYPES[dtype])


def _numel(reader: CanonicalReader, name: str) -> int:
    return int(torch.Size(reader.entry(name).shape).numel())


def _verify_full(
    small: CanonicalReader,
    big: CanonicalReader,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype,
) -> VerifyReport:
    states = [{n: UnmappedReader(r).read(n) for n in r.names("weights")} for r in (small, big)]
    report = measure_preservation(
        states[0],
        small.meta.model,
        states[1],
        big.meta.model,
        tokens=tokens,
        labels=labels,
        dtype=dtype,
    )
    deviations = (("logits", report.max_abs_logits), ("loss", report.delta_loss))
    return VerifyReport("full", deviations, report.tolerance)


class _Streamed:
    """One model's components built from a store on demand (weights kind, CPU, ``dtype``)."""

    def __init__(self, reader: CanonicalReader, *, seq_len: int, dtype: torch.dtype) -> None:
        self.reader, self.source, self.dtype = reader, UnmappedReader(reader), dtype
        self.config: ModelConfig = reader.meta.model
        self.groups = ProcessGroups.single()
        self.hidden_mask = self.get("masks.hidden")
        self.rope = None
        if self.config.position_embedding == "rope":
            c = self.config
            self.rope = rope_tables(seq_len, c.head_dim, base=c.rope_base, dtype=dtype)

    def get(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` (parameters in ``dtype``, masks as stored), None when absent (folded)."""
        if not self.reader.has(name):
            return None
        tensor = self.source.read(name)
        return tensor if is_mask_name(name) else tensor.to(self.dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding output (``GPTModel``'s at TP=1), reading only the probe's rows."""
        rows, inverse = tokens.unique(return_inverse=True)
        table = torch.cat([self._rows("embed.word.weight", r, r + 1) for r in rows.tolist()])
        x = table[inverse]
        if self.config.position_embedding == "learned":
            x = x + self._rows("embed.pos.weight", 0, tokens.shape[1])
        return apply_mask(x, self.hidden_mask)

    def block(self, index: int) -> Block:
        module = Block(self.config, groups=self.groups, dtype=self.dtype, device="meta").eval()
        prefix = f"layers.{index}."
        state = {n[len(prefix) :]: self.get(n) for n in layer_parameter_specs(self.config, index)}
        for key in LAYER_MASKS:
            mask = self.get(f"{prefix}masks.{key}")
            if mask is not None:
                module.masks.put(key, mask)  # registers the buffer the state dict then fills
                state[f"masks.{key}"] = mask
        _load(module, state)
        return module

    def head(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over the real vocabulary and the mean loss, as ``GPTModel`` computes them."""
        c = self.config
        norm = Norm(
            c.hidden_size,
            kind=c.norm,
            eps=c.norm_eps,
            use_bias=c.use_bias,
            dtype=self.dtype,
            device="meta",
        )
        state = {"weight": self.get("final_norm.weight")}
        if norm.bias is not None:
            state["bias"] = self.get("final_norm.bias")
        _load(norm, state)
        name = "embed.word.weight" if c.tie_embeddings else "lm_head.weight"
        normed = norm(x, self.hidden_mask)
        # The output projection a block of vocabulary rows at a time (each logit is
        # the same dot product), so the largest tensor is never held in fp64 whole.
        vocab = self.reader.entry(name).shape[0]
        step = max(1, _HEAD_CHUNK_BYTES // (c.hidden_size * 8))
        logits = torch.cat(
            [
                F.linear(normed, self._rows(name, start, min(start + step, vocab)))
                for start in range(0, vocab, step)
            ],
            dim=-1,
        )
        loss = vocab_parallel_cross_entropy(logits, labels, self.groups).mean()
        return logits[..., : c.vocab_size], loss

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.source.read_rows(name, start, stop).to(self.dtype)


def _load(module: nn.Module, state: Mapping[str, torch.Tensor | None]) -> None:
    """Put real tensors in place of the meta-device parameters (strict: all of them)."""
    missing = sorted(k for k, v in state.items() if v is None)
    if missing:
        raise ConfigError(f"tensors missing from the store: {missing}")
    module.load_state_dict(state, strict=True, assign=True)


def _pad(x: torch.Tensor, hidden: int) -> torch.Tensor:
    return F.pad(x, (0, hidden - x.shape[-1]))


@torch.no_grad()
def _verify_layers(
    small: CanonicalReader,
    big: CanonicalReader,
    layers: Sequence[LayerMap],
    tokens: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype,
) -> VerifyReport:
    s = _Streamed(small, seq_len=tokens.shape[1], dtype=dtype)
    b = _Streamed(big, seq_len=tokens.shape[1], dtype=dtype)
    h = b.config.hidden_size
    deviations: list[tuple[str, float]] = []
    next_source = 0

    def compare(label: str, got: torch.Tensor, expected: torch.Tensor) -> None:
        scale = max(1.0, float(expected.abs().max()))
        deviations.append((label, float((got - _pad(expected, h)).abs().max()) / scale))

    x = s.embed(tokens)
    compare("embedding", b.embed(tokens), x)
    for index, layer in enumerate(layers):
        if not layer.is_new:
            # Old layers keep their order; each is run once, when its copy in big comes up.
            if layer.source != next_source:
                raise ConfigError(
                    f"layer {index} of the plan is old layer {layer.source}, expected {next_source}"
                )
            next_source += 1
            y = s.block(layer.source).forward(x, hidden_mask=s.hidden_mask, rope=s.rope, rng=None)
        out = b.block(index).forward(_pad(x, h), hidden_mask=b.hidden_mask, rope=b.rope, rng=None)
        if layer.is_new:
            compare(f"layer {index} (new)", out, x)
        else:
            compare(f"layer {index}", out, y)
            x = y
    small_logits, small_loss = s.head(x, labels)
    big_logits, big_loss = b.head(_pad(x, h), labels)
    deviations.append(("logits", float((big_logits - small_logits).abs().max())))
    deviations.append(("loss", float((big_loss - small_loss).abs())))
    return VerifyReport("layers", tuple(deviations), TOLERANCES[dtype])
