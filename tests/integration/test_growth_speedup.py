"""benchmarks/growth_speedup.py in miniature (preset ``tiny``, 1 seed, 3 arms): the real
corpus pipeline and trainer end to end, per-run logs, the report, the plot, and
resuming a cut-short benchmark (only the unfinished run is retrained).

One subprocess per benchmark invocation (the trainer initialises torch.distributed,
which must not leak into the pytest process); ~20 s on 2 cores.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "growth_speedup.py"
ARMS = ("scratch", "msg", "nomask")  # the core arms; net2net is trained when named


def _bench(tmp: Path, *extra: str, out: str = "runs") -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, str(SCRIPT), "--preset", "tiny", "--seeds", "5",
        "--out", str(tmp / out), "--data-dir", str(tmp / "data"),
        "--plot", str(tmp / "speedup.png"), "--results", str(tmp / "RESULTS.md"), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _check_run_logs(runs: Path, *, growths: int = 3, first_growth: int = 5,
                    ramp_logged: bool = True) -> None:  # fmt: skip
    for arm in ARMS:
        run = runs / f"{arm}_seed5"
        evals = _lines(run / "eval.jsonl")
        assert [r["step"] for r in evals] == list(range(0, 21, 4)), arm
        assert evals[-1]["val_loss"] < evals[0]["val_loss"], arm  # it learned
        assert all(b["elapsed"] > a["elapsed"] and b["flops"] > a["flops"]
                   for a, b in itertools.pairwise(evals)), arm  # fmt: skip
        done = json.loads((run / "done.json").read_text())
        assert done["seed"] == 5 and done["final_val_loss"] == evals[-1]["val_loss"]
        assert len(done["growth_events"]) == (0 if arm == "scratch" else growths)
        assert all(b["cpu"] > a["cpu"] for a, b in itertools.pairwise(evals)), arm
    steps = {a: [r for r in _lines(runs / f"{a}_seed5/metrics.jsonl") if r["kind"] == "step"]
             for a in ARMS}  # fmt: skip
    # Same data order and schedule: identical first steps (same init seed, same model) for
    # the two growth arms; scratch trains the bigger model from the start, so fewer FLOPs.
    if first_growth > steps["msg"][0]["step"]:  # the first logged window is all before growth
        assert steps["msg"][0]["loss"] == steps["nomask"][0]["loss"]
    assert (
        _lines(runs / "scratch_seed5/eval.jsonl")[-1]["flops"]
        > _lines(runs / "msg_seed5/eval.jsonl")[-1]["flops"]
    )
    # MSG preserves the function at each growth and ramps; No Mask switches units on at once.
    msg = json.loads((runs / "msg_seed5/done.json").read_text())["growth_events"]
    nomask = json.loads((runs / "nomask_seed5/done.json").read_text())["growth_events"]
    assert all(abs(e["loss_after"] - e["loss_before"]) <= 1e-5 * e["loss_before"] for e in msg)
    assert any(abs(e["loss_after"] - e["loss_before"]) > 1e-4 * e["loss_before"] for e in nomask)
    if ramp_logged:  # some ramp spans a logging step
        assert any("ramp" in r for r in steps["msg"])
    assert not any("ramp" in r for r in steps["nomask"])


def test_benchmark_miniature_runs_reports_and_resumes(tmp_path):
    proc = _bench(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "runs"
    _check_run_logs(runs)
    report = json.loads((runs / "report.json").read_text())
    (row,) = report["rows"]
    assert row["seed"] == 5 and row["horizon_s"] > 0
    assert row["msg_elapsed_reverse"] is None or row["msg_elapsed_reverse"] > 0
    assert set(report) >= {"msg_elapsed", "msg_cpu", "msg_flops", "nomask_elapsed", "nomask_flops"}
    results = (tmp_path / "RESULTS.md").read_text()
    assert results.count("## Growth speed-up") == 1 and "| 5 |" in results
    assert "--preset tiny" in results and "2-core CPU VM" in results
    png = (tmp_path / "speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # The optional copy-operator arm, added later: only it trains, and the report gains it.
    proc = _bench(tmp_path, "--arms", "net2net")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "net2net_seed5: done in" in proc.stdout and "kept" not in proc.stdout
    report = json.loads((runs / "report.json").read_text())
    assert report["arms"] == ["scratch", "msg", "nomask", "net2net"] and "net2net_flops" in report
    assert "Net2Net" in (runs / "report.md").read_text()
    # Every growth of the schedule doubles its dimensions, which the copy operator grows
    # exactly (balanced copies keep the norms' statistics); it has no masks to ramp.
    events = json.loads((runs / "net2net_seed5/done.json").read_text())["growth_events"]
    assert len(events) == 3
    assert all(abs(e["loss_after"] - e["loss_before"]) <= 1e-5 * e["loss_before"] for e in events)
    net2net_steps = _lines(runs / "net2net_seed5/metrics.jsonl")
    assert not any("ramp" in r for r in net2net_steps if r["kind"] == "step")

    # A cut-short benchmark: the msg run never finished; only it is trained again.
    (runs / "msg_seed5" / "done.json").unlink()
    kept = (runs / "scratch_seed5" / "eval.jsonl").read_text()
    proc = _bench(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished earlier with this config, kept") == 2
    assert "msg_seed5: done in" in proc.stdout
    assert (runs / "scratch_seed5" / "eval.jsonl").read_text() == kept
    _check_run_logs(runs)
    assert (tmp_path / "RESULTS.md").read_text().count("## Growth speed-up") == 3


def test_benchmark_with_a_searched_schedule_reuses_scratch(tmp_path):
    """``--search --reuse-scratch``: ~50 s (the search probes 8 shapes)."""
    first = _bench(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = tmp_path / "runs"
    kept = (runs / "scratch_seed5" / "eval.jsonl").read_text()
    # With a searched schedule: the scratch run (same config) is copied, not retrained;
    # the growth arms follow the schedule that `megatron-msg schedule-search` wrote.
    proc = _bench(tmp_path, "--search", "--reuse-scratch", str(runs), out="searched")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    searched = tmp_path / "searched"
    assert "scratch_seed5: copied from" in proc.stdout
    assert (searched / "scratch_seed5" / "eval.jsonl").read_text() == kept
    schedule = yaml.safe_load((searched / "search" / "schedule.yaml").read_text())
    assert len(list((searched / "search" / "probes").iterdir())) == 8  # the 2x2x2 lattice
    for arm in ("msg", "nomask"):
        config = yaml.safe_load((searched / f"{arm}_seed5" / "config.yaml").read_text())
        assert [g["start_step"] for g in config["growth"]] == [
            g["start_step"] for g in schedule["growth"]
        ]
        assert {g["ramp_steps"] for g in config["growth"]} == ({0} if arm == "nomask" else {2})
    _check_run_logs(searched, growths=len(schedule["growth"]),
                    first_growth=schedule["growth"][0]["start_step"], ramp_logged=False)  # fmt: skip
    assert "found by `megatron-msg schedule-search`" in (tmp_path / "RESULTS.md").read_text()
