"""The local (socket) transport's all-reduce on this host: `direct` (every rank sends its whole tensor to
every other, one message per peer, and adds them in rank order) against `ring` (reduce-scatter +
all-gather, 2(t − 1) messages of 1/t of the tensor, one after the other), for t ∈ {2, 4} ranks and
tensors of 1 KiB … 1 MiB; plus the all-gather the vocab-parallel LM head uses. Medians over --repeats
calls after --warmup untimed ones, rank 0's clock (executor/collective_bench.py). executor/transport.py
uses `direct` by default: at a decode step's sizes (one token's hidden state, ≤ 64 KiB) the collective
is latency-bound; the ring's bandwidth saving shows only at large sizes. Take the figures on a quiet
machine: on shared cores a rank that loses its core stalls every collective of its group.

    python benchmarks/allreduce_local.py [--tp 2,4] [--repeats 51] [--warmup 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from executor.collective_bench import collective_benchmarks

SIZES = (1024, 4096, 16384, 65536, 262144, 1048576)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", default="2,4", help="group sizes (default 2,4)")
    ap.add_argument("--repeats", type=int, default=51)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    args = ap.parse_args()
    load, t_start = os.getloadavg()[0], time.time()
    results = {}
    for tp in (int(t) for t in args.tp.split(",")):
        results[tp] = collective_benchmarks(tp, "local", sizes=SIZES, repeats=args.repeats, warmup=args.warmup,
                                            algorithms=("direct", "ring"))
    print(f"# local transport collectives, median of {args.repeats} (load average {load:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end, {os.cpu_count()} cores, {time.time() - t_start:.0f} s)")
    print("| tp | bytes | all-reduce direct µs | all-reduce ring µs | ring ÷ direct | all-gather µs |")
    print("|---|---|---|---|---|---|")
    for tp, res in results.items():
        d, r, g = res["allreduce"]["direct"], res["allreduce"]["ring"], res["allgather"]["direct"]
        for i, size in enumerate(d["sizes"]):
            print(f"| {tp} | {size} | {d['seconds'][i] * 1e6:.1f} | {r['seconds'][i] * 1e6:.1f} | "
                  f"{r['seconds'][i] / d['seconds'][i]:.2f} | {g['seconds'][i] * 1e6:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
