"""Fused masked LayerNorm/RMSNorm vs composed PyTorch vs the unmasked torch norms.

Forward + backward (dx, dweight, dbias) per call, all candidates interleaved in
one loop (rotating order) so they share the machine's load; ratios are the
median over rounds of per-round ratios. Goals (issue 3): on CPU the fused
masked LayerNorm is >= 8x faster than the composed one and no slower than
unmasked F.layer_norm (ratio <= 1.0); same for RMSNorm against F.rms_norm.

Bandwidth: a fwd+bwd must read x and write y, then read x and dy and write dx:
5 * rows * hidden * itemsize bytes (weights are negligible). Achieved GB/s
counts those bytes; the copy reference is x.clone() (2 * size bytes).

    python benchmarks/masked_norm.py                        # CPU, fp32
    python benchmarks/masked_norm.py --device cuda --dtype bfloat16
    python benchmarks/masked_norm.py --append benchmarks/RESULTS.md --machine "..."
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_msg.ops import masked_layer_norm, masked_rms_norm
from megatron_msg.ops.reference import reference_masked_layer_norm, reference_masked_rms_norm

Step = Callable[[], object]


def _steps(rows: int, hidden: int, dtype: torch.dtype, device: str) -> dict[str, Step]:
    x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(rows, hidden, dtype=dtype, device=device)
    mask = torch.ones(hidden, device=device)
    mask[(3 * hidden) // 4 :] = 0.3  # a quarter of the channels mid-ramp

    def fwd_bwd(fn: Callable[[], torch.Tensor], *params: torch.Tensor) -> Step:
        return lambda: torch.autograd.grad(fn(), params, dy)

    shape = (hidden,)
    return {
        "ln_fused": fwd_bwd(lambda: masked_layer_norm(x, w, b, mask), x, w, b),
        "ln_composed": fwd_bwd(lambda: reference_masked_layer_norm(x, w, b, mask), x, w, b),
        "ln_torch": fwd_bwd(lambda: F.layer_norm(x, shape, w, b), x, w, b),
        "ln_fused_plain": fwd_bwd(lambda: masked_layer_norm(x, w, b, None), x, w, b),
        "rms_fused": fwd_bwd(lambda: masked_rms_norm(x, w, mask), x, w),
        "rms_composed": fwd_bwd(lambda: reference_masked_rms_norm(x, w, mask), x, w),
        "rms_torch": fwd_bwd(lambda: F.rms_norm(x, shape, w), x, w),
        "copy": lambda: x.detach().clone(),
    }


def _timer(device: str) -> Callable[[Step], float]:
    if device == "cuda":

        def cuda_time(step: Step) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(step: Step) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    return cpu_time


def measure(
    steps: dict[str, Step], *, rounds: int, warmup: int, device: str
) -> dict[str, list[float]]:
    timer = _timer(device)
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            timer(steps[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timer(steps[name]))
    return times


def _ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def report(times: dict[str, list[float]], rows: int, hidden: int, itemsize: int) -> list[str]:
    med = {k: statistics.median(v) for k, v in times.items()}
    gbs = {k: 5 * rows * hidden * itemsize / med[k] / 1e9 for k in med}
    copy_gbs = 2 * rows * hidden * itemsize / med["copy"] / 1e9
    lines = []
    for norm, torch_name in (("ln", "F.layer_norm"), ("rms", "F.rms_norm")):
        fused = f"{norm}_fused"
        lines.append(
            f"| {rows}x{hidden} | {norm.upper()} | {med[fused] * 1e3:.1f} | "
            f"{med[f'{norm}_composed'] * 1e3:.1f} | {med[f'{norm}_torch'] * 1e3:.1f} | "
            f"{_ratio(times, f'{norm}_composed', fused):.1f}x | "
            f"{_ratio(times, fused, f'{norm}_torch'):.2f} ({torch_name}) | "
            f"{gbs[fused]:.1f} | {copy_gbs:.1f} | {gbs[fused] / copy_gbs:.2f} |"
        )
    plain = _ratio(times, "ln_fused_plain", "ln_torch")
    lines.append(
        f"|  | LN, mask=None | {med['ln_fused_plain'] * 1e3:.1f} | | | | {plain:.2f} | | | |"
    )
    return lines


HEADER = [
    "| rows x hidden | norm | fused ms | composed ms | torch unmasked ms | fused speedup vs "
    "composed (goal >= 8x) | fused / torch unmasked (goal <= 1.0) | fused GB/s | copy GB/s | "
    "fraction of copy |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def _append(path: Path, text: str) -> None:
    """Append by writing a full new file and renaming it over the old one."""
    old = path.read_text() if path.exists() else ""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(old.rstrip("\n") + "\n\n" + text)
    os.replace(f.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--shapes", default="4096x1024,2048x5120,1024x10240")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this file")
    parser.add_argument("--machine", default="unspecified machine")
    args = parser.parse_args()
    os.environ["MEGATRON_MSG_NORM_IMPL"] = "fused"  # measure the kernel, never a silent fallback
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    lines = list(HEADER)
    for shape in args.shapes.split(","):
        rows, hidden = (int(v) for v in shape.split("x"))
        steps = _steps(rows, hidden, dtype, args.device)
        times = measure(steps, rounds=args.rounds, warmup=args.warmup, device=args.device)
        lines += report(times, rows, hidden, dtype.itemsize)
        print(lines[-3], lines[-2], lines[-1], sep="\n", flush=True)
    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    meta = (
        f"device {args.device}, dtype {args.dtype}, torch {torch.__version__}, "
        f"threads {threads}, rounds {args.rounds} (median of per-round ratios)"
    )
    table = "\n".join(lines)
    print(f"\n{meta}\n{table}")
    if args.append is not None:
        day = datetime.date.today().isoformat()
        command = "python " + shlex.join(sys.argv)
        body = f"## {day} masked_norm ({args.device}, {args.dtype})\n\nMachine: {args.machine}.\n"
        _append(args.append, f"{body}Command: `{command}`\n{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
