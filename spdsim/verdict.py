"""Verdicts that hold when a validation is run twice: each compared figure gets a bootstrap confidence
interval for its error, and a point passes, fails or is undetermined by where that interval lies.

A validated figure is a statistic of paired repeats: repeat i of a point was measured in round i and is
predicted replaying its own accept/reject verdicts with jitter seed i. `paired_error` resamples the
repeats (pairs kept together, so a ratio's two sides and a prediction's measured partner move as one)
and recomputes the error each time. Which statistic is the caller's: `executor validate` compares
tokens/s as `throughput` (total tokens over total time, what costs fitted as means predict), the bubble
as a mean, latency percentiles as medians. The verdict, for a tolerance t (relative for tokens/s and
speedup, absolute for the bubble):

  pass          the whole interval lies within [-t, t]        (|error| + half-width ≤ t)
  fail          the whole interval lies outside it            (|error| − half-width > t)
  undetermined  otherwise: the measurement cannot tell yet

Repeats measured in one round share the host's state, so they are not independent: blocks of 8
consecutive repeats strayed up to ±8% from their whole run's error, and a fifth of their 95% intervals
missed it (docs/calibration.md, runs 18-20). With `groups` (the repeats of each round) the bootstrap
resamples whole rounds instead, so the interval holds the round-to-round spread too; `executor validate`
decides nothing before MIN_ROUNDS rounds.

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


Groups = Sequence[np.ndarray]     # the repeat indices of each round (resampled as wholes)


def bootstrap(stat: Callable[[np.ndarray], float], n: int, seed: int = 0, level: float = LEVEL,
              resamples: int = BOOTSTRAP, groups: Groups | None = None) -> tuple[float, float]:
    """Percentile interval of stat(indices) over `resamples` resamplings of n paired repeats, or of
    `groups` of them (whole groups drawn with replacement, as many as there are)."""
    rng = np.random.default_rng(seed)
    if groups:
        k = len(groups)
        draws = np.array([stat(np.concatenate([groups[j] for j in rng.integers(0, k, k)]))
                          for _ in range(resamples)])
    else:
        draws = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    a = (1 - level) / 2
    lo, hi = np.quantile(draws, [a, 1 - a])
    return float(lo), float(hi)


Stat = Callable[[np.ndarray], float]       # a statistic of the repeats at these (resampled) indices


def throughput(rates: Sequence[float]) -> float:
    """Rates of equal work (tokens/s of decodes of N tokens) combined as total work over total time:
    N·k / Σ N/rate_i, the harmonic mean. It is what costs fitted as means (mean forward times) predict,
    and on a host whose speed jumps between two levels it stays put where a median jumps between them."""
    x = np.asarray(rates, float)
    return float(len(x) / np.sum(1.0 / x))


def statistic_interval(stat: Stat, n: int, seed: int = 0, level: float = LEVEL,
                       groups: Groups | None = None) -> Interval:
    """stat over all n repeats with its bootstrap interval (one repeat: the point itself; `groups`:
    resampled by round, see `bootstrap`)."""
    est = stat(np.arange(n))
    if n < 2:
        return Interval(est, est, est)
    lo, hi = bootstrap(stat, n, seed, level, groups=groups)
    return Interval(est, min(lo, est), max(hi, est))


def median_interval(xs: Sequence[float], seed: int = 0, level: float = LEVEL) -> Interval:
    """The median of xs with its bootstrap interval."""
    x = np.asarray(xs, float)
    return statistic_interval(lambda idx: float(np.median(x[idx])), len(x), seed, level)


def paired_error(measured: Stat, predicted: Stat, n: int, relative: bool, seed: int = 0,
                 level: float = LEVEL, groups: Groups | None = None) -> Interval:
    """Error of predicted(idx) against measured(idx) over n paired repeats, in percent (relative) or
    percentage points (absolute), with its paired-bootstrap interval: both statistics see the same
    resampled indices (whole rounds with `groups`)."""
    if n < 1:
        raise ValueError("no repeats to compare")

    def err(idx: np.ndarray) -> float:
        m, p = measured(idx), predicted(idx)
        return 100.0 * ((p - m) / m if relative else p - m)
    return statistic_interval(err, n, seed, level, groups)


def error_interval(measured: Sequence[float], predicted: Sequence[float], relative: bool,
                   seed: int = 0, level: float = LEVEL,
                   stat: Callable[[np.ndarray], float] = np.median) -> Interval:
    """`paired_error` of stat(predicted) against stat(measured) (default: the median); measured[i] and
    predicted[i] are repeat i."""
    m, p = np.asarray(measured, float), np.asarray(predicted, float)
    if len(m) != len(p) or not len(m):
        raise ValueError("measured and predicted need the same, non-zero number of repeats")
    return paired_error(lambda idx: float(stat(m[idx])), lambda idx: float(stat(p[idx])), len(m), relative,
                        seed, level)


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
