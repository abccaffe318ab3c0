"""The metrics of DESIGN §3, defined once, as pure functions over trace events.

Both the simulator (its event log) and the executor (its measured traces) compute every figure they
report through `run_metrics`, so a predicted and a measured number always mean the same thing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from spdsim.trace import TraceEvent


@dataclass(frozen=True)
class RunMetrics:
    scheme: str
    stages: int
    new_tokens: int                 # N, committed tokens counted
    window_ns: int                  # T: first decode tick start → N-th commit
    tokens_per_s: float
    ms_per_token: float
    bubble_ratio: float
    waste_ratio: float
    acceptance_rate: float | None   # None for AR / PP (no verifications)
    accepted: int
    rejected: int
    utilization: tuple[float, ...] = field(default_factory=tuple)  # busy_s / T per stage


def decode_window(events: Sequence[TraceEvent], new_tokens: int | None = None) -> tuple[int, int, int]:
    """(t0, t_end, N): t0 is the start of the first decode compute, t_end the N-th commit.

    N defaults to every decode commit in the trace."""
    commits = sorted(e.end_ns for e in events if e.kind == "commit" and e.phase == "decode")
    starts = [e.start_ns for e in events if e.kind == "compute" and e.phase == "decode"]
    if not commits or not starts:
        raise ValueError("trace has no decode compute or no commit events: nothing to measure")
    n = len(commits) if new_tokens is None else new_tokens
    if n > len(commits) or n <= 0:
        raise ValueError(f"asked for {n} committed tokens, trace has {len(commits)}")
    return min(starts), commits[n - 1], n


def _clipped(ev: TraceEvent, t0: int, t1: int) -> int:
    return max(0, min(ev.end_ns, t1) - max(ev.start_ns, t0))


def busy_per_stage(events: Iterable[TraceEvent], stages: int, t0: int, t1: int,
                   placement: Sequence[str] | None = None) -> list[int]:
    """Busy ns of each stage's device inside [t0, t1]: any compute there, useful or wasted.

    A `head` event counts toward every stage placed on its device (the module co-located with stage 1
    shares that device's time); on a dedicated device it counts toward no stage."""
    busy = [0] * stages
    stage_of_device: dict[str, list[int]] = {}
    if placement:
        for s, dev in enumerate(placement):
            stage_of_device.setdefault(dev, []).append(s)
    for ev in events:
        if ev.phase != "decode":
            continue
        if ev.kind == "compute" and 0 <= ev.stage < stages:
            busy[ev.stage] += _clipped(ev, t0, t1)
        elif ev.kind == "head":
            for s in stage_of_device.get(ev.device, []):
                busy[s] += _clipped(ev, t0, t1)
    return busy


def run_metrics(events: Sequence[TraceEvent], scheme: str, stages: int,
                new_tokens: int | None = None, placement: Sequence[str] | None = None) -> RunMetrics:
    """Every DESIGN §3 column for one decode run."""
    t0, t1, n = decode_window(events, new_tokens)
    window = t1 - t0
    if window <= 0:
        raise ValueError("decode window has zero length")
    busy = busy_per_stage(events, stages, t0, t1, placement)
    wasted = sum(_clipped(e, t0, t1) for e in events
                 if e.kind == "compute" and e.discarded and e.phase == "decode")
    verdicts = [e.accepted for e in events if e.kind == "verify" and e.end_ns <= t1 and e.accepted is not None]
    accepted = sum(1 for v in verdicts if v)
    rejected = len(verdicts) - accepted
    seconds = window / 1e9
    return RunMetrics(
        scheme=scheme, stages=stages, new_tokens=n, window_ns=window,
        tokens_per_s=n / seconds, ms_per_token=1000.0 * seconds / n,
        bubble_ratio=1.0 - sum(busy) / (stages * window),
        waste_ratio=wasted / (stages * window),
        acceptance_rate=(accepted / len(verdicts)) if verdicts else None,
        accepted=accepted, rejected=rejected,
        utilization=tuple(b / window for b in busy),
    )


def speedup(tokens_per_s: float, baseline_tokens_per_s: float | None) -> float | None:
    """tokens_per_s ÷ a baseline's (speedup_vs_pp, speedup_vs_ar); None where there is no baseline."""
    if baseline_tokens_per_s is None or not baseline_tokens_per_s or math.isnan(baseline_tokens_per_s):
        return None
    return tokens_per_s / baseline_tokens_per_s


def ideal_spd_speedup(stages: int, alpha: float) -> float:
    """Closed form of DESIGN §2: equal stages, free links and head, i.i.d. acceptance α."""
    return stages / (1.0 + (1.0 - alpha) * (stages - 1))
