"""How fast is the simulator? Prints figures (not a timed test: this machine's timings are noisy).

  1. the engine's SimPy events per second on one a100x8 SPD point (n = 8, α = 0.8), beside
  2. a raw SimPy chain of the same shape (n stage processes, stores between them, a window of n tokens
     in flight, the same number of stage computes), and
  3. the wall time of `spdsim run scenarios/a100x8.yaml --jobs 2` (target ≤ 10 s on 2 cores), and
  4. with --big, of a 1,008-point SPD sweep: a100x8 with stages 2..8 × 3 partitioners × 48 α from 0.50
     to 0.97 (issue 18: 55 s with --jobs 2 before, target ≤ 20 s).

Targets (issue 2): engine ≥ 40% of the raw chain's events/s; the a100x8 sweep ≤ 10 s.
Run: python benchmarks/sim_speed.py [--repeat 3] [--skip-sweep] [--big] [--jobs 2]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import simpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spdsim.engine import simulate_point  # noqa: E402
from spdsim.scenario import load_scenario  # noqa: E402


class CountingEnv(simpy.Environment):
    """Counts processed events (the figure both sides are measured by)."""
    def __init__(self) -> None:
        super().__init__()
        self.processed = 0

    def step(self) -> None:
        self.processed += 1
        super().step()


def engine_rate(repeat: int) -> tuple[float, int, int]:
    s = load_scenario(ROOT / "scenarios" / "a100x8.yaml")
    point = next(p for p in s.points() if p.point_id == "spd-n8-uniform-a0.8")
    rates, events = [], 0
    for _ in range(repeat):
        env = CountingEnv()
        t0 = time.perf_counter()
        simulate_point(s, point, env=env)          # as in a sweep: metrics, no timeline kept
        dt = time.perf_counter() - t0
        rates.append(env.processed / dt)
        events = env.processed
    r = simulate_point(s, point, keep_events=True)
    computes = sum(1 for e in r.events if e.kind == "compute")
    return statistics.median(rates), computes, events


def raw_chain(n: int, computes: int, stage_ns: float = 1e6) -> simpy.Environment:
    """n processes, Store between consecutive ones, a feedback Store limiting n tokens in flight."""
    env = CountingEnv()
    boxes = [simpy.Store(env) for _ in range(n + 1)]
    tokens = computes // n

    def first():
        for i in range(n):                       # fill the window
            boxes[0].put(i)
        for i in range(n, tokens):
            yield boxes[n].get()                 # a token left the last stage
            boxes[0].put(i)

    def stage(s):
        while True:
            x = yield boxes[s].get()
            yield env.timeout(stage_ns)
            boxes[s + 1].put(x)

    env.process(first())
    for s in range(n):
        env.process(stage(s))
    return env


def raw_rate(n: int, computes: int, repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        env = raw_chain(n, computes)
        t0 = time.perf_counter()
        env.run()
        rates.append(env.processed / (time.perf_counter() - t0))
    return statistics.median(rates)


def sweep_wall(jobs: int, scenario: Path | None = None) -> float:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "spdsim.cli", "run", str(scenario or ROOT / "scenarios" / "a100x8.yaml"),
                        "--jobs", str(jobs), "--quiet", "--no-plots", "--out", out], check=True, cwd=ROOT)
        return time.perf_counter() - t0


def big_sweep_wall(jobs: int) -> tuple[float, int]:
    """The 1,008-point SPD sweep: a100x8's hardware, model and workload; stages 2..8, every partitioner
    of a100x8, 48 α (0.50, 0.51, ..., 0.97), scheme spd only."""
    import yaml
    d = yaml.safe_load((ROOT / "scenarios" / "a100x8.yaml").read_text())
    d["name"] = "a100x8-1008"
    d["sweep"].update(stages=list(range(2, 9)), acceptance=[round(0.50 + 0.01 * i, 2) for i in range(48)],
                      schemes=["spd"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a100x8-1008.yaml"
        path.write_text(yaml.safe_dump(d))
        from spdsim.scenario import load_scenario as load
        points = len(load(path).points())
        return sweep_wall(jobs, path), points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--big", action="store_true", help="also time the 1,008-point SPD sweep")
    ap.add_argument("--big-only", action="store_true", help="time only the 1,008-point SPD sweep")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    if not a.big_only:
        eng, computes, events = engine_rate(a.repeat)
        raw = raw_rate(8, computes, a.repeat)
        print(f"engine  : {eng:10,.0f} SimPy events/s  ({events:,} events, {computes:,} stage computes, a100x8 spd n=8 α=0.8)")
        print(f"raw SimPy chain : {raw:10,.0f} events/s  (8 stages, {computes:,} computes)")
        print(f"engine / raw    : {eng / raw:.0%}   (target ≥ 40%)")
        if not a.skip_sweep:
            wall = sweep_wall(a.jobs)
            print(f"a100x8 sweep, --jobs {a.jobs}: {wall:.1f} s wall   (target ≤ 10 s)")
    if a.big or a.big_only:
        wall, points = big_sweep_wall(a.jobs)
        print(f"a100x8 {points}-point SPD sweep, --jobs {a.jobs}: {wall:.1f} s wall   (target ≤ 20 s)")

if __name__ == "__main__":
    main()
