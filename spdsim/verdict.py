"""Verdicts that hold when a validation is run twice: each compared figure gets a bootstrap confidence
interval for its error, and a point passes, fails or is undetermined by where that interval lies.

A validated figure is a statistic of paired repeats: repeat i of a point was measured in round i and is
predicted replaying its own accept/reject verdicts with jitter seed i. `error_interval` resamples the
repeats (pairs kept together, so a ratio's two sides and a prediction's measured partner move as one)
and recomputes the error each time. The verdict, for a tolerance t (relative for tokens/s and speedup,
absolute for the bubble):

  pass          the whole interval lies within [-t, t]        (|error| + half-width ≤ t)
  fail          the whole interval lies outside it            (|error| − half-width > t)
  undetermined  otherwise: the measurement cannot tell yet

Repeats shrink a percentile interval roughly as 1/√k, which `repeats_to_decide` uses to say how many
more a point would likely need. This module is pure (numpy only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

PASS, FAIL, UNDETERMINED = "pass", "fail", "undetermined"
LEVEL = 0.95          # two-sided confidence of the intervals
BOOTSTRAP = 2000      # resamples: the percentile interval's own noise is then well below its width


@dataclass(frozen=True)
class Interval:
    estimate: float       # the statistic on all repeats
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def bootstrap(stat: Callable[[np.ndarray], float], n: int, seed: int = 0, level: float = LEVEL,
              resamples: int = BOOTSTRAP) -> tuple[float, float]:
    """Percentile interval of stat(indices) over `resamples` resamplings of n paired repeats."""
    rng = np.random.default_rng(seed)
    draws = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    a = (1 - level) / 2
    lo, hi = np.quantile(draws, [a, 1 - a])
    return float(lo), float(hi)


def median_interval(xs: Sequence[float], seed: int = 0, level: float = LEVEL) -> Interval:
    """The median of xs with its bootstrap interval (a one-repeat "interval" is the point itself)."""
    x = np.asarray(xs, float)
    est = float(np.median(x))
    if len(x) < 2:
        return Interval(est, est, est)
    lo, hi = bootstrap(lambda idx: float(np.median(x[idx])), len(x), seed, level)
    return Interval(est, lo, hi)


def error_interval(measured: Sequence[float], predicted: Sequence[float], relative: bool,
                   seed: int = 0, level: float = LEVEL) -> Interval:
    """Error of the predicted median against the measured median, in percent (relative) or percentage
    points (absolute), with its paired-bootstrap interval. measured[i] and predicted[i] are repeat i."""
    m, p = np.asarray(measured, float), np.asarray(predicted, float)
    if len(m) != len(p) or not len(m):
        raise ValueError("measured and predicted need the same, non-zero number of repeats")

    def err(idx: np.ndarray) -> float:
        mm, pm = float(np.median(m[idx])), float(np.median(p[idx]))
        return 100.0 * ((pm - mm) / mm if relative else pm - mm)
    est = err(np.arange(len(m)))
    if len(m) < 2:
        return Interval(est, est, est)
    lo, hi = bootstrap(err, len(m), seed, level)
    return Interval(est, min(lo, est), max(hi, est))


def verdict(err: Interval, tolerance_pct: float) -> str:
    if -tolerance_pct <= err.low and err.high <= tolerance_pct:
        return PASS
    if err.low > tolerance_pct or err.high < -tolerance_pct:
        return FAIL
    return UNDETERMINED


def repeats_to_decide(err: Interval, tolerance_pct: float, repeats: int) -> int | None:
    """Repeats likely needed in all for an undetermined point to be decided, assuming its error stays
    where it is and the interval narrows as 1/√k; None when the error sits on the tolerance itself."""
    gap = abs(abs(err.estimate) - tolerance_pct)
    h = max(err.estimate - err.low, err.high - err.estimate)
    if h <= gap:
        return repeats
    if gap <= 1e-9:
        return None
    return int(math.ceil(repeats * (h / gap) ** 2))


def overall(verdicts: Sequence[str]) -> str:
    """fail if any point fails, else undetermined if any is, else pass."""
    if FAIL in verdicts:
        return FAIL
    if UNDETERMINED in verdicts:
        return UNDETERMINED
    return PASS
