"""Pinning ranks to cores (`--pin`): when a launch has no more CPU ranks than usable cores, rank r runs
on the r-th of them alone, so two ranks never share a core and the scheduler never migrates one
mid-forward. `executor validate --pin` uses it (docs/calibration.md says what it did to the spread)."""
from __future__ import annotations

import os


def pin_rank(rank: int, world: int) -> int | None:
    """Pin this process to one core when world ≤ usable cores; returns the core, or None (not pinned)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if world > len(cores):
        return None
    core = cores[rank % len(cores)]
    os.sched_setaffinity(0, {core})
    return core
