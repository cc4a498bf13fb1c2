"""`megatron-msg convert` benchmark: time against `cp -r`, and peak memory against the model.

1. A real training checkpoint: a ~35M-parameter GPT trained one step by the
   trainer on 2 gloo ranks (TP=1, DP=2, ZeRO-1, fp32), saved through the
   trainer (DeepSpeed's files plus our metadata).
2. Interleaved, --reps times: the conversion in a fresh subprocess (time of the
   conversion itself, imports excluded) then `cp -r` of the same tag folder.
3. Memory, from the same subprocesses: a thread samples the process's
   anonymous resident memory (RssAnon, i.e. not the memory-mapped input files,
   which are clean page cache the kernel can drop) every 2 ms; reported as the
   peak above the level just before converting, against the largest canonical
   tensor and the full canonical state (weights + 2 moments). Goal: the
   conversion never holds the model: peak extra <= 2x the largest tensor + 64 MB.
   VmHWM (all resident pages, mapped files included) is reported too.

    python benchmarks/convert_checkpoint.py [--reps 3] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERRIDES = [
    "model.vocab_size=32000",
    "model.hidden_size=512",
    "model.ffn_hidden_size=2048",
    "model.num_heads=8",
    "model.head_dim=64",
    "model.num_layers=6",
    "model.max_seq_len=64",
    "data.source=synthetic",
    "data.seq_len=64",
    "batch.micro_batch_size=1",
    "batch.global_batch_size=2",
    "parallel.dp=2",
    "parallel.zero_stage=1",
    "train.steps=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]

CHILD = r"""
import json, sys, threading, time
from megatron_msg.checkpoint.deepspeed_files import _safe_globals
from megatron_msg.checkpoint.deepspeed_io import convert_to_canonical

# The one-off import of DeepSpeed (for its allow-listed types) is timed apart.
start = time.perf_counter()
_safe_globals()
import_seconds = time.perf_counter() - start

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

peak, done = [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.002)

base = status("RssAnon")
thread = threading.Thread(target=sample, daemon=True)
thread.start()
report = convert_to_canonical(load=sys.argv[1], save=sys.argv[2], overwrite=True)
done[0] = True
thread.join()
print(json.dumps({"seconds": report.seconds, "import": import_seconds, "base": base, "peak_anon": peak[0],
                  "hwm": status("VmHWM"), "nbytes": report.nbytes}))
"""


def _train(run_dir: Path) -> None:
    from tests.dist_utils import run_distributed

    run_distributed(_train_body, world_size=2, args=(str(run_dir),), timeout=900)


def _train_body(rank: int, world_size: int, run_dir: str) -> None:
    from megatron_msg.training.config import load_config
    from megatron_msg.training.loop import Trainer

    Trainer(load_config(None, [*OVERRIDES, f"train.run_dir={run_dir}"])).run()


def _convert(tag: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tag), str(out)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _copy(tag: Path, out: Path) -> tuple[float, float]:
    """Seconds of `cp -r`, and of `cp -r` plus fsync of every copy (the converter fsyncs)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(tag), str(out)], check=True)
    copied = time.perf_counter() - start
    subprocess.run(["sync", *map(str, out.iterdir())], check=True)
    return copied, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--append", default=None, help="append a dated section to this file")
    args = parser.parse_args()
    from megatron_msg.config import ModelConfig
    from megatron_msg.model.canonical import parameter_specs

    with tempfile.TemporaryDirectory(prefix="convert_bench_") as tmp:
        run_dir = Path(tmp) / "run"
        _train(run_dir)
        tag = next((run_dir / "checkpoints").glob("step_*"))
        input_bytes = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
        convert, copy, synced, runs = [], [], [], []
        for _ in range(args.reps):
            result = _convert(tag, Path(tmp) / "canonical")
            runs.append(result)
            convert.append(result["seconds"])
            plain, with_sync = _copy(tag, Path(tmp) / "copy")
            copy.append(plain)
            synced.append(with_sync)
    values = {k.split("=")[0][len("model.") :]: k.split("=")[1] for k in OVERRIDES[:7]}
    model = ModelConfig(**{k: int(v) for k, v in values.items()})
    largest = max(4 * math.prod(s.shape) for s in parameter_specs(model).values())
    extra = max(r["peak_anon"] - r["base"] for r in runs)
    goal = extra <= 2 * largest + 64 * 2**20
    mb = 2**20
    lines = [
        f"## {datetime.date.today()} convert_checkpoint (megatron-msg convert)",
        "",
        "Machine: 2-core CPU VM, no GPU, shared with other engineers while measuring.",
        f"Command: `python benchmarks/convert_checkpoint.py --reps {args.reps}`",
        "",
        f"- input: TP=1 DP=2 ZeRO-1 fp32 checkpoint of {input_bytes / mb:.0f} MiB; canonical "
        f"output {runs[0]['nbytes'] / mb:.0f} MiB (weights + exp_avg + exp_avg_sq)",
        f"- time, interleaved (median of {args.reps}): convert {statistics.median(convert):.2f} s "
        f"(plus a one-off {statistics.median(r['import'] for r in runs):.2f} s importing "
        f"DeepSpeed) vs `cp -r` {statistics.median(copy):.2f} s: "
        f"{statistics.median(convert) / statistics.median(copy):.1f}x; vs `cp -r` + fsync "
        f"{statistics.median(synced):.2f} s: "
        f"{statistics.median(convert) / statistics.median(synced):.1f}x",
        f"- memory: peak anonymous memory above the pre-conversion level {extra / mb:.0f} MiB; "
        f"largest tensor {largest / mb:.0f} MiB; full canonical state {runs[0]['nbytes'] / mb:.0f} "
        f"MiB; VmHWM (incl. mapped input pages) {max(r['hwm'] for r in runs) / mb:.0f} MiB",
        f"- goal (extra <= 2x largest tensor + 64 MiB, i.e. never the model): "
        f"{'met' if goal else 'NOT met'}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a") as handle:
            handle.write("\n" + text)
    return 0 if goal else 1


if __name__ == "__main__":
    sys.exit(main())
