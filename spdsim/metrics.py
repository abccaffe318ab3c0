"""The metrics of DESIGN §3, defined once, as pure functions over trace events.

Both the simulator (its event log) and the executor (its measured traces) compute every figure they
report through `run_metrics`, so a predicted and a measured number always mean the same thing.
Serving figures (TTFT, TPOT, goodput, requests.csv) are defined once in `spdsim.serving_metrics`.
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
    allreduce_share: float | None = None   # TP: all-reduce time ÷ compute time (None without TP)


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


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals."""
    total, cur_start, cur_end = 0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        elif b > cur_end:
            cur_end = b
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def busy_per_stage(events: Iterable[TraceEvent], stages: int, t0: int, t1: int,
                   placement: Sequence[str] | None = None, phases: tuple[str, ...] = ("decode",)) -> list[int]:
    """Busy ns of each stage inside [t0, t1]: any compute there, useful or wasted, of the given phases
    (a single decode: decode only; a serving run: prefill too).

    A `head` event counts toward every stage placed on its device (the module co-located with stage 1
    shares that device's time); on a dedicated device it counts toward no stage. A stage on a TP group
    (DESIGN §3) is busy while any of its ranks computes: the union of its ranks' compute intervals. A
    stage's own forwards never overlap, so with one rank per stage the union is the plain sum."""
    spans: list[list[tuple[int, int]]] = [[] for _ in range(stages)]
    ranks: list[set[int]] = [set() for _ in range(stages)]
    stage_of_device: dict[str, list[int]] = {}
    if placement:
        for s, dev in enumerate(placement):
            stage_of_device.setdefault(dev, []).append(s)
    for ev in events:
        if ev.phase not in phases:
            continue
        if ev.kind == "compute" and 0 <= ev.stage < stages:
            targets = (ev.stage,)
        elif ev.kind == "head":
            targets = stage_of_device.get(ev.device, ())
        else:
            continue
        a, b = max(ev.start_ns, t0), min(ev.end_ns, t1)
        if b <= a:
            continue
        for s in targets:
            spans[s].append((a, b))
            ranks[s].add(ev.tp_rank)
    return [_union_ns(sp) if len(ranks[s]) > 1 else sum(b - a for a, b in sp) for s, sp in enumerate(spans)]


def allreduce_share(events: Iterable[TraceEvent], t0: int, t1: int) -> float | None:
    """Fraction of the stages' compute time (summed over TP ranks) spent inside all-reduces / the LM
    head's all-gather (DESIGN §2: they are nested in the compute events); None without TP."""
    compute = reduce = 0
    for ev in events:
        if ev.phase != "decode":
            continue
        if ev.kind == "compute":
            compute += _clipped(ev, t0, t1)
        elif ev.kind == "allreduce":
            reduce += _clipped(ev, t0, t1)
    if not reduce:
        return None
    return reduce / compute if compute else None


def run_metrics(events: Sequence[TraceEvent], scheme: str, stages: int,
                new_tokens: int | None = None, placement: Sequence[str] | None = None) -> RunMetrics:
    """Every DESIGN §3 column for one decode run."""
    t0, t1, n = decode_window(events, new_tokens)
    return window_metrics(events, scheme, stages, t0, t1, n, placement)


def window_metrics(events: Sequence[TraceEvent], scheme: str, stages: int, t0: int, t1: int, tokens: int,
                   placement: Sequence[str] | None = None,
                   phases: tuple[str, ...] = ("decode",)) -> RunMetrics:
    """The DESIGN §3 columns over the window [t0, t1] in which `tokens` tokens were committed; busy time
    counts the compute of `phases`. One decode: its decode window, decode compute (`run_metrics`). A
    serving run (several requests, DESIGN §3): from the first arrival to the last finish, prefill
    included — what spdsim.serving's ServingSim.metrics counts (tests/test_serving_replay.py checks they
    agree on a simulated run's own events)."""
    window = t1 - t0
    if window <= 0:
        raise ValueError("decode window has zero length")
    n = tokens
    busy = busy_per_stage(events, stages, t0, t1, placement, phases)
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
        allreduce_share=allreduce_share(events, t0, t1),
    )


def speedup(tokens_per_s: float, baseline_tokens_per_s: float | None) -> float | None:
    """tokens_per_s ÷ a baseline's (speedup_vs_pp, speedup_vs_ar); None where there is no baseline."""
    if baseline_tokens_per_s is None or not baseline_tokens_per_s or math.isnan(baseline_tokens_per_s):
        return None
    return tokens_per_s / baseline_tokens_per_s


def ideal_spd_speedup(stages: int, alpha: float) -> float:
    """Closed form of DESIGN §2: equal stages, free links and head, i.i.d. acceptance α."""
    return stages / (1.0 + (1.0 - alpha) * (stages - 1))
