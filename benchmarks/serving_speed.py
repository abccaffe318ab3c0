"""How fast is the serving simulator? Prints figures (not a timed test: shared machines give noise).

One serving point: Llama-3-8B on 8 × H100 (NVSwitch, roofline costs), an 8-stage SPD pipeline
(compute_balanced, α = 0.8, the co-located module drafting from pipeline features), Poisson arrivals,
requests of 512 prompt + 128 new tokens. Prints the wall time, SimPy events processed and events/s,
and simulated tokens per wall second.

Target (issue 18): 10,000 requests of 128 tokens in ≤ 60 s on one core — measure on a quiet machine:
    python benchmarks/serving_speed.py                       # 10,000 requests, interleave, batch 1
    python benchmarks/serving_speed.py --max-batch 8         # batched ticks
    python benchmarks/serving_speed.py --requests 500        # a quick check that it runs
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from spdsim import acceptance as acc  # noqa: E402
from spdsim.engine import simulate_point  # noqa: E402
from spdsim.scenario import Point, parse_scenario  # noqa: E402
from sim_speed import CountingEnv  # noqa: E402  (benchmarks/: the same event counter)


def scenario(requests: int, rate: float, policy: str, max_batch: int, stages: int, features: bool):
    return parse_scenario(yaml.safe_dump({
        "name": "serving-speed",
        "hardware": {"gpu": "h100-sxm", "count": 8, "topology": "nvswitch"},
        "model": {"name": "llama-3-8b"},
        "head": {"placement": "colocated", "layers": 1, "features": features},
        "workload": {"prompt_tokens": 512, "new_tokens": 128, "requests": requests,
                     "arrivals": {"kind": "poisson", "rate_per_s": rate}},
        "serving": {"policy": policy, "max_batch": max_batch},
        "sweep": {"stages": [stages], "partition": ["compute_balanced"], "acceptance": [0.8], "schemes": ["spd"]},
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second (default 4)")
    ap.add_argument("--policy", default="interleave", choices=["fcfs", "interleave", "spd_first", "adaptive"])
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--stages", type=int, default=8)
    ap.add_argument("--no-features", action="store_true", help="an oracle drafter: no feature traffic")
    ap.add_argument("--profile", action="store_true", help="cProfile the run, print the top functions")
    a = ap.parse_args()
    s = scenario(a.requests, a.rate, a.policy, a.max_batch, a.stages, not a.no_features)
    point = Point("spd", a.stages, "compute_balanced", acc.iid(0.8), policy=a.policy, load=a.rate)
    env = CountingEnv()
    t0 = time.perf_counter()
    if a.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        r = prof.runcall(simulate_point, s, point, env=env)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    else:
        r = simulate_point(s, point, env=env)
    wall = time.perf_counter() - t0
    tokens = sum(x.new_tokens for x in r.requests)
    print(f"{a.requests:,} requests × 128 tokens, spd n={a.stages}, {a.policy}, max batch {a.max_batch}, "
          f"{a.rate:g} req/s{' (profiled)' if a.profile else ''}")
    print(f"wall      : {wall:8.2f} s   (target ≤ 60 s for 10,000 requests on one core)")
    print(f"events    : {env.processed:,} SimPy events, {env.processed / wall:,.0f} events/s")
    print(f"simulated : {tokens:,} tokens, {tokens / wall:,.0f} tokens per wall second; "
          f"{r.metrics.window_ns / 1e9:.1f} s of serving, TPOT p99 {r.extra['tpot_p99_ms']:.1f} ms, "
          f"TTFT p99 {r.extra['ttft_p99_ms']:.0f} ms")


if __name__ == "__main__":
    main()
