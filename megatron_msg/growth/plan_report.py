"""Human-readable output of ``megatron-msg plan`` (the numbers come from ``growth.planner``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_msg.growth.planner import GrowthIO, StagePlan

GIB = 1024**3


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def _count(value: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def _bytes(value: float) -> str:
    return f"{value / 1e9:.1f} GB" if value >= 1e8 else f"{value / 1e6:.1f} MB"


def _memory_rows(p: StagePlan) -> list[str]:
    lay, m = p.layout, p.memory
    dtype, zero = lay["dtype"], lay["zero_stage"]
    by_mode = ", ".join(f"{k} {gib(v)}" for k, v in m.activations_by_mode.items())
    if lay["flash_attention"]:
        by_mode += "; fused attention keeps no s^2 scores"
    rows = [
        (f"weights ({dtype})", m.weights, ""),
        (f"grads ({dtype}{', sharded over DP' if zero >= 2 else ''})", m.grads, ""),
        (
            "optimizer (fp32 master, m, v, grad" + (", sharded over DP)" if zero else ")"),
            m.optimizer,
            "",
        ),
        (f"activations (recompute {lay['recompute']})", m.activations, f"[{by_mode}]"),
        ("overhead (CUDA context, buffers)", m.overhead, ""),
        ("total", m.total, f"of {gib(p.gpu_memory)} -> {'fits' if p.fits else 'DOES NOT FIT'}"),
    ]
    return [f"    {label:<54}{gib(value):>11}  {note}".rstrip() for label, value, note in rows]


def format_stage(p: StagePlan) -> str:
    s, lay, m = p.shape, p.layout, p.memory
    world = lay["tp"] * lay["pp"] * lay["dp"]
    tokens = lay["global_batch"] * lay["seq_len"]
    lines = [
        f"== {p.label}",
        f"  shape         hidden {s['hidden_size']}, ffn {s['ffn_hidden_size']}, heads "
        f"{s['num_heads']} x {s['head_dim']}, layers {s['num_layers']}, vocab {s['vocab']} (padded)",
        f"  parameters    {_count(p.params)} ({p.params:,}; embeddings {_count(p.embedding_params)})",
        f"  layout        TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']} = {world} GPUs "
        f"({lay['gpus']} available), ZeRO-{lay['zero_stage']}, {lay['dtype']}",
        f"  batch         micro {lay['micro_batch']} x accum {lay['grad_accum']} x DP {lay['dp']}"
        f" = {lay['global_batch']} sequences of {lay['seq_len']} = {_count(tokens)} tokens",
        f"  FLOPs/token   model {p.flops_per_token:.3e} (6N + attention), hardware "
        f"{p.hw_flops_per_token:.3e} (recompute {lay['recompute']})",
        f"  memory/GPU    pipeline stage {m.pipeline_stage} (the fullest), "
        f"{_count(p.params_per_gpu)} parameters on the GPU",
        *_memory_rows(p),
        f"  time          {_count(p.tokens)} tokens at {p.mfu:.1%} MFU ({p.hfu:.1%} HFU) on "
        f"{lay['gpus']} x {p.peak_flops / 1e12:.0f} TFLOP/s: {p.days:.2f} days",
    ]
    lines += [f"  [{c.level:>5}] {c.text}" for c in p.checks if c.level != "ok"]
    passed = sum(c.level == "ok" for c in p.checks)
    lines.append(f"  checks        {passed} of {len(p.checks)} passed")
    return "\n".join(lines)


def format_growth(g: GrowthIO) -> str:
    head = (
        f"== grow {g.source} -> {g.target}: reads {_bytes(g.read_bytes)}, writes "
        f"{_bytes(g.write_bytes)} (fp32 weights + exp_avg + exp_avg_sq)"
    )
    return "\n".join([head, *(f"  [{c.level:>5}] {c.text}" for c in g.checks)])


def format_summary(plans: Sequence[StagePlan]) -> str:
    rows = [("stage", "params", "TP/PP/DP", "mem/GPU", "fits", "days")]
    rows += [
        (
            p.label,
            _count(p.params),
            f"{p.layout['tp']}/{p.layout['pp']}/{p.layout['dp']}",
            gib(p.memory.total),
            "yes" if p.fits else "NO",
            f"{p.days:.2f}",
        )
        for p in plans
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_report(plans: Sequence[StagePlan], moves: Sequence[GrowthIO]) -> str:
    blocks = [format_stage(p) for p in plans] + [format_growth(g) for g in moves]
    return "\n\n".join([*blocks, format_summary(plans)])
