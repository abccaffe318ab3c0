"""Serving metrics (DESIGN §3 ⚑), defined once: per request, per point, and `requests.csv`.

The simulator (`spdsim.serving`) and the executor (issue 19) both report serving figures through these
functions, as both report decode figures through `spdsim.metrics.run_metrics`. Names follow vLLM's
benchmarks (REFERENCE.md, "Serving conventions"):

  TTFT        first_token − arrival (queueing and prefill included)
  TPOT        (finish − first_token) / (new_tokens − 1): per output token after the first (none for a
              one-token request)
  e2e         finish − arrival
  queue       start − arrival (start: its first tick enters stage 1 — its prefill, or its first
              decode position for a one-token prompt)
each at mean / p50 / p90 / p99 (numpy's linear-interpolation percentile, as vLLM's benchmark uses),
in ms; throughput = all new tokens (requests) ÷ duration, the duration running from the first arrival
to the last finish; goodput = requests meeting every bound of `serving.slo` (TTFT ≤ ttft_p99_ms and
TPOT ≤ tpot_p99_ms, per request) ÷ duration; `meets_slo`: the point's TTFT p99 and TPOT p99 are within
the bounds.

`requests.csv` (DESIGN §3): one row per request of every serving point — `point_id` then `request,
arrival_s, start_s, first_token_s, finish_s, prompt_tokens, new_tokens` (seconds on the run's clock).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from spdsim.serving_config import Slo

REQUEST_COLUMNS = ("request", "arrival_s", "start_s", "first_token_s", "finish_s", "prompt_tokens", "new_tokens")
STATS = ("mean", "p50", "p90", "p99")
LATENCIES = ("ttft", "tpot", "e2e", "queue")


@dataclass
class RequestRecord:
    request: int
    arrival_s: float
    start_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    new_tokens: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        if self.new_tokens < 2:
            return math.nan
        return (self.finish_s - self.first_token_s) / (self.new_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def queue_s(self) -> float:
        return self.start_s - self.arrival_s


def latency_stats(values_s: Iterable[float]) -> dict[str, float]:
    """mean / p50 / p90 / p99 of latencies in seconds, as ms; NaN values (no TPOT) left out."""
    v = np.asarray([x for x in values_s if not math.isnan(x)], dtype=float) * 1e3
    if not v.size:
        return {k: math.nan for k in STATS}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def meets_request_slo(r: RequestRecord, slo: Slo) -> bool:
    ok = slo.ttft_p99_ms is None or r.ttft_s * 1e3 <= slo.ttft_p99_ms
    tpot = r.tpot_s
    return ok and (slo.tpot_p99_ms is None or math.isnan(tpot) or tpot * 1e3 <= slo.tpot_p99_ms)


@dataclass(frozen=True)
class ServingMetrics:
    requests: int
    duration_s: float
    throughput_tokens_per_s: float
    throughput_requests_per_s: float
    goodput_requests_per_s: float | None      # None without an SLO
    slo_attainment: float | None              # fraction of requests meeting every bound
    meets_slo: bool | None                    # TTFT p99 and TPOT p99 within the bounds
    latency: dict[str, dict[str, float]] = field(default_factory=dict)   # ttft / tpot / e2e / queue → stats (ms)

    def columns(self) -> dict[str, float | bool | None]:
        """The results.csv serving columns: throughput, goodput, ttft_p99_ms, tpot_p50_ms, ..."""
        out: dict[str, float | bool | None] = {
            "throughput_tokens_per_s": self.throughput_tokens_per_s,
            "throughput_requests_per_s": self.throughput_requests_per_s,
            "goodput_requests_per_s": self.goodput_requests_per_s,
            "slo_attainment": self.slo_attainment, "meets_slo": self.meets_slo}
        for name in LATENCIES:
            for stat in STATS:
                out[f"{name}_{stat}_ms"] = self.latency[name][stat]
        return out


SERVING_METRIC_COLUMNS = (["throughput_tokens_per_s", "throughput_requests_per_s", "goodput_requests_per_s",
                           "slo_attainment", "meets_slo"]
                          + [f"{name}_{stat}_ms" for name in LATENCIES for stat in STATS])


def serving_metrics(records: Sequence[RequestRecord], slo: Slo | None = None) -> ServingMetrics:
    """Every serving figure of one point from its requests (all of them finished)."""
    if not records:
        raise ValueError("no requests: nothing to measure")
    unfinished = [r.request for r in records if math.isnan(r.finish_s)]
    if unfinished:
        raise ValueError(f"request {unfinished[0]} did not finish ({len(unfinished)} unfinished)")
    t0 = min(r.arrival_s for r in records)
    t1 = max(r.finish_s for r in records)
    duration = max(t1 - t0, 1e-12)
    tokens = sum(r.new_tokens for r in records)
    latency = {"ttft": latency_stats(r.ttft_s for r in records), "tpot": latency_stats(r.tpot_s for r in records),
               "e2e": latency_stats(r.e2e_s for r in records), "queue": latency_stats(r.queue_s for r in records)}
    good = attainment = meets = None
    if slo is not None and not slo.empty:
        ok = sum(1 for r in records if meets_request_slo(r, slo))
        good, attainment = ok / duration, ok / len(records)
        meets = slo_met(latency, slo)
    return ServingMetrics(len(records), duration, tokens / duration, len(records) / duration, good, attainment,
                          meets, latency)


def slo_met(latency: dict[str, dict[str, float]], slo: Slo) -> bool:
    """TTFT p99 ≤ ttft_p99_ms and TPOT p99 ≤ tpot_p99_ms (a bound not given always holds)."""
    ttft, tpot = latency["ttft"]["p99"], latency["tpot"]["p99"]
    return ((slo.ttft_p99_ms is None or ttft <= slo.ttft_p99_ms)
            and (slo.tpot_p99_ms is None or math.isnan(tpot) or tpot <= slo.tpot_p99_ms))


def in_system_area(records: Sequence[RequestRecord], t0: float, t1: float) -> float:
    """∫ (requests arrived and not finished) dt over [t0, t1], in request-seconds."""
    return sum(max(0.0, min(r.finish_s, t1) - max(r.arrival_s, t0)) for r in records)


# --- requests.csv ---------------------------------------------------------------------------------------

def request_rows(point_id: str, records: Sequence[RequestRecord]) -> list[dict]:
    return [{"point_id": point_id, **{c: getattr(r, c) for c in REQUEST_COLUMNS}} for r in records]


def write_requests_csv(path: Path, rows: list[dict]) -> Path:
    import pandas as pd
    pd.DataFrame(rows, columns=["point_id", *REQUEST_COLUMNS]).to_csv(path, index=False)
    return path


def read_requests_csv(path: Path):
    """requests.csv as a DataFrame with ttft_ms, tpot_ms, e2e_ms added (for plots)."""
    import pandas as pd
    df = pd.read_csv(path)
    missing = [c for c in ("point_id", *REQUEST_COLUMNS) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    tpot = (df["finish_s"] - df["first_token_s"]) / (df["new_tokens"] - 1)
    return df.assign(ttft_ms=(df["first_token_s"] - df["arrival_s"]) * 1e3,
                     tpot_ms=tpot.where(df["new_tokens"] > 1) * 1e3,
                     e2e_ms=(df["finish_s"] - df["arrival_s"]) * 1e3)
