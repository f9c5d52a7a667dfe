"""A bit-width sweep on Fashion-MNIST for the CPU target: 8, 4 and 2 bits (Hinton KD by default).

Runs ``edgekd sweep`` (the same code path as the command) with a small training budget, benches
each bundle with the host-cpu profile, and writes to benchmarks/results/:
    sweep_fashion.txt   the terminal table, preceded by the budget and the wall time
    sweep_fashion.json  the rows (bench rows plus cell, method, pareto, best)
    sweep_fashion.md    the Markdown table
    sweep_fashion.png   accuracy vs p50 latency, marker area ~ size, Pareto set, budget lines
The sweep root (runs, bundles, bench rows) is runs/sweeps/bench-fashion-cpu: re-running resumes.
The teacher is trained once (runs/teachers/...) and reused by every cell.

Usage: nice -n 10 python benchmarks/bench_sweep.py [--teacher-epochs 2] [--float-epochs 2] [--epochs 2]
                                                  [--methods hinton,none]
Cost on a quiet 2-core x86 machine, estimated from DESIGN.md's per-epoch timings (not measured end to
end): the teacher ~190 s per epoch; a Hinton cell ~100-120 s per epoch (the teacher runs on every batch
because Fashion-MNIST uses random flips); a `none` cell ~10 s per float and ~35 s per QAT epoch.
Training is resumable: stop it and run the same command again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def _training_times(json_path: Path) -> str:
    """'training time per cell: bits8-hinton 312 s, ...' from the rows' distill_seconds."""
    if not json_path.is_file():
        return "training time per cell: unknown"
    seen = {}
    for r in json.loads(json_path.read_text()):
        seen.setdefault(r.get("cell"), r.get("distill_seconds"))
    return "training time per cell (float KD + QAT, teacher excluded): " + ", ".join(
        f"{cell} {sec:.0f} s" if sec is not None else f"{cell} -" for cell, sec in seen.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--bits", default="8,4,2")
    ap.add_argument("--methods", default="hinton", help="e.g. hinton,none (none: QAT only, no teacher)")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--profile", default="host-cpu")
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--float-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="runs/sweeps/bench-fashion-cpu")
    ap.add_argument("--name", default="sweep_fashion", help="stem of the files in benchmarks/results/")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / args.name
    budget = (f"training budget: teacher cnn-teacher {args.teacher_epochs} epochs (trained once, shared), "
              f"each cell {args.float_epochs} float epochs + {args.epochs} QAT epochs, methods {args.methods} "
              f"(hinton: KD with T=4, alpha=0.9; none: labels only, no teacher); batch 64, seed 0; "
              f"data {args.data}, target {args.target}, profile {args.profile}")
    cmd = [sys.executable, "-m", "edgekd", "sweep", "--data", args.data, "--bits", args.bits, "--methods", args.methods, "--target", args.target,
           "--profile", args.profile, "--teacher-epochs", str(args.teacher_epochs), "--float-epochs",
           str(args.float_epochs), "--epochs", str(args.epochs), "--out", args.out, "--quiet",
           "--json", f"{stem}.json", "--markdown", f"{stem}.md", "--plot", f"{stem}.png"]
    print(budget, file=sys.stderr)
    print("running: " + " ".join(cmd[2:]), file=sys.stderr)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    text = (f"{budget}\n{_training_times(stem.with_suffix('.json'))}\n"
            f"wall time of this invocation: {wall:.0f} s (cells finished earlier are reused, not retrained); "
            f"load average while it ran: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
            f"command: edgekd {' '.join(cmd[3:])}\n\n{proc.stdout}")
    (stem.with_suffix(".txt")).write_text(text)
    print(text)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
