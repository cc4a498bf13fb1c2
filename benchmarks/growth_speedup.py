"""Issue 7: does MSG reach a from-scratch model's validation loss sooner? (`make bench-growth`)

Three arms train side by side on CPU, seed by seed (A, B, C interleaved, so load
from other users of the machine falls on all three alike), with the same data
order, token budget, optimizer, and LR schedule (cosine with warm-up):

* ``scratch``: the target model from the first step;
* ``msg``: Masked Structural Growth from a model half as big in every dimension,
  growing hidden + FFN, then heads, then layers (each dimension at least once)
  to the target shape; new units ramp in behind masks;
* ``nomask``: the same schedule with ``ramp_steps: 0`` (new units fully on at
  once: the paper's "No Mask" ablation);
* ``net2net`` (optional, trained only when named in ``--arms``): the same
  schedule grown by the Net2Net/bert2BERT copy operator (growth/net2net.py:
  new units copy old ones, readers' weights split; no masks). It can be added
  to a finished benchmark later; the report then includes it.

Every ``eval_interval`` steps the validation loss is measured on fixed batches of
the held-out split (the same for every run), against the trainer's wall time
(its ``elapsed``: step and growth time, evaluation excluded) and against the
model FLOPs spent so far (the trainer's FLOPs-per-token formula of the model
that trained each step). Each run writes ``RUN/eval.jsonl`` as it goes and
``RUN/done.json`` at the end; finished runs are skipped when the benchmark is
started again, unfinished ones are retrained.

Speed-up = wall time for ``scratch`` to reach its final validation loss / wall
time for ``msg`` to reach the same loss (linearly interpolated between
evaluations); the same with FLOPs. The report goes to stdout,
``benchmarks/growth_speedup.png`` and a dated section of benchmarks/RESULTS.md.

Presets: ``full`` (the issue's sizing: target (h, f, n, L) = (256, 1024, 8, 8),
seq 128, batch 8, 800 steps, ~0.8M tokens, one epoch of a 6 MB corpus (~1.7M
tokens) with 12 held-out batches (12k tokens) per evaluation; a scratch run
takes ~9-10 minutes on this 2-core VM, a growth run ~5-6); ``small`` (target
(128, 512, 4, 4), 600 steps, 2-3 minutes a run: the reduced configuration);
``tiny`` (the test's miniature, seconds).

The corpus is the standard library's modules in a seeded random order (see
``megatron_msg.demo_corpus``), so the validation split is in-distribution.
The ``full`` preset's peak learning rate (1e-3, cosine to 1e-4) is the best of
{5e-4, 1e-3, 2e-3, 4e-3} for the *scratch* model (validation loss at step 400 of
the 800-step schedule, seed 1: 4.62 / 4.65 / 4.81 / 5.30; 1e-3 reaches 4.22 at
800), so the baseline is tuned and the growth arms share its learning rate
(benchmarks/RESULTS.md has the runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The three arms every report needs, then the optional Net2Net/bert2BERT copy operator
# (growth/net2net.py) on the same schedule: trained only when named in --arms.
CORE_ARMS = ("scratch", "msg", "nomask")
ARMS = (*CORE_ARMS, "net2net")
LABELS = {"scratch": "from scratch", "msg": "MSG", "nomask": "No Mask", "net2net": "Net2Net"}
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Preset:
    target: tuple[int, int, int, int]  # (hidden, ffn, heads, layers); head_dim fixed
    head_dim: int
    seq_len: int
    batch: int
    steps: int
    eval_interval: int
    eval_batches: int  # fixed validation batches of `batch` sequences
    vocab_size: int
    corpus_mb: float
    lr: float


PRESETS = {
    "full": Preset((256, 1024, 8, 8), 32, 128, 8, 800, 25, 12, 2048, 6.0, 1e-3),
    "small": Preset((128, 512, 4, 4), 32, 128, 8, 600, 25, 6, 2048, 3.0, 3e-3),
    "tiny": Preset((32, 64, 2, 2), 16, 16, 4, 20, 4, 2, 384, 0.2, 3e-3),
}


def schedule(preset: Preset, *, ramp: bool) -> list[dict[str, int]]:
    """MSG growth stages from half the target in every dimension (hidden+FFN, heads, layers)."""
    h, f, n, layers = preset.target
    s = preset.steps
    ramp_steps = max(2, s // 20) if ramp else 0
    return [
        {"start_step": s // 4, "hidden_size": h, "ffn_hidden_size": f, "ramp_steps": ramp_steps},
        {"start_step": (s * 2) // 5, "num_heads": n, "ramp_steps": ramp_steps},
        {"start_step": (s * 11) // 20, "num_layers": layers, "ramp_steps": ramp_steps},
    ]


SHAPE_KEYS = ("hidden_size", "ffn_hidden_size", "num_heads", "num_layers")


def run_config(
    preset: Preset,
    *,
    arm: str,
    seed: int,
    data_prefix: str,
    run_dir: Path,
    searched: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The trainer config (as the dict a YAML file would hold) of one arm and seed.

    ``searched`` (a ``schedule.yaml`` of `megatron-msg schedule-search`: the start
    model's shape and the ``growth:`` list) replaces the built-in MSG schedule.
    """
    h, f, n, layers = preset.target
    base = (h, f, n, layers) if arm == "scratch" else (h // 2, f // 2, n // 2, layers // 2)
    growth = [] if arm == "scratch" else schedule(preset, ramp=arm == "msg")
    if searched is not None and arm != "scratch":
        base = tuple(int(searched["model"][k]) for k in SHAPE_KEYS)  # type: ignore[assignment]
        growth = [dict(g, ramp_steps=g["ramp_steps"] if arm == "msg" else 0)
                  for g in searched["growth"]]  # fmt: skip
    if arm == "net2net":  # No Mask's stages, grown by copying units instead of masking new ones
        growth = [dict(g, operator="net2net") for g in growth]
    return {
        "model": {
            "vocab_size": preset.vocab_size, "hidden_size": base[0], "ffn_hidden_size": base[1],
            "num_heads": base[2], "head_dim": preset.head_dim, "num_layers": base[3],
            "max_seq_len": preset.seq_len, "norm": "rmsnorm", "activation": "swiglu",
            "position_embedding": "rope", "use_bias": False,
        },
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 0},
        "optimizer": {"lr": preset.lr, "betas": [0.9, 0.95], "weight_decay": 0.01, "clip_grad": 1.0},
        "lr": {"warmup_steps": max(1, preset.steps // 20), "decay_style": "cosine",
               "min_lr": preset.lr / 10},
        "batch": {"micro_batch_size": preset.batch, "global_batch_size": preset.batch},
        # data.seed is the same for every run: one data order and one validation set.
        "data": {"source": "indexed", "prefixes": [data_prefix], "split": "90,10,0",
                 "seq_len": preset.seq_len, "seed": 1234},
        "growth": growth,
        "checkpoint": {"interval": 0, "keep": 1},
        "logging": {"interval": preset.eval_interval, "tensorboard": False,
                    "progress_bar": False},
        "train": {"steps": preset.steps, "seed": seed, "run_dir": str(run_dir)},
    }  # fmt: skip


# ---- training one run ---------------------------------------------------------


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def cumulative_flops(config: Any, *, steps: int) -> float:
    """Model training FLOPs of the first ``steps`` optimizer steps (each step's own model)."""
    from megatron_msg.training.metrics import training_flops_per_token

    models = config.stage_models()
    tokens = config.batch.global_batch_size * config.data.seq_len
    per_token = [training_flops_per_token(m, seq_len=config.data.seq_len) for m in models]
    return sum(per_token[config.stage_at(step)] * tokens for step in range(steps))


def train_one(values: dict[str, Any], *, preset: Preset) -> dict[str, Any]:
    """Train one run in this process, evaluating as it goes; returns its done.json summary."""
    from megatron_msg.training.config import TrainConfig
    from megatron_msg.training.data import validation_batches
    from megatron_msg.training.engine import init_distributed
    from megatron_msg.training.loop import Trainer

    run_dir = Path(values["train"]["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again
    config = TrainConfig.from_dict(values)
    init_distributed()
    trainer = Trainer(config)
    valid = validation_batches(trainer.config, count=preset.eval_batches)
    log = run_dir / "eval.jsonl"
    cpu = 0.0  # process CPU seconds of training (all threads), evaluation excluded
    with open(log, "a") as handle:
        while True:
            step = trainer.step
            loss = sum(trainer.engine.eval_loss(*b) for b in valid) / len(valid)
            record = {"step": step, "elapsed": trainer.elapsed, "cpu": cpu, "val_loss": loss,
                      "flops": cumulative_flops(trainer.config, steps=step), "stage": trainer.stage}  # fmt: skip
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            if step >= preset.steps:
                break
            start_cpu = time.process_time()
            trainer.advance(to=min(step + preset.eval_interval, preset.steps))
            cpu += time.process_time() - start_cpu
    trainer.close()
    summary = {"seed": config.train.seed, "final_val_loss": loss, "elapsed": trainer.elapsed,
               "cpu": cpu, "growth_events": trainer.summary.growth_events}  # fmt: skip
    _write_json_atomic(run_dir / "done.json", summary)
    return summary


def _spec_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.config.json"


def _same_run(values: dict[str, Any], other: dict[str, Any]) -> bool:
    """Identical configs apart from where the run lives."""
    strip = [json.loads(json.dumps(v)) for v in (values, other)]
    for v in strip:
        v["train"].pop("run_dir", None)
    return strip[0] == strip[1]


def _finished_with(run_dir: Path, values: dict[str, Any]) -> bool:
    spec = _spec_path(run_dir)
    return (
        (run_dir / "done.json").exists()
        and spec.exists()
        and _same_run(values, json.loads(spec.read_text()))
    )


def _copy_finished(source: Path, run_dir: Path, values: dict[str, Any]) -> bool:
    """Copy ``source`` (a finished run of the same config) to ``run_dir``; False if unfit."""
    spec = _spec_path(source)
    if not ((source / "done.json").exists() and spec.exists()):
        return False
    if not _same_run(values, json.loads(spec.read_text())):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    tmp = run_dir.with_name(f".{run_dir.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("checkpoints"))
    _write_json_atomic(_spec_path(run_dir), values)
    tmp.replace(run_dir)
    return True


def search_schedule(
    preset: Preset, *, data_prefix: str, seed: int, out: Path, probe_steps: int,
    method: str = "grid",
) -> Path:  # fmt: skip
    """`megatron-msg schedule-search` from the msg arm's start shape to the target (probes
    with this benchmark's data, optimizer and LR schedule; CPU-time clock, steadier on a
    shared machine); returns the schedule.yaml it wrote."""
    import subprocess

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    values = run_config(preset, arm="msg", seed=seed, data_prefix=data_prefix,
                        run_dir=out / "run")  # fmt: skip
    values["growth"] = []
    config = out / "run.yaml"
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    ramp = max(2, preset.steps // 20)  # as the built-in schedule
    cmd = [sys.executable, "-m", "megatron_msg.cli", "schedule-search", "--config", str(config),
           "--target", ",".join(map(str, preset.target)), "--out", str(out), "--clock", "cpu",
           "--probe-steps", str(probe_steps or preset.steps // 4),
           "--eval-interval", str(preset.eval_interval), "--eval-batches", str(preset.eval_batches),
           "--ramp-steps", str(ramp), "--method", method]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    subprocess.run(cmd, check=True, env=env)
    return out / "schedule.yaml"


def _read_schedule(path: Path, preset: Preset) -> dict[str, Any]:
    import yaml

    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict) or "model" not in values or "growth" not in values:
        raise ValueError(f"{path}: not a schedule-search schedule.yaml (needs model and growth)")
    final = [values["model"][k] for k in SHAPE_KEYS]
    for stage in values["growth"]:
        final = [stage.get(k) or v for k, v in zip(SHAPE_KEYS, final)]
    if tuple(final) != preset.target:
        raise ValueError(
            f"{path}: the schedule ends at {tuple(final)}, not the target {preset.target}"
        )
    return values


def _train_subprocess(values: dict[str, Any], preset_name: str, run_dir: Path) -> None:
    """One run per process: every run starts from a fresh DeepSpeed/torch state."""
    import subprocess

    run_dir.mkdir(parents=True, exist_ok=True)
    spec = _spec_path(run_dir)
    _write_json_atomic(spec, values)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    cmd = [sys.executable, __file__, "--_run-one", str(spec), "--preset", preset_name]
    subprocess.run(cmd, check=True, env=env)


# ---- analysis -----------------------------------------------------------------


def time_to_reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """First x at which the piecewise-linear curve (xs, ys) comes down to ``target``."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need equal, non-empty xs/ys, got {len(xs)} and {len(ys)} points")
    if ys[0] <= target:
        return xs[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 <= target:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def value_at(xs: list[float], ys: list[float], x: float) -> float:
    """The curve's value at ``x`` (linear interpolation; x must lie within xs)."""
    if not xs[0] <= x <= xs[-1]:
        raise ValueError(f"x={x} outside the curve's range [{xs[0]}, {xs[-1]}]")
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def speedup(
    base: tuple[list[float], list[float]], other: tuple[list[float], list[float]]
) -> float | None:
    """x for ``base`` to reach its final y / x for ``other`` to reach it (None: never)."""
    target = base[1][-1]
    t_base, t_other = time_to_reach(*base, target), time_to_reach(*other, target)
    if t_base is None or t_other is None or t_other <= 0:
        return None
    return t_base / t_other


AXES = ("elapsed", "cpu", "flops")  # wall seconds, training CPU seconds, model FLOPs


def load_curves(run_dir: Path) -> dict[str, list[float]]:
    """Validation loss and the cost axes of one run (runs older than the ``cpu`` axis lack it)."""
    records = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines() if x]
    keys = [k for k in (*AXES, "val_loss") if all(k in r for r in records)]
    return {k: [float(r[k]) for r in records] for k in keys}


def _spread(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    missed = len(values) - len(got)
    sd = statistics.stdev(got) if len(got) > 1 else 0.0
    text = f"{statistics.mean(got):.2f}x ± {sd:.2f} (min {min(got):.2f}, max {max(got):.2f})"
    return text + (f"; not reached in {missed} of {len(values)} seeds" if missed else "")


def analyse(out: Path, seeds: list[int], arms: tuple[str, ...] = CORE_ARMS) -> dict[str, Any]:
    """Per-seed speed-ups (wall time, FLOPs) and losses at equal wall time; ``arms`` starts
    with scratch, the baseline of every ratio."""
    grown = arms[1:]
    rows = []
    axes: list[str] = list(AXES)
    for seed in seeds:
        c = {arm: load_curves(out / f"{arm}_seed{seed}") for arm in arms}
        axes = [a for a in axes if all(a in c[arm] for arm in arms)]
        horizon = min(c[arm]["elapsed"][-1] for arm in arms)
        row: dict[str, Any] = {"seed": seed, "horizon_s": horizon}
        for arm in arms:
            row[f"{arm}_final"] = c[arm]["val_loss"][-1]
            row[f"{arm}_seconds"] = c[arm]["elapsed"][-1]
            row[f"{arm}_at_horizon"] = value_at(c[arm]["elapsed"], c[arm]["val_loss"], horizon)
        for arm in grown:
            for axis in axes:
                base = (c["scratch"][axis], c["scratch"]["val_loss"])
                row[f"{arm}_{axis}_speedup"] = speedup(base, (c[arm][axis], c[arm]["val_loss"]))
                # The reverse view, defined even when the arm never reaches scratch's loss:
                # scratch's cost to reach the arm's final loss / the arm's whole cost.
                reached = time_to_reach(*base, c[arm]["val_loss"][-1])
                row[f"{arm}_{axis}_reverse"] = (
                    None if reached is None else reached / c[arm][axis][-1]
                )
        rows.append(row)
    return {
        "rows": rows,
        "axes": axes,
        "arms": list(arms),
        **{
            f"{arm}_{axis}": _spread([r[f"{arm}_{axis}_speedup"] for r in rows])
            for arm in grown
            for axis in axes
        },
    }


def plot(out: Path, seeds: list[int], target: Path, arms: tuple[str, ...] = CORE_ARMS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "scratch": "tab:blue",
        "msg": "tab:green",
        "nomask": "tab:red",
        "net2net": "tab:orange",
    }
    fig, (by_time, by_flops) = plt.subplots(1, 2, figsize=(13, 5))
    for i, seed in enumerate(seeds):
        for arm in arms:
            c = load_curves(out / f"{arm}_seed{seed}")
            label = arm if i == 0 else None
            by_time.plot([t / 60 for t in c["elapsed"]], c["val_loss"], color=colors[arm],
                         lw=1.1, alpha=0.8, label=label)  # fmt: skip
            by_flops.plot(c["flops"], c["val_loss"], color=colors[arm], lw=1.1, alpha=0.8,
                          label=label)  # fmt: skip
            if arm == "scratch":
                continue
            done = json.loads((out / f"{arm}_seed{seed}" / "done.json").read_text())
            for event in done["growth_events"]:
                by_time.axvline(event["elapsed"] / 60, color=colors[arm], ls=":", lw=0.7)
    by_time.set_xlabel("wall time (min; growth events dotted)")
    by_flops.set_xlabel("model training FLOPs")
    for axis in (by_time, by_flops):
        axis.set_ylabel("validation loss")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"{' vs '.join(LABELS[a] for a in arms)}, seeds {seeds}")
    fig.tight_layout()
    tmp = target.with_name(f".{target.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(target)
    return target


def describe_schedule(values: dict[str, Any], searched: bool) -> str:
    """One sentence: where the MSG arm starts and when it grows into which shape."""
    shape = [values["model"][k] for k in SHAPE_KEYS]
    steps = []
    for stage in values["growth"]:
        shape = [stage.get(k) or v for k, v in zip(SHAPE_KEYS, shape)]
        steps.append(f"{tuple(shape)} at step {stage['start_step']}")
    start = tuple(values["model"][k] for k in SHAPE_KEYS)
    origin = "found by `megatron-msg schedule-search`" if searched else "built in"
    return (
        f"MSG schedule ({origin}, ramp {values['growth'][0]['ramp_steps']} steps): {start}, then "
        + ", ".join(steps)
        + "."
    )


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def report_text(result: dict[str, Any], *, preset: str, command: str, note: str) -> str:
    arms = result.get("arms", CORE_ARMS)
    grown = arms[1:]

    def per_arm(axis: str) -> str:
        return "; ".join(f"{LABELS[a]} {result[f'{a}_{axis}']}" for a in grown)

    title = " vs ".join(LABELS[a] for a in ("msg", "scratch", *grown[1:]))
    lines = [
        f"## Growth speed-up: {title} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Machine: 2-core CPU VM, no GPU ({platform.processor() or platform.machine()}), shared with "
        "whoever else uses it while measuring. "
        f"Command: `{command}` (preset `{preset}`). {note}",
        "",
        f"- speed-up to scratch's final validation loss, wall time: {per_arm('elapsed')}",
        *([f"- same, training CPU seconds: {per_arm('cpu')}"] if "cpu" in result["axes"] else []),
        f"- same, model FLOPs: {per_arm('flops')}",
        "- reverse (scratch's wall time / FLOPs to reach MSG's final loss, as a fraction of "
        "MSG's): "
        + ", ".join(
            f"seed {r['seed']} {_ratio(r['msg_elapsed_reverse'])} / {_ratio(r['msg_flops_reverse'])}"
            for r in result["rows"]
        ),
        "",
        "| seed | "
        + " | ".join(f"{a} final" for a in arms)
        + " | equal time (s) | "
        + " | ".join(f"{a} @t" for a in arms)
        + " | msg speed-up (time / FLOPs) |",
        "|---|" + "---|" * (2 * len(arms) + 2),
    ]
    for r in result["rows"]:
        su = "/".join(_ratio(r[k]) for k in ("msg_elapsed_speedup", "msg_flops_speedup"))
        finals = " | ".join(f"{r[f'{a}_final']:.4f}" for a in arms)
        at_t = " | ".join(f"{r[f'{a}_at_horizon']:.4f}" for a in arms)
        lines.append(f"| {r['seed']} | {finals} | {r['horizon_s']:.0f} | {at_t} | {su} |")
    return "\n".join(lines) + "\n"


def append_results(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(old.rstrip("\n") + "\n\n" + text)
    tmp.replace(path)


# ---- command line -------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="demo_out/growth_speedup", help="run directories (git-ignored)")
    p.add_argument("--data-dir", default="demo_out/data_growth_speedup", help="corpus cache")
    p.add_argument("--plot", default=str(HERE / "growth_speedup.png"))
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="'' to skip appending")
    p.add_argument("--note", default="", help="a sentence added to the RESULTS.md section")
    p.add_argument("--schedule", default="",
                   help="a schedule.yaml of `megatron-msg schedule-search` for the msg and nomask "
                        "arms (default: the built-in schedule)")  # fmt: skip
    p.add_argument("--search", action="store_true",
                   help="run `megatron-msg schedule-search` first (into OUT/search) and use its "
                        "schedule")  # fmt: skip
    p.add_argument("--probe-steps", type=int, default=0, help="--search probe length (0: steps/4)")
    p.add_argument("--search-method", choices=("grid", "branch"), default="grid",
                   help="--search: schedule-search --method (grid: from-scratch probes of every "
                        "shape; branch: grow the real model at branch points and measure)")  # fmt: skip
    p.add_argument("--lr", type=float, default=0.0,
                   help="peak learning rate of every arm (min_lr = lr/10); 0: the preset's")  # fmt: skip
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(CORE_ARMS),
                   help="train these arms (default: the three core arms; add net2net for the "
                        "copy-operator arm). The report needs the core arms finished in OUT with "
                        "this config, trained now or earlier; without them each trained run's "
                        "final loss and time are printed")  # fmt: skip
    p.add_argument("--reuse-scratch", default="",
                   help="an earlier benchmark's out dir: its finished scratch runs of identical "
                        "config are copied instead of retrained")  # fmt: skip
    p.add_argument("--_run-one", dest="run_one", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    preset = PRESETS[args.preset]
    if args.run_one:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        train_one(json.loads(Path(args.run_one).read_text()), preset=preset)
        return 0
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if args.lr < 0:
        raise ValueError(f"--lr must be positive (or 0 for the preset's), got {args.lr}")
    if args.lr:
        preset = dataclasses.replace(preset, lr=args.lr)
    from megatron_msg.demo_corpus import prepare_data

    # Modules in a seeded random order: the validation split (the last documents) is
    # then held out from the same distribution as the training split.
    data = prepare_data(Path(args.data_dir), max_bytes=int(preset.corpus_mb * 1e6),
                        vocab_size=preset.vocab_size, workers=2, shuffle_seed=0)  # fmt: skip
    out = Path(args.out)
    searched = None
    if args.search:
        args.schedule = str(search_schedule(preset, data_prefix=str(data.prefix), seed=args.seeds[0],
                                            out=out / "search", probe_steps=args.probe_steps,
                                            method=args.search_method))  # fmt: skip
    if args.schedule:
        searched = _read_schedule(Path(args.schedule), preset)
    for seed in args.seeds:
        for arm in (a for a in ARMS if a in args.arms):  # interleaved: A, B, C for each seed
            run_dir = out / f"{arm}_seed{seed}"
            values = run_config(preset, arm=arm, seed=seed, data_prefix=str(data.prefix),
                                run_dir=run_dir, searched=searched)  # fmt: skip
            if _finished_with(run_dir, values):
                print(f"{run_dir}: finished earlier with this config, kept")
                continue
            source = Path(args.reuse_scratch) / run_dir.name
            if arm == "scratch" and args.reuse_scratch and _copy_finished(source, run_dir, values):
                print(f"{run_dir}: copied from {source} (same config)")
                continue
            start = time.perf_counter()
            _train_subprocess(values, args.preset, run_dir)
            print(f"{run_dir}: done in {time.perf_counter() - start:.0f}s", flush=True)

    def finished(arm: str) -> bool:  # every seed's run of ``arm`` is in OUT, with this config
        return all(_finished_with(out / f"{arm}_seed{seed}",
                                  run_config(preset, arm=arm, seed=seed, data_prefix=str(data.prefix),
                                             run_dir=out / f"{arm}_seed{seed}", searched=searched))
                   for seed in args.seeds)  # fmt: skip

    arms = tuple(arm for arm in ARMS if finished(arm))
    if not set(CORE_ARMS) <= set(arms):
        for seed in args.seeds:
            for arm in args.arms:
                c = load_curves(out / f"{arm}_seed{seed}")
                print(f"{arm} seed {seed} (lr {preset.lr:g}): final validation loss "
                      f"{c['val_loss'][-1]:.4f} after {c['elapsed'][-1]:.0f}s")  # fmt: skip
        return 0
    result = analyse(out, args.seeds, arms)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--note" in given and given.index("--note") + 1 < len(given):  # the note is in the text
        given[given.index("--note") + 1] = "..."
    command = " ".join(["python", "benchmarks/growth_speedup.py", *given])
    msg_values = run_config(preset, arm="msg", seed=args.seeds[0], data_prefix="",
                            run_dir=out, searched=searched)  # fmt: skip
    text = report_text(result, preset=args.preset, command=command,
                       note=" ".join(x for x in (describe_schedule(msg_values, searched is not None),
                                                 args.note) if x))  # fmt: skip
    print(text)
    _write_json_atomic(out / "report.json", result)
    (out / "report.md").write_text(text)
    print(f"plot: {plot(out, args.seeds, Path(args.plot), arms)}")
    if args.results:
        append_results(Path(args.results), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
