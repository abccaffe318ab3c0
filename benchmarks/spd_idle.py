"""Where does SPD's idle time go, measured against simulated? For each SPD calibration run that
`executor validate` left in DIR/profile/runs (oracle drafts), prints per rank and per tick the mean
forward and the mean time outside forwards, for the trace and for the simulator replaying the same
accept/reject sequence with DIR/calibration.yaml, then the mean |forward(rank 0) - forward(rank 1)|.

Why: the SPD bubble was predicted low at every oracle point (docs/calibration.md, "What changed the model"). With
two ranks the bubble is roughly (both ranks' own overhead + the gap between their forwards) per tick, so
this separates a missing overhead from a missing asymmetry between the ranks.

Run: python benchmarks/spd_idle.py reports/validation [--runs 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spdsim.replay import replay_point  # noqa: E402
from spdsim.metrics import decode_window  # noqa: E402
from spdsim.scenario import load_scenario  # noqa: E402
from spdsim.trace import read_trace  # noqa: E402


def per_tick(events, new_tokens: int) -> list[tuple[float, float]]:
    """(mean forward ms, mean ms outside forwards) per tick, for each rank in device order."""
    t0, t1, _ = decode_window(events, new_tokens)
    out = []
    for dev in sorted({e.device for e in events if e.kind == "compute"}):
        fwd = [e.end_ns - e.start_ns for e in events
               if e.kind == "compute" and e.device == dev and e.phase == "decode" and t0 <= e.start_ns and e.end_ns <= t1]
        out.append((statistics.fmean(fwd) / 1e6, ((t1 - t0) - sum(fwd)) / len(fwd) / 1e6))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="an `executor validate --out` directory (profile/runs, calibration.yaml)")
    ap.add_argument("--runs", type=int, default=8, help="how many SPD calibration runs (default 8)")
    args = ap.parse_args()
    runs = sorted((args.dir / "profile" / "runs").glob("spd-n2-a*"))[: args.runs]
    if not runs:
        sys.exit(f"{args.dir}/profile/runs: no SPD oracle calibration runs (run executor validate first)")
    base = dataclasses.replace(load_scenario(ROOT / "scenarios" / "local-cpu.yaml"),
                               calibration=str(args.dir / "calibration.yaml"), path=None)
    gaps = {"measured": [], "simulated": []}
    print(f"{'run':<18}{'':>10}  rank 0 fwd / outside    rank 1 fwd / outside   |Δ fwd|  (ms per tick)")
    for rd in runs:
        tr = read_trace(rd)
        h = tr.header
        sim = replay_point(base, "spd", 2, h.prompt_tokens, h.new_tokens, list(h.extra["accepts"]), features=False,
                           keep_events=True)
        for label, events in (("measured", tr.events), ("simulated", sim.events)):
            (f0, o0), (f1, o1) = per_tick(events, h.new_tokens)
            gaps[label].append(abs(f0 - f1))
            print(f"{rd.name if label == 'measured' else '':<18}{label:>10}  {f0:7.2f} / {o0:5.2f}        "
                  f"{f1:7.2f} / {o1:5.2f}        {abs(f0 - f1):5.2f}")
    print(f"mean |Δ fwd| per tick: measured {statistics.fmean(gaps['measured']):.2f} ms, "
          f"simulated {statistics.fmean(gaps['simulated']):.2f} ms")


if __name__ == "__main__":
    main()
