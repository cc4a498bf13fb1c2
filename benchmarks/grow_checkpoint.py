"""Growth-tool benchmark: throughput against `cp -r`, peak memory, and an 80-layer model.

1. Throughput, interleaved (grow, then copies, each repetition), two cases (width
   and depth growth; depth only, where every tensor is an unchanged copy):
   `megatron-msg grow` (in process, no verification) of a generated canonical
   checkpoint of a few hundred MB, against `cp -r` of the *grown* checkpoint (the
   same bytes the tool writes), `cp -r` plus fsync of every copied file (the tool
   fsyncs each shard it writes, cp does not), and a user-space copy loop (what
   any tool that makes its bytes in memory must at least pay; cp copies inside
   the kernel with copy_file_range). Goal: grow <= 2x the cp time.
2. Peak memory: the tool in a fresh subprocess (no verification, then with the
   layer-by-layer verification), peak RSS from getrusage / VmHWM, against the
   largest tensor of the grown checkpoint. Goal: peak <= 4x largest + 300 MB.
3. The FLM-101B topology at small width: 40 layers -> 80 layers with width
   growth, a target that must fit TP=4 / PP=4, shards of --shard-mb MiB so the
   file count resembles the real run's; time, files, layer-by-layer verification,
   and every (pipeline stage, TP rank) reading its slices.

    python benchmarks/grow_checkpoint.py [--reps 3] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_msg.checkpoint.canonical import CanonicalMeta, CanonicalReader, CanonicalWriter
from megatron_msg.config import ModelConfig
from megatron_msg.growth.grow_tool import SIZE_OPTIONS, GrowOptions, grow_checkpoint
from megatron_msg.model.canonical import canonical_specs
from megatron_msg.model.init import iter_canonical_init

# ~54M parameters: 0.65 GB with both moments; grown to ~1.3 GB.
SOURCE = ModelConfig(
    vocab_size=32000,
    hidden_size=512,
    ffn_hidden_size=2048,
    num_heads=8,
    head_dim=64,
    num_layers=12,
    max_seq_len=512,
)
TARGET = {"hidden": 640, "ffn": 2560, "heads": 10, "layers": 16}
# Part 1 cases: new entries everywhere (random draws, moment fills) and depth only
# (every tensor an unchanged copy, as in FLM-101B's 51B -> 101B step).
CASES = {"width+depth": TARGET, "depth only": {"layers": 24}}
# FLM-101B's 51B -> 101B step at 1/40 of the width: 40 -> 80 layers (plus some width),
# vocabulary and head layout as the real run; the target must fit TP=4 / PP=4.
FLM_SOURCE = ModelConfig(
    vocab_size=100256,
    hidden_size=256,
    ffn_hidden_size=1024,
    num_heads=8,
    head_dim=32,
    num_layers=40,
    max_seq_len=2048,
    position_embedding="rope",
)
FLM_TARGET = {"hidden": 384, "ffn": 1536, "heads": 12, "layers": 80}


def write_source(path: Path, config: ModelConfig, *, shard_bytes: int) -> int:
    """A canonical checkpoint of ``config`` (init weights, synthetic moments), streamed."""
    gen = torch.Generator().manual_seed(0)
    with CanonicalWriter(path, shard_bytes=shard_bytes) as writer:
        for name, weight in iter_canonical_init(config, seed=1):
            writer.add(name, weight)
            writer.add(name, torch.randn(weight.shape, generator=gen) * 1e-3, kind="exp_avg")
            writer.add(name, torch.rand(weight.shape, generator=gen) * 1e-6, kind="exp_avg_sq")
        writer.finalize(CanonicalMeta(model=config, step=1000, stage=1))
    return tree_bytes(path)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def grown_config(config: ModelConfig, sizes: dict[str, int]) -> ModelConfig:
    return config.replace(**{SIZE_OPTIONS[k]: v for k, v in sizes.items()})


def largest_tensor_bytes(config: ModelConfig) -> int:
    return max(int(torch.Size(s.shape).numel()) * 4 for s in canonical_specs(config).values())


def grow(src: Path, dst: Path, sizes: dict[str, int], **options: Any) -> Any:
    shutil.rmtree(dst, ignore_errors=True)
    opts = GrowOptions(progress=False, **options)
    return grow_checkpoint(load=src, save=dst, sizes=sizes, options=opts)


def copy(src: Path, dst: Path, *, fsync: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of cp plus of the fsync calls)."""
    shutil.rmtree(dst, ignore_errors=True)
    cpu = _cpu_seconds()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    if fsync:
        for file in dst.rglob("*"):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - start, _cpu_seconds() - cpu


def user_copy(src: Path, dst: Path) -> tuple[float, float]:
    """Copy ``src`` through user space (readinto / write, one reused 64 MiB buffer): the
    floor for any tool that produces its bytes in memory. (wall s, CPU s)"""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    buf = memoryview(bytearray(64 << 20))
    cpu, start = _cpu_seconds(), time.perf_counter()
    for file in sorted(src.iterdir()):
        with open(file, "rb", buffering=0) as fin, open(dst / file.name, "wb", buffering=0) as fout:
            while count := fin.readinto(buf):
                fout.write(buf[:count])
    return time.perf_counter() - start, _cpu_seconds() - cpu


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def throughput(work: Path, reps: int) -> dict[str, Any]:
    """Each case: grow, then cp -r of its output, then cp -r + fsync; all cases in every
    repetition (interleaved: the machine is shared, so drift hits everything alike)."""
    src = work / "src"
    src_bytes = write_source(src, SOURCE, shard_bytes=256 << 20)
    keys = [f"{case}/{what}" for case in CASES for what in ("grow", "cp", "cp_fsync", "user_copy")]
    times: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    written: dict[str, int] = {}
    for _ in range(reps):
        for case, sizes in CASES.items():
            dst = work / f"grown_{case}"
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            report = grow(src, dst, sizes, verify="off")
            times[f"{case}/grow"].append(time.perf_counter() - start)
            cpu[f"{case}/grow"].append(_cpu_seconds() - cpu_start)
            written[case] = report.bytes_written
            for what, fsync in (("cp", False), ("cp_fsync", True)):
                wall, used = copy(dst, work / "copy", fsync=fsync)
                times[f"{case}/{what}"].append(wall)
                cpu[f"{case}/{what}"].append(used)
            wall, used = user_copy(dst, work / "copy")
            times[f"{case}/user_copy"].append(wall)
            cpu[f"{case}/user_copy"].append(used)
            shutil.rmtree(work / "copy")
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    cases = {
        case: {
            "grown_bytes": tree_bytes(work / f"grown_{case}"),
            "ratio_cp": med[f"{case}/grow"] / med[f"{case}/cp"],
            "ratio_cp_fsync": med[f"{case}/grow"] / med[f"{case}/cp_fsync"],
            "cpu_ratio_cp": med_cpu[f"{case}/grow"] / med_cpu[f"{case}/cp"],
            "ratio_user_copy": med[f"{case}/grow"] / med[f"{case}/user_copy"],
            "grow_mb_s": written[case] / med[f"{case}/grow"] / 1e6,
        }
        for case in CASES
    }
    for case in CASES:
        if case != "width+depth":
            shutil.rmtree(work / f"grown_{case}")
    return {
        "source_bytes": src_bytes,
        "times": times,
        "median": med,
        "cpu": cpu,
        "median_cpu": med_cpu,
        "cases": cases,
    }


def rss_child(load: str, save: str, verify: str, sizes: str) -> None:
    """Run in a fresh process: grow and print peak RSS figures as JSON."""
    baseline = _status_kb("VmRSS")
    grow(Path(load), Path(save), json.loads(sizes), verify=verify)
    # VmHWM is this process's peak. (getrusage's ru_maxrss is not used: after
    # subprocess's vfork + exec it starts from the *parent's* peak.)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps({"baseline_kb": baseline, "peak_kb": _status_kb("VmHWM"), "maxrss_kb": maxrss})
    )


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory(work: Path) -> dict[str, Any]:
    src, out = work / "src", {}
    largest = largest_tensor_bytes(
        SOURCE.replace(hidden_size=640, ffn_hidden_size=2560, num_heads=10, num_layers=16)
    )
    for verify in ("off", "layers"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-child",
                str(src),
                str(work / "rss"),
                verify,
                json.dumps(TARGET),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        out[verify] = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(work / "rss", ignore_errors=True)
    return {"largest_bytes": largest, "goal_bytes": 4 * largest + 300e6, **out}


def flm_topology(work: Path, shard_mb: int) -> dict[str, Any]:
    src, dst = work / "flm_src", work / "flm_grown"
    start = time.perf_counter()
    src_bytes = write_source(src, FLM_SOURCE, shard_bytes=shard_mb << 20)
    made = time.perf_counter() - start
    report = grow(src, dst, FLM_TARGET, verify="layers", tp=4, pp=4, shard_bytes=shard_mb << 20)
    grid = tp_pp_reads(dst, tp=4, pp=4)
    result = {
        "source_bytes": src_bytes,
        "source_files": sum(1 for p in src.iterdir()),
        "grown_bytes": tree_bytes(dst),
        "grown_files": sum(1 for p in dst.iterdir()),
        "write_seconds_source": made,
        "grow_seconds": report.grow_seconds,
        "verify_seconds": report.verify_seconds,
        "verification": str(report.verification),
        "tensors": report.tensors,
        **grid,
    }
    shutil.rmtree(src)
    shutil.rmtree(dst)
    return result


def tp_pp_reads(path: Path, *, tp: int, pp: int) -> dict[str, Any]:
    """Every (pipeline stage, TP rank) reads its slices of the weights; sizes must add up."""
    start = time.perf_counter()
    with CanonicalReader(path) as reader:
        config = reader.meta.model
        specs = canonical_specs(config)
        per_stage = config.num_layers // pp
        total = 0
        for stage in range(pp):
            layers = range(stage * per_stage, (stage + 1) * per_stage)
            names = [n for n in reader.names() if _stage_of(n, per_stage, pp) == stage]
            assert all(
                _stage_of(f"layers.{i}.norm1.weight", per_stage, pp) == stage for i in layers
            )
            for rank in range(tp):
                for name in names:
                    dim = specs[name].split_dim
                    if dim is None:
                        piece = reader.get(name) if rank == 0 else None
                    else:
                        piece = reader.get_shard(name, dim=dim, rank=rank, world=tp)
                    total += 0 if piece is None else piece.nbytes
        weights = reader.nbytes("weights")
    assert total == weights, (total, weights)
    return {"grid_read_seconds": time.perf_counter() - start, "grid_bytes": total}


def _stage_of(name: str, per_stage: int, pp: int) -> int:
    if name.startswith("layers."):
        return int(name.split(".")[1]) // per_stage
    return 0 if name.startswith(("embed.", "masks.")) else pp - 1


def report_text(tp: dict[str, Any], mem: dict[str, Any], flm: dict[str, Any], cmd: str) -> str:
    gb, mb = 1e9, 1e6
    lines = [
        f"## Growth tool (megatron-msg grow) — {datetime.date.today().isoformat()}",
        "",
        "Machine: 2-core CPU VM, no GPU, shared with other engineers while measuring "
        "(timings are noisy; ratios are from interleaved runs, median of the repetitions).",
        f"Command: `{cmd}`",
        "",
        f"1. Throughput: source {tp['source_bytes'] / gb:.2f} GB (hidden 512, ffn 2048, 8 heads, "
        f"12 layers, vocab 32000; weights + exp_avg + exp_avg_sq), grown in process (no "
        f"verification) vs `cp -r` of the grown output, interleaved, median of the runs:",
    ]
    for case, sizes in CASES.items():
        c, key = tp["cases"][case], f"{case}/"
        goal = "met" if c["ratio_cp"] <= 2 else "NOT met"
        lines += [
            f"   {case} {sizes} -> {c['grown_bytes'] / gb:.2f} GB: grow "
            f"{tp['median'][key + 'grow']:.2f} s ({c['grow_mb_s']:.0f} MB/s written), cp -r "
            f"{tp['median'][key + 'cp']:.2f} s, cp -r + fsync {tp['median'][key + 'cp_fsync']:.2f} s "
            f"-> grow / cp = {c['ratio_cp']:.2f}x, grow / (cp + fsync) = {c['ratio_cp_fsync']:.2f}x "
            f"(goal <= 2x cp: {goal}). CPU seconds: grow {tp['median_cpu'][key + 'grow']:.2f} "
            f"(both threads), cp {tp['median_cpu'][key + 'cp']:.2f} "
            f"({c['cpu_ratio_cp']:.1f}x). A user-space copy of the same files (readinto/write, "
            f"64 MiB buffer) takes {tp['median'][key + 'user_copy']:.2f} s "
            f"(CPU {tp['median_cpu'][key + 'user_copy']:.2f} s): grow / user-space copy = "
            f"{c['ratio_user_copy']:.2f}x.",
        ]
    runs = {k: [round(x, 2) for x in v] for k, v in tp["times"].items()}
    lines.append(f"   All runs (s): {json.dumps(runs)}")
    for verify, label in (
        ("off", "2a. Peak RSS, no verification"),
        ("layers", "2b. Peak RSS, layer-by-layer verification"),
    ):
        peak = mem[verify]["peak_kb"] * 1024
        goal = "met" if peak <= mem["goal_bytes"] else "NOT met"
        lines.append(
            f"{label}: {peak / mb:.0f} MB (process after imports "
            f"{mem[verify]['baseline_kb'] * 1024 / mb:.0f} MB); largest tensor "
            f"{mem['largest_bytes'] / mb:.0f} MB, goal 4x + 300 MB = {mem['goal_bytes'] / mb:.0f} "
            f"MB: {goal}."
        )
    lines += [
        f"3. FLM-101B topology at small width: 40 -> 80 layers, hidden 256 -> 384, ffn 1024 -> "
        f"1536, heads 8 -> 12 (head_dim 32), vocab 100256, target checked for TP=4/PP=4: "
        f"{flm['source_files']} -> {flm['grown_files']} files, {flm['source_bytes'] / gb:.2f} -> "
        f"{flm['grown_bytes'] / gb:.2f} GB, {flm['tensors']} tensors written, grow "
        f"{flm['grow_seconds']:.1f} s, verification {flm['verify_seconds']:.1f} s "
        f"({flm['verification']}); all 16 (stage, TP rank) slice sets read back in "
        f"{flm['grid_read_seconds']:.1f} s and add up to the weights ({flm['grid_bytes'] / gb:.2f} GB).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--shard-mb", type=int, default=16, help="shard size of part 3")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--append", type=Path, default=None, help="append to RESULTS.md")
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        tp = throughput(work, args.reps)
        print(json.dumps(tp, indent=1), flush=True)
        mem = peak_memory(work)
        print(json.dumps(mem, indent=1), flush=True)
        shutil.rmtree(work / "src")
        shutil.rmtree(work / "grown_width+depth")
        flm = flm_topology(work, args.shard_mb)
        print(json.dumps(flm, indent=1), flush=True)
    cmd = "python benchmarks/grow_checkpoint.py " + " ".join(sys.argv[1:])
    text = report_text(tp, mem, flm, cmd.strip())
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
