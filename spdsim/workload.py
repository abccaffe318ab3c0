"""The scenario's `workload:` section (DESIGN §5): what is decoded, and — for serving — how requests
arrive and how long they are.

    workload: {prompt_tokens: 512, new_tokens: 256}          # one request decoded alone (today's runs)

    workload:                                                  # serving: many requests (DESIGN §2 ⚑)
      prompt_tokens: {dist: lognormal, mean: 512, sigma: 0.5, max: 2048}   # or an integer
      new_tokens: {dist: uniform, low: 64, high: 192}                      # or an integer
      requests: 500
      arrivals: {kind: poisson, rate_per_s: [1, 2, 4]}     # a list is a sweep dimension (the point's load)
              | {kind: closed, users: [1, 4], think_s: 0.5}
              | {kind: trace, file: requests.csv}          # CSV: arrival_s, prompt_tokens, new_tokens

Without `arrivals` the single request of DESIGN §2 is simulated, exactly as before; `requests` and
length distributions then have no meaning and are rejected.

Requests are drawn once per (seed, load), the same for every scheme, stage count, partition and policy
(common random numbers: their differences are not sampling noise). Poisson arrival times are one
sequence of unit-mean exponential gaps divided by the rate, so a higher rate replays the same requests
compressed in time; lengths do not depend on the rate at all. Lognormal lengths have the given mean
(μ = ln(mean) − σ²/2 for the underlying normal) and are clipped to [1, max] (max defaults to 4 × mean);
uniform lengths are whole numbers in [low, high]. Closed-loop users each send their first request after
one think time and the next one a think time after the previous one finishes; think times are
exponential with mean `think_s` (0: send again at once).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spdsim.errors import UserError
from spdsim.yamlkeys import as_list, mapping, num, only

ARRIVAL_KINDS = ("poisson", "closed", "trace")
LENGTH_DISTS = ("lognormal", "uniform")
DEFAULT_REQUESTS = 200          # per serving point, when `workload.requests` is not given (trace: every row)
TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "new_tokens")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts (prompt or new tokens)."""
    dist: str                  # lognormal | uniform
    mean: float                # lognormal: the mean length (not of its log); uniform: (low + high) / 2
    sigma: float = 0.0         # lognormal
    low: int = 1
    high: int = 1              # uniform: inclusive bounds; lognormal: the cap

    @property
    def representative(self) -> int:
        """The typical length: what stage times and memory are planned for."""
        return max(1, int(round(self.mean)))

    def sample(self, rng: np.random.Generator, k: int) -> np.ndarray:
        if self.dist == "uniform":
            return rng.integers(self.low, self.high + 1, size=k)
        mu = math.log(self.mean) - self.sigma ** 2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, size=k)), self.low, self.high).astype(np.int64)


@dataclass(frozen=True)
class Arrivals:
    """How requests arrive. `loads` is the sweep dimension: rates (poisson) or user counts (closed)."""
    kind: str                                       # poisson | closed | trace
    loads: tuple[float, ...] = ()
    think_s: float = 0.0                            # closed loop: mean think time
    file: str = ""                                  # trace
    rows: tuple[tuple[float, int, int], ...] = ()   # trace: (arrival_s, prompt_tokens, new_tokens)

    @property
    def load_name(self) -> str:
        return {"poisson": "rate_per_s", "closed": "users"}.get(self.kind, "")


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 512          # the single request's (or, serving, the typical request's) lengths
    new_tokens: int = 256
    requests: int = 1                 # serving: requests per point
    arrivals: Arrivals | None = None  # None: one request decoded alone
    prompt_dist: LengthDist | None = None
    new_dist: LengthDist | None = None

    @property
    def serving(self) -> bool:
        return self.arrivals is not None


@dataclass(frozen=True)
class Request:
    request: int
    arrival_s: float         # NaN for a closed-loop user's request: it is sent when the user is ready
    prompt_tokens: int
    new_tokens: int


def _rng(seed: int, stream: int, load: float | None = None) -> np.random.Generator:
    key = [seed, stream] + ([] if load is None else [int(round(load * 1e6))])
    return np.random.default_rng(np.random.SeedSequence(key))


def draw_requests(w: Workload, load: float | None, seed: int) -> list[Request]:
    """The requests of one serving point (see the module docstring for what is shared between points)."""
    a = w.arrivals
    if a is None:
        raise ValueError("draw_requests: the workload has no arrivals")
    if a.kind == "trace":
        rows = a.rows[: w.requests]
        return [Request(i, t, p, m) for i, (t, p, m) in enumerate(rows)]
    k = w.requests
    lengths = _rng(seed, 0x1E47)
    prompts = (w.prompt_dist.sample(lengths, k) if w.prompt_dist else np.full(k, w.prompt_tokens))
    news = (w.new_dist.sample(lengths, k) if w.new_dist else np.full(k, w.new_tokens))
    if a.kind == "poisson":
        times = np.cumsum(_rng(seed, 0xA221).exponential(1.0, size=k)) / float(load)
    else:
        times = np.full(k, math.nan)
    return [Request(i, float(times[i]), int(prompts[i]), int(news[i])) for i in range(k)]


def think_times(seed: int, think_s: float, k: int) -> np.ndarray:
    """Closed loop: the think times, in the order the users draw them."""
    if think_s <= 0:
        return np.zeros(k)
    return _rng(seed, 0x7111).exponential(think_s, size=k)


# --- parsing ------------------------------------------------------------------------------------------

def _length(obj: Any, key: str) -> tuple[int, LengthDist | None]:
    if not isinstance(obj, dict):
        return num(obj, key, positive=True, integer=True), None
    d = mapping(obj, key)
    dist = d.get("dist")
    if dist not in LENGTH_DISTS:
        raise UserError(f"{key}.dist: {dist!r} (expected one of {', '.join(LENGTH_DISTS)}, or give an integer)")
    if dist == "lognormal":
        only(d, {"dist", "mean", "sigma", "max"}, key)
        if "mean" not in d:
            raise UserError(f"{key}.mean: missing (lognormal needs mean and sigma)")
        mean = num(d["mean"], f"{key}.mean", positive=True)
        if mean < 1:
            raise UserError(f"{key}.mean: must be ≥ 1 token (got {mean:g})")
        sigma = num(d.get("sigma", 0.5), f"{key}.sigma", nonneg=True)
        cap = num(d.get("max", max(1, int(round(4 * mean)))), f"{key}.max", positive=True, integer=True)
        if cap < mean:
            raise UserError(f"{key}.max: {cap} is below the mean {mean:g}")
        ld = LengthDist("lognormal", mean, sigma, 1, cap)
    else:
        only(d, {"dist", "low", "high"}, key)
        for k in ("low", "high"):
            if k not in d:
                raise UserError(f"{key}.{k}: missing (uniform needs low and high)")
        low = num(d["low"], f"{key}.low", positive=True, integer=True)
        high = num(d["high"], f"{key}.high", positive=True, integer=True)
        if high < low:
            raise UserError(f"{key}.high: {high} < low {low}")
        ld = LengthDist("uniform", (low + high) / 2, 0.0, low, high)
    return ld.representative, ld


def _read_trace(path: Path, key: str) -> tuple[tuple[float, int, int], ...]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{key}: {path} lacks column(s) {', '.join(missing)} "
                                f"(expected {', '.join(TRACE_COLUMNS)})")
            rows, last = [], -math.inf
            for i, r in enumerate(reader, 2):
                where = f"{key}: {path} row {i}"
                t = num(r["arrival_s"], f"{where} arrival_s", nonneg=True)
                if t < last:
                    raise UserError(f"{where}: arrival_s {t:g} is before the previous row's {last:g}")
                last = t
                rows.append((t, num(r["prompt_tokens"], f"{where} prompt_tokens", positive=True, integer=True),
                             num(r["new_tokens"], f"{where} new_tokens", positive=True, integer=True)))
    except OSError as e:
        raise UserError(f"{key}: cannot read {path} ({e.strerror})") from None
    if not rows:
        raise UserError(f"{key}: {path} has no requests")
    return tuple(rows)


def _loads(v: Any, key: str, integer: bool) -> tuple[float, ...]:
    values = [num(x, key, positive=True, integer=integer) for x in as_list(v)]
    if not values:
        raise UserError(f"{key}: empty")
    return tuple(float(x) for x in dict.fromkeys(values))


def _arrivals(obj: Any, base: Path | None) -> Arrivals:
    key = "workload.arrivals"
    d = mapping(obj, key)
    kind = d.get("kind")
    if kind not in ARRIVAL_KINDS:
        raise UserError(f"{key}.kind: {kind!r} (expected one of {', '.join(ARRIVAL_KINDS)})")
    if kind == "poisson":
        only(d, {"kind", "rate_per_s"}, key)
        if "rate_per_s" not in d:
            raise UserError(f"{key}.rate_per_s: missing (poisson needs a rate, or a list of rates)")
        return Arrivals("poisson", _loads(d["rate_per_s"], f"{key}.rate_per_s", integer=False))
    if kind == "closed":
        only(d, {"kind", "users", "think_s"}, key)
        if "users" not in d:
            raise UserError(f"{key}.users: missing (closed needs users, and think_s)")
        return Arrivals("closed", _loads(d["users"], f"{key}.users", integer=True),
                        think_s=num(d.get("think_s", 0.0), f"{key}.think_s", nonneg=True))
    only(d, {"kind", "file"}, key)
    if not isinstance(d.get("file"), str):
        raise UserError(f"{key}.file: missing (trace needs a CSV file: {', '.join(TRACE_COLUMNS)})")
    path = Path(d["file"])
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    return Arrivals("trace", (), file=d["file"], rows=_read_trace(path, f"{key}.file"))


def parse_workload(obj: Any, base: Path | None = None) -> Workload:
    d = mapping(obj or {}, "workload")
    only(d, {"prompt_tokens", "new_tokens", "requests", "arrivals"}, "workload")
    w = Workload()
    prompt, prompt_dist = _length(d.get("prompt_tokens", w.prompt_tokens), "workload.prompt_tokens")
    new, new_dist = _length(d.get("new_tokens", w.new_tokens), "workload.new_tokens")
    if d.get("arrivals") is None:
        for k, dist in (("prompt_tokens", prompt_dist), ("new_tokens", new_dist)):
            if dist is not None:
                raise UserError(f"workload.{k}: a length distribution needs workload.arrivals (several requests)")
        if "requests" in d:
            raise UserError("workload.requests: needs workload.arrivals (without them one request is decoded)")
        return Workload(prompt, new)
    arrivals = _arrivals(d["arrivals"], base)
    default = len(arrivals.rows) if arrivals.kind == "trace" else DEFAULT_REQUESTS
    requests = num(d.get("requests", default), "workload.requests", positive=True, integer=True)
    if arrivals.kind == "trace":
        for k in ("prompt_tokens", "new_tokens"):
            if k in d:
                raise UserError(f"workload.{k}: a trace gives every request's lengths (leave it out)")
        requests = min(requests, len(arrivals.rows))
        rows = arrivals.rows[:requests]
        prompt = max(1, int(round(float(np.mean([r[1] for r in rows])))))
        new = max(1, int(round(float(np.mean([r[2] for r in rows])))))
        prompt_dist = new_dist = None
    return Workload(prompt, new, requests, arrivals, prompt_dist, new_dist)
