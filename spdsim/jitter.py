"""Forward-to-forward variability of a host, as `spdsim calibrate` measures it and the engine draws it.

Each simulated forward of stage s costs its calibrated mean × (1 + x_s), where x_s is a stationary AR(1)
process per stage: standard deviation `sd`, lag-1 autocorrelation `lag1`, and innovations correlated
`cross` across stages (ranks sharing one host slow down together, a little). E[1 + x] = 1, so a rank's
mean cost is unchanged; what the draws add is the gap between two ranks' forwards in the same tick.
SPD keeps every rank busy, so each tick waits for the slower rank: with means alone the simulator had
that gap at 0.16 ms per tick against 0.42 measured (benchmarks/spd_idle.py) and predicted the SPD bubble
3–4 pp low. (An earlier version drew forwards independently from interpolated quantiles: the top
quantile's spike biased the mean up 9%. Here the draws are Gaussian around the mean.)
"""
from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass

import numpy as np

MIN_FACTOR = 0.3     # a forward never takes less than 30% of its mean (x < -0.7 is ~5 sd away at sd 0.13)


@dataclass(frozen=True)
class Jitter:
    sd: float             # of a forward's time ÷ its run's mean
    lag1: float = 0.0     # correlation of a rank's consecutive forwards
    cross: float = 0.0    # correlation of two ranks' k-th forwards

    def __post_init__(self) -> None:
        if self.sd < 0 or not -1 < self.lag1 < 1 or not 0 <= self.cross <= 1:
            raise ValueError(f"jitter needs sd ≥ 0, -1 < lag1 < 1, 0 ≤ cross ≤ 1 (got {self})")

    def to_dict(self) -> dict:
        return {"sd": round(self.sd, 4), "lag1": round(self.lag1, 3), "cross": round(self.cross, 3)}

    @classmethod
    def from_dict(cls, d: dict) -> "Jitter":
        return cls(float(d["sd"]), float(d.get("lag1", 0.0)), float(d.get("cross", 0.0)))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def estimate(runs: list[list[np.ndarray]], concurrent: list[list[tuple[int, int, int, int]]] | None = None
             ) -> Jitter | None:
    """runs: per run, each rank's forward times in order (any unit; context growth already divided out).
    concurrent: per run, (rank a, forward i, rank b, forward j) for forwards that ran at the same time
    (`overlapping`); without it ranks' k-th forwards are paired, which is right for draws made in lock
    step but not for a pipeline, where rank 1's k-th forward runs beside rank 0's (k+1)-th.
    Medians over runs of each rank's sd and lag-1 autocorrelation of time ÷ run mean, and of the
    correlation between concurrent forwards. None without enough forwards to say."""
    sds, lags, cross = [], [], []
    for k, ranks in enumerate(runs):
        xs = [np.asarray(r, float) / np.mean(r) - 1 if len(r) >= 10 else None for r in ranks]
        for x in xs:
            if x is not None:
                sds.append(float(x.std()))
                lags.append(_corr(x[:-1], x[1:]))
        if concurrent is not None:
            pairs = [(xs[a][i], xs[b][j]) for a, i, b, j in concurrent[k] if xs[a] is not None and xs[b] is not None]
            if len(pairs) >= 10:
                cross.append(_corr(np.array([p for p, _ in pairs]), np.array([q for _, q in pairs])))
            continue
        for i in range(len(xs)):
            for j in range(i + 1, len(xs)):
                if xs[i] is not None and xs[j] is not None:
                    m = min(len(xs[i]), len(xs[j]))
                    cross.append(_corr(xs[i][:m], xs[j][:m]))
    if not sds:
        return None
    return Jitter(sd=statistics.median(sds), lag1=min(max(statistics.median(lags), -0.99), 0.99),
                  cross=min(max(statistics.median(cross), 0.0), 1.0) if cross else 0.0)


def overlapping(ranks: list[list[tuple[int, int]]]) -> list[tuple[int, int, int, int]]:
    """ranks: each rank's forwards as (start, end), in start order. (r-1, i, r, j) for every forward j of
    rank r > 0 that shares more than half its time with forward i of rank r-1."""
    out = []
    for r in range(1, len(ranks)):
        prev = ranks[r - 1]
        starts = [s for s, _ in prev]
        for j, (s, e) in enumerate(ranks[r]):
            k = bisect.bisect_right(starts, e)           # forwards of r-1 that start before this one ends
            best = max(range(max(0, k - 3), k), key=lambda i: min(e, prev[i][1]) - max(s, prev[i][0]), default=None)
            if best is not None and min(e, prev[best][1]) - max(s, prev[best][0]) > (e - s) / 2:
                out.append((r - 1, best, r, j))
    return out


class JitterProcess:
    """The per-stage factors of one simulated run (seeded: the same run gives the same draws)."""

    def __init__(self, jitter: Jitter, stages: int, rng: np.random.Generator) -> None:
        self.j = jitter
        self.rng = rng
        self.x = [jitter.sd * rng.standard_normal() for _ in range(stages)]     # start stationary
        self.common = 0.0
        self._keep = math.sqrt(1 - jitter.lag1 ** 2) * jitter.sd

    def factor(self, stage: int) -> float:
        """The next forward of `stage`: its mean × this. Stage 0's forward starts a new shared shock."""
        j = self.j
        if stage == 0:
            self.common = self.rng.standard_normal()
        eps = math.sqrt(j.cross) * self.common + math.sqrt(1 - j.cross) * self.rng.standard_normal()
        self.x[stage] = j.lag1 * self.x[stage] + self._keep * eps
        return max(MIN_FACTOR, 1.0 + self.x[stage])
