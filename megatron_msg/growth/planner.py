"""`megatron-msg plan CONFIG...`: sizes, FLOPs, memory, time and growth I/O of each stage.

Each CONFIG is a training config (``megatron_msg.training.config``; the same
YAML that ``megatron-msg train`` reads) with an optional ``plan:`` section of
planning assumptions (``plan_config.PlanSettings``: GPU memory, peak FLOP/s,
utilisation, recomputation, ...; ``plan_report`` formats the output). A config with in-run ``growth:`` stages is
planned once per stage model. Consecutive configs on the command line are
treated as offline growth steps (the FLM-101B workflow), for which the bytes
the grow tool reads and writes are reported.

All estimates are closed-form, so the 101B configs plan in well under a second:

- Parameters are counted exactly from the canonical tensor table
  (``megatron_msg.model.canonical.parameter_specs``), padded vocabulary and
  tied/untied head included.
- FLOPs per token are ``megatron_msg.training.metrics``' model FLOPs (6N over
  the matmul weights plus 12 L s n d for attention); hardware FLOPs add the
  recomputed forward (all layers under full recomputation, the attention core
  under selective, Megatron's definition; the recomputation mode is the
  training config's ``train.recompute``). The trainer's ``selective`` currently
  reruns the whole attention sublayer (model/block.py): it keeps less than
  estimated here and recomputes the qkv and output projections as well.
- Memory per GPU is for the busiest pipeline stage: bf16 weights and grads
  (2 + 2 bytes per local parameter; ZeRO-2 shards the grads over DP), and under
  ZeRO 1/2 the fp32 master, exp_avg, exp_avg_sq and DeepSpeed's fp32 gradient
  partition (16 bytes per parameter, divided by DP). Activations follow
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"), generalised to decoupled head width n*d and ffn size;
  under 1F1B pipeline stage i holds min(pp - i, micro-batches) micro-batches in
  flight. Dropout masks are counted only when the model uses dropout, and the
  s^2 attention terms only without a fused (flash) attention kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.plan_config import (
    RECOMPUTE_MODES,
    StageInput,
    hostfile_slots,
    load_stages,
)
from megatron_msg.growth.plan_report import GIB, format_report, gib
from megatron_msg.model.canonical import parameter_specs
from megatron_msg.training.metrics import forward_flops_per_token

DEFAULT_PEAK_TFLOPS = 312.0  # A100/A800 dense bf16
DEFAULT_MFU = 0.4
GROWN_SIZES = ("hidden_size", "ffn_hidden_size", "num_heads", "num_layers")
# What MSG growth keeps fixed (growth.operators checks the same list).
FIXED_OPTIONS = (
    "vocab_size", "head_dim", "norm", "activation", "position_embedding",
    "tie_embeddings", "use_bias", "norm_eps", "rope_base",
)  # fmt: skip


@dataclass
class Check:
    level: str  # "ok" | "warn" | "error"
    text: str


@dataclass
class Memory:
    """Bytes per GPU on the busiest pipeline stage, and what activations would take per mode."""

    pipeline_stage: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    overhead: float
    activations_by_mode: dict[str, float]

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.overhead


@dataclass
class StagePlan:
    label: str
    shape: dict[str, int]
    params: int
    embedding_params: int
    params_per_gpu: int
    layout: dict[str, Any]
    flops_per_token: float  # model FLOPs (training: forward + backward)
    hw_flops_per_token: float  # with recomputation
    memory: Memory
    gpu_memory: float
    tokens: float
    peak_flops: float
    mfu: float
    hfu: float
    days: float
    checks: list[Check] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["memory"]["total"] = self.memory.total
        out["fits"] = self.fits
        return out


@dataclass
class GrowthIO:
    source: str
    target: str
    read_bytes: float  # fp32 weights + exp_avg + exp_avg_sq of the source
    write_bytes: float  # the same of the target
    checks: list[Check] = field(default_factory=list)


# ----------------------------------------------------------------------------- sizes


def count_parameters(config: ModelConfig) -> int:
    """Exact parameter count: the sum of the canonical tensors' sizes (no masks)."""
    return sum(math.prod(spec.shape) for spec in parameter_specs(config).values())


def _stage_layers(config: ModelConfig, pp: int, stage: int) -> range:
    per = math.ceil(config.num_layers / pp)
    return range(stage * per, min((stage + 1) * per, config.num_layers))


def params_per_gpu(config: ModelConfig, *, tp: int, pp: int, stage: int) -> int:
    """Parameters one GPU of pipeline ``stage`` holds: TP-split tensors count 1/tp.

    The first stage holds the embeddings, the last the final norm and the
    output layer (with tied embeddings and pp > 1 a copy of the word embedding,
    as Megatron does, so both ends can use it).
    """
    layers = {f"layers.{i}." for i in _stage_layers(config, pp, stage)}
    total = 0
    for name, spec in parameter_specs(config).items():
        if name.startswith("layers."):
            held = name[: name.index(".", 7) + 1] in layers
        elif name.startswith("embed."):
            held = stage == 0 or (
                stage == pp - 1 and name == "embed.word.weight" and config.tie_embeddings
            )
        else:  # final_norm, lm_head
            held = stage == pp - 1
        if held:
            numel = math.prod(spec.shape)
            total += numel // tp if spec.split_dim is not None else numel
    return total


def training_flops(config: ModelConfig, *, seq_len: int, recompute: str) -> tuple[float, float]:
    """(model, hardware) FLOPs per trained token; hardware adds the recomputed forward."""
    forward = forward_flops_per_token(config, seq_len=seq_len)
    logits = 2.0 * config.hidden_size * config.padded_vocab_size()
    model = 3.0 * forward
    if recompute == "full":
        return model, model + (forward - logits)
    if recompute == "selective":  # q k^T and p v again, 2 FLOPs per multiply-add
        return model, model + 4.0 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return model, model


def layer_activation_bytes(
    config: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int,
    tp: int,
    sp: bool,
    mode: str,
    flash: bool,
) -> float:
    """Activation bytes one layer keeps for backward for one micro-batch (16-bit activations).

    Korthikanti et al. 2022 count 34 s b h + 5 a s^2 b per layer for GPT
    (A = h, f = 4h, with dropout); generalised here to head width A = n d and
    ffn f: kept whole on every TP rank are the norm inputs (4 sbh), the qkv
    and fc1 inputs (4 sbh) and dropout masks (2 sbh); split over TP are q, k, v
    and the projection input (8 sbA), the MLP (4 sbf; 6 sbf for SwiGLU) and the
    softmax (2 a s^2 b, plus 3 a s^2 b with attention dropout).
    """
    s, b, h, f = seq_len, micro_batch, config.hidden_size, config.ffn_hidden_size
    a, inner = config.num_heads, config.num_heads * config.head_dim
    sbh = s * b * h
    if mode == "full":  # only the layer input is kept
        return 2.0 * sbh / (tp if sp else 1)
    dropout = config.dropout > 0
    replicated = (8 + (2 if dropout else 0)) * sbh
    mlp = (6 if config.activation == "swiglu" else 4) * s * b * f
    split = 8 * s * b * inner + mlp
    if mode == "none" and not flash:
        split += (5 if dropout else 2) * a * s * s * b
    return replicated / (tp if sp else 1) + split / tp


def activation_bytes(stage: StageInput, *, mode: str, pipeline_stage: int) -> float:
    """Activations of one GPU of ``pipeline_stage`` at the peak of a 1F1B step."""
    t, cfg, plan = stage.train, stage.model, stage.plan
    tp, pp, accum = t.parallel.tp, t.parallel.pp, max(t.batch.grad_accum, 1)
    s, b, sp = t.data.seq_len, t.batch.micro_batch_size, plan.sequence_parallel
    per_layer = functools.partial(
        layer_activation_bytes,
        cfg,
        seq_len=s,
        micro_batch=b,
        tp=tp,
        sp=sp,
        flash=plan.flash_attention,
    )
    in_flight = min(pp - pipeline_stage, accum)
    layers = len(_stage_layers(cfg, pp, pipeline_stage))
    kept = layers * in_flight * per_layer(mode=mode)
    if mode == "full":  # backward rebuilds one layer's activations at a time
        kept += per_layer(mode="none")
    sbh = s * b * cfg.hidden_size / (tp if sp else 1)
    if pipeline_stage == 0 and cfg.dropout > 0:
        kept += in_flight * sbh  # embedding dropout mask
    if pipeline_stage == pp - 1:
        # final norm and head inputs, bf16 logits and the fp32 softmax kept for the loss
        kept += 4 * sbh + 6.0 * s * b * cfg.padded_vocab_size() / tp
    return kept


def memory_per_gpu(stage: StageInput) -> Memory:
    """The pipeline stage with the largest total, broken down (see the module docstring)."""
    t = stage.train
    tp, pp, dp, zero = t.parallel.tp, t.parallel.pp, t.parallel.dp, t.parallel.zero_stage
    low = 2 if t.train.dtype == "bf16" else 4
    best: Memory | None = None
    for i in range(pp):
        local = params_per_gpu(stage.model, tp=tp, pp=pp, stage=i)
        grads = low * local / (dp if zero >= 2 else 1)
        # ZeRO >= 1: fp32 master + exp_avg + exp_avg_sq + fp32 grad partition, over DP.
        optimizer = 16.0 * local / dp if zero >= 1 else (12.0 if low == 2 else 8.0) * local
        by_mode = {m: activation_bytes(stage, mode=m, pipeline_stage=i) for m in RECOMPUTE_MODES}
        mem = Memory(
            pipeline_stage=i,
            weights=float(low * local),
            grads=float(grads),
            optimizer=optimizer,
            activations=by_mode[stage.train.train.recompute],
            overhead=stage.plan.overhead_gb * GIB,
            activations_by_mode=by_mode,
        )
        if best is None or mem.total > best.total:
            best = mem
    assert best is not None
    return best


# ----------------------------------------------------------------------------- checks


def _layout_checks(stage: StageInput, gpus: int) -> list[Check]:
    t, cfg = stage.train, stage.model
    tp, pp, dp = t.parallel.tp, t.parallel.pp, t.parallel.dp
    b = t.batch
    vocab = cfg.padded_vocab_size()
    node = stage.plan.gpus_per_node
    rules = [
        (cfg.num_heads % tp == 0, "error", f"num_heads ({cfg.num_heads}) divisible by TP ({tp})"),
        (cfg.ffn_hidden_size % tp == 0, "error", f"ffn_hidden_size ({cfg.ffn_hidden_size}) divisible by TP ({tp})"),
        (vocab % tp == 0, "error", f"padded vocab ({vocab}, from {cfg.vocab_size}) divisible by TP ({tp})"),
        (cfg.num_layers % pp == 0, "error", f"num_layers ({cfg.num_layers}) divisible by PP ({pp})"),
        (tp * pp * dp == gpus, "error", f"TP ({tp}) x PP ({pp}) x DP ({dp}) = {tp * pp * dp} to equal the GPUs ({gpus})"),
        (
            b.global_batch_size == b.micro_batch_size * b.grad_accum * dp and b.grad_accum >= 1,
            "error",
            f"global batch ({b.global_batch_size}) = micro batch ({b.micro_batch_size}) x grad "
            f"accum ({b.grad_accum}) x DP ({dp}) (= {b.micro_batch_size * b.grad_accum * dp})",
        ),
        (t.data.seq_len <= cfg.max_seq_len, "error", f"seq_len ({t.data.seq_len}) <= max_seq_len ({cfg.max_seq_len})"),
        (t.train.dtype != "bf16" or t.parallel.zero_stage >= 1, "error", "bf16 runs use ZeRO stage >= 1"),
        (node % tp == 0, "warn", f"TP ({tp}) stays inside a node of {node} GPUs"),
        (pp == 1 or b.grad_accum >= pp, "warn", f"micro-batches per step ({b.grad_accum}) >= PP ({pp}) keeps the pipeline full"),
    ]  # fmt: skip
    return [Check("ok", text) if ok else Check(level, f"needs {text}") for ok, level, text in rules]


def deepspeed_checks(stage: StageInput, path: Path) -> list[Check]:
    """A DeepSpeed JSON config must say what the training config says."""
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [Check("error", f"{path}: cannot read DeepSpeed config ({err})")]
    t = stage.train
    expected = {
        "train_batch_size": t.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": t.batch.micro_batch_size,
        "gradient_accumulation_steps": t.batch.grad_accum,
        "zero_optimization.stage": t.parallel.zero_stage,
        "bf16.enabled": t.train.dtype == "bf16",
        "gradient_clipping": t.optimizer.clip_grad,
    }
    wrong = []
    for key, want in expected.items():
        node: Any = ds
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != want:
            wrong.append(f"{key} is {node!r}, the training config says {want!r}")
    if wrong:
        return [Check("error", f"{path.name}: {w}") for w in wrong]
    return [Check("ok", f"{path.name} agrees with the training config")]


def _trainer_checks(stage: StageInput, gpus: int) -> list[Check]:
    """The trainer's own validation, as warnings: it also covers what the trainer does
    not support *yet*, which a plan should show but not fail on."""
    try:
        stage.train.resolve(world_size=gpus)
    except ConfigError as err:
        lines = [ln.strip().removeprefix("- ") for ln in str(err).splitlines()[1:]]
        return [Check("warn", f"train config: {ln}") for ln in lines if ln]
    return []


def growth_io(source: StagePlan, src: ModelConfig, target: StagePlan, dst: ModelConfig) -> GrowthIO:
    """Bytes the offline grow step reads and writes, and whether MSG can grow src into dst."""
    checks = [
        Check("error", f"growth cannot change {o}: {getattr(src, o)!r} -> {getattr(dst, o)!r}")
        for o in FIXED_OPTIONS
        if getattr(src, o) != getattr(dst, o)
    ]
    shrunk = [
        f"{n} {getattr(src, n)} -> {getattr(dst, n)}"
        for n in GROWN_SIZES
        if getattr(dst, n) < getattr(src, n)
    ]
    if shrunk:
        checks.append(Check("error", f"growth cannot shrink: {', '.join(shrunk)}"))
    if src.position_embedding == "learned" and src.max_seq_len != dst.max_seq_len:
        checks.append(
            Check(
                "error",
                f"max_seq_len {src.max_seq_len} -> {dst.max_seq_len} with learned positions",
            )
        )
    if not checks:
        grown = [n for n in GROWN_SIZES if getattr(dst, n) != getattr(src, n)]
        checks.append(Check("ok", f"MSG can grow {', '.join(grown) or 'nothing'}"))
    return GrowthIO(source.label, target.label, 12.0 * source.params, 12.0 * target.params, checks)


# ----------------------------------------------------------------------------- planning


def plan_stage(stage: StageInput, *, gpus: int = 0) -> StagePlan:
    t, cfg, plan = stage.train, stage.model, stage.plan
    tp, pp, dp = t.parallel.tp, t.parallel.pp, t.parallel.dp
    gpus = gpus or plan.gpus or tp * pp * dp
    seq, gbs = t.data.seq_len, t.batch.global_batch_size
    model_flops, hw_flops = training_flops(cfg, seq_len=seq, recompute=t.train.recompute)
    peak = plan.peak_tflops * 1e12 or t.logging.peak_flops or DEFAULT_PEAK_TFLOPS * 1e12
    mfu = plan.mfu or (plan.hfu * model_flops / hw_flops if plan.hfu else DEFAULT_MFU)
    tokens = plan.tokens or float(t.train.steps) * gbs * seq
    memory = memory_per_gpu(stage)
    params = count_parameters(cfg)
    specs = parameter_specs(cfg)
    embedding = sum(
        math.prod(s.shape) for n, s in specs.items() if n.startswith(("embed.", "lm_head."))
    )
    result = StagePlan(
        label=stage.label,
        shape={n: getattr(cfg, n) for n in (*GROWN_SIZES, "head_dim")}
        | {"vocab": cfg.padded_vocab_size()},
        params=params,
        embedding_params=embedding,
        params_per_gpu=params_per_gpu(cfg, tp=tp, pp=pp, stage=memory.pipeline_stage),
        layout={
            "tp": tp,
            "pp": pp,
            "dp": dp,
            "gpus": gpus,
            "zero_stage": t.parallel.zero_stage,
            "dtype": t.train.dtype,
            "micro_batch": t.batch.micro_batch_size,
            "grad_accum": t.batch.grad_accum,
            "global_batch": gbs,
            "seq_len": seq,
            "recompute": t.train.recompute,
            "flash_attention": plan.flash_attention,
            "sequence_parallel": plan.sequence_parallel,
        },
        flops_per_token=model_flops,
        hw_flops_per_token=hw_flops,
        memory=memory,
        gpu_memory=plan.gpu_memory_gb * GIB,
        tokens=tokens,
        peak_flops=peak,
        mfu=mfu,
        hfu=mfu * hw_flops / model_flops,
        days=tokens * model_flops / (gpus * peak * mfu) / 86400.0,
    )
    fit = f"{gib(memory.total)} per GPU (pipeline stage {memory.pipeline_stage}) <= {plan.gpu_memory_gb:g} GiB"
    layout = _layout_checks(stage, gpus)
    # The trainer's validation repeats the layout checks; show it only past them.
    trainer = _trainer_checks(stage, gpus) if all(c.level != "error" for c in layout) else []
    result.checks = [
        *layout,
        Check(
            "ok" if result.fits else "error", ("fits: " if result.fits else "DOES NOT FIT: ") + fit
        ),
        *trainer,
        *(deepspeed_checks(stage, stage.deepspeed_config) if stage.deepspeed_config else []),
    ]
    return result


def plan_all(
    stages: Sequence[StageInput], *, gpus: int = 0
) -> tuple[list[StagePlan], list[GrowthIO]]:
    plans = [plan_stage(s, gpus=gpus) for s in stages]
    moves = [
        growth_io(plans[i], stages[i].model, plans[i + 1], stages[i + 1].model)
        for i in range(len(plans) - 1)
    ]
    return plans, moves


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megatron-msg plan",
        description="Parameters, FLOPs, memory per GPU, time and growth I/O of each stage config.",
    )
    parser.add_argument("configs", nargs="+", help="stage configs (YAML), in growth order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every config, e.g. plan.mfu=0.45")  # fmt: skip
    parser.add_argument(
        "--hostfile", help="DeepSpeed hostfile; its slots must equal every stage's world size"
    )
    parser.add_argument(
        "--gpus", type=int, default=0, help="GPUs available (instead of --hostfile)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON output to FILE")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if any check fails (e.g. does not fit)"
    )
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        gpus = hostfile_slots(args.hostfile) if args.hostfile else args.gpus
        stages = [s for path in args.configs for s in load_stages(path, args.overrides)]
    except (ConfigError, OSError, yaml.YAMLError) as err:
        print(f"megatron-msg plan: {err}", file=sys.stderr)
        return 2
    plans, moves = plan_all(stages, gpus=gpus)
    checks = [c for p in plans for c in p.checks] + [c for g in moves for c in g.checks]
    failed = any(c.level == "error" for c in checks)
    report = {
        "stages": [p.to_dict() for p in plans],
        "growth": [dataclasses.asdict(g) for g in moves],
        "ok": not failed,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(plans, moves))
        if failed:
            print("\nsome checks failed (marked [error] above)")
    return 1 if failed and args.strict else 0
