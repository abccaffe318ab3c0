"""How long does capacity planning take? Prints figures (not a timed test: this machine's timings are noisy).

Plans llama-2-70b over A100-80GB and H100 up to 16 GPUs (AR, PP, SPD with the module co-located or
dedicated, uniform / compute_balanced / comm_aware partitions, α = 0.8, 512 + 256 tokens) with `--jobs 2`,
and prints the wall time, the CPU time of this process and its workers, and how many configurations were
assessed, simulated and pruned. Target (issue 8): ≤ 60 s wall with 2 local jobs.

Run: python benchmarks/plan_speed.py [--jobs 2] [--target 40]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from spdsim.cli import main  # noqa: E402


def cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--target", type=float, default=40.0, help="tokens/s target of the plan")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        c0, t0 = cpu_s(), time.perf_counter()
        rc = main(["plan", "--model", "llama-2-70b", "--gpu", "a100,h100", "--max-gpus", "16",
                   "--target-tokens-per-s", str(args.target), "--jobs", str(args.jobs), "--quiet",
                   "--out", out])
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        df = pd.read_csv(Path(out) / "plan.csv")
    counts = df["status"].value_counts().to_dict()
    simulated = int(df["tokens_per_s"].notna().sum())
    print(f"\nplan llama-2-70b, a100 + h100, ≤ 16 GPUs, --jobs {args.jobs}: exit {rc}")
    print(f"  configurations: {len(df)} ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
          f"{simulated} rows carry a simulated figure")
    print(f"  wall time: {wall:.1f} s (target ≤ 60 s)   CPU time, this process + workers: {cpu:.1f} s")


if __name__ == "__main__":
    main_()
