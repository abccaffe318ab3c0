"""The scenario's `serving:` section (DESIGN §5 ⚑): how several requests share one pipeline.

    serving:
      policy: [fcfs, interleave, spd_first, adaptive]   # one or a list (a sweep dimension)
      max_batch: 1            # positions of different requests in one tick (decode only)
      max_running: null       # at most this many requests admitted at once (null: as memory allows)
      prefill_chunk: null     # prompt tokens per prefill tick (null: the whole prompt in one tick)
      slo: {ttft_p99_ms: 1000, tpot_p99_ms: 40}        # goodput and `meets_slo` use it
      adaptive: {threshold: 0.5, bins: [[0.0, 0.5, 0.3, 0.4], [0.5, 1.0, 0.7, 0.9]]}
                #  or table: FILE (written by `executor acceptance`), or neither: concentration (below)

The policies are defined once, in `spdsim.serving_protocol`. `adaptive` needs the acceptance of a draft
as a function of the module's confidence: a table of bins (low, high, share of drafts, acceptance in the
bin). Without one, the point's α gives a calibrated drafter: confidence ~ Beta(κα, κ(1 − α)) with κ =
`adaptive.concentration` (default 2) and acceptance equal to confidence, so the drafts' mean acceptance
is α and the threshold only decides which of them enter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spdsim.errors import UserError
from spdsim.yamlkeys import as_list, mapping, num, only

POLICIES = ("fcfs", "interleave", "spd_first", "adaptive")
CONFIDENCE_KIND = "spdsim-confidence"       # the `kind:` of a confidence table file
DEFAULT_BINS = 10


@dataclass(frozen=True)
class Slo:
    ttft_p99_ms: float | None = None
    tpot_p99_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_p99_ms is None and self.tpot_p99_ms is None


@dataclass(frozen=True)
class ConfidenceBin:
    low: float
    high: float
    share: float          # fraction of drafts whose confidence falls in [low, high)
    acceptance: float     # fraction of those that the target accepts


@dataclass(frozen=True)
class Adaptive:
    threshold: float = 0.5
    bins: tuple[ConfidenceBin, ...] | None = None                 # for every stage count
    by_stages: dict[int, tuple[ConfidenceBin, ...]] = field(default_factory=dict)   # from a file
    concentration: float = 2.0
    source: str = ""

    def table(self, stages: int, alpha: float | None) -> tuple[ConfidenceBin, ...]:
        """The bins a point at `stages` and acceptance α uses (see the module docstring)."""
        if stages in self.by_stages:
            return self.by_stages[stages]
        if self.bins is not None:
            return self.bins
        if self.by_stages:
            raise UserError(f"serving.adaptive.table: {self.source} has no bins for {stages} stages "
                            f"(it has {', '.join(str(n) for n in sorted(self.by_stages))})")
        return calibrated_bins(0.8 if alpha is None else alpha, self.concentration)


@dataclass(frozen=True)
class ServingSpec:
    policies: tuple[str, ...] = ("fcfs",)
    max_batch: int = 1
    max_running: int | None = None
    prefill_chunk: int | None = None
    slo: Slo = Slo()
    adaptive: Adaptive = Adaptive()


def calibrated_bins(alpha: float, concentration: float = 2.0, k: int = DEFAULT_BINS) -> tuple[ConfidenceBin, ...]:
    """k equal confidence bins of a calibrated drafter: confidence c ~ Beta(a, b) with a = κα, b = κ(1 − α),
    and a draft of confidence c accepted with probability c, so Σ share × acceptance = α exactly:
    share = I(hi; a, b) − I(lo; a, b) and share × acceptance = E[c; bin] = α (I(hi; a+1, b) − I(lo; a+1, b)),
    I the regularized incomplete beta function. α = 0 or 1 puts every draft in the bottom or top bin."""
    edges = [i / k for i in range(k + 1)]
    if alpha <= 0.0 or alpha >= 1.0:
        top = alpha >= 1.0
        full = k - 1 if top else 0
        return tuple(ConfidenceBin(edges[i], edges[i + 1], 1.0 if i == full else 0.0, 1.0 if top else 0.0)
                     for i in range(k))
    a, b = concentration * alpha, concentration * (1 - alpha)
    cdf = [betainc(a, b, x) for x in edges]
    cdf1 = [betainc(a + 1, b, x) for x in edges]
    out = []
    for i in range(k):
        share = cdf[i + 1] - cdf[i]
        mass = alpha * (cdf1[i + 1] - cdf1[i])
        acc = min(1.0, max(0.0, mass / share)) if share > 1e-15 else (edges[i] + edges[i + 1]) / 2
        out.append(ConfidenceBin(edges[i], edges[i + 1], share, acc))
    return tuple(out)


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's method;
    the symmetry I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction converges slowly). No SciPy."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num_ in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num_ * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num_ / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def mean_acceptance(bins: tuple[ConfidenceBin, ...], threshold: float = 0.0) -> float:
    """Acceptance of the drafts whose bin lies at or above the threshold (all of them at 0)."""
    use = [b for b in bins if b.low >= threshold - 1e-12]
    total = sum(b.share for b in use)
    return sum(b.share * b.acceptance for b in use) / total if total > 0 else float("nan")


# --- parsing ------------------------------------------------------------------------------------------

def _bins(obj: Any, key: str) -> tuple[ConfidenceBin, ...]:
    rows = as_list(obj)
    out = []
    for i, row in enumerate(rows):
        where = f"{key}[{i}]"
        if isinstance(row, dict):
            only(row, {"low", "high", "share", "acceptance"}, where)
            row = [row.get("low"), row.get("high"), row.get("share"), row.get("acceptance")]
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise UserError(f"{where}: expected [low, high, share, acceptance]")
        low, high, share, acc = (num(v, where, nonneg=True) for v in row)
        if not 0 <= low < high <= 1:
            raise UserError(f"{where}: confidence bounds must satisfy 0 ≤ low < high ≤ 1 (got {low:g}, {high:g})")
        if share > 1 or acc > 1:
            raise UserError(f"{where}: share and acceptance must be in [0, 1]")
        out.append(ConfidenceBin(low, high, share, acc))
    if not out:
        raise UserError(f"{key}: empty")
    out.sort(key=lambda b: b.low)
    for a, b in zip(out, out[1:]):
        if b.low < a.high - 1e-12:
            raise UserError(f"{key}: bins [{a.low:g}, {a.high:g}) and [{b.low:g}, {b.high:g}) overlap")
    total = sum(b.share for b in out)
    if abs(total - 1.0) > 0.01:
        raise UserError(f"{key}: the shares add up to {total:.3f}, not 1")
    return tuple(ConfidenceBin(b.low, b.high, b.share / total, b.acceptance) for b in out)


def load_confidence_file(path: Path, key: str) -> tuple[tuple[ConfidenceBin, ...] | None, dict]:
    """A confidence table file (`executor acceptance` writes one): `kind: spdsim-confidence` with
    `bins:` (every stage count) and/or `by_stages: {n: bins}`."""
    try:
        d = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"{key}: cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError:
        raise UserError(f"{key}: {path} is not valid YAML") from None
    if not isinstance(d, dict) or d.get("kind") != CONFIDENCE_KIND:
        raise UserError(f"{key}: {path} is not a confidence table (kind: {CONFIDENCE_KIND} missing)")
    bins = _bins(d["bins"], f"{key} bins") if "bins" in d else None
    by = {num(n, f"{key} by_stages", positive=True, integer=True): _bins(v, f"{key} by_stages.{n}")
          for n, v in mapping(d.get("by_stages") or {}, f"{key} by_stages").items()}
    if bins is None and not by:
        raise UserError(f"{key}: {path} has neither bins nor by_stages")
    return bins, by


def _adaptive(obj: Any, base: Path | None) -> Adaptive:
    key = "serving.adaptive"
    d = mapping(obj or {}, key)
    only(d, {"threshold", "bins", "table", "concentration"}, key)
    threshold = num(d.get("threshold", Adaptive.threshold), f"{key}.threshold", nonneg=True)
    if threshold > 1:
        raise UserError(f"{key}.threshold: must be in [0, 1] (got {threshold:g})")
    conc = num(d.get("concentration", Adaptive.concentration), f"{key}.concentration", positive=True)
    if "bins" in d and "table" in d:
        raise UserError(f"{key}.table: give bins or table, not both")
    bins, by, source = None, {}, ""
    if "bins" in d:
        bins, source = _bins(d["bins"], f"{key}.bins"), "bins"
    elif "table" in d:
        if not isinstance(d["table"], str):
            raise UserError(f"{key}.table: expected a file name")
        path = Path(d["table"])
        if not path.is_absolute() and base is not None and not path.exists():
            path = base / path
        bins, by = load_confidence_file(path, f"{key}.table")
        source = str(d["table"])
    return Adaptive(threshold, bins, by, conc, source)


def _slo(obj: Any) -> Slo:
    d = mapping(obj or {}, "serving.slo")
    only(d, {"ttft_p99_ms", "tpot_p99_ms"}, "serving.slo")
    return Slo(*(None if d.get(k) is None else num(d[k], f"serving.slo.{k}", positive=True)
                 for k in ("ttft_p99_ms", "tpot_p99_ms")))


def parse_serving(obj: Any, base: Path | None = None) -> ServingSpec:
    d = mapping(obj or {}, "serving")
    only(d, {"policy", "max_batch", "max_running", "prefill_chunk", "slo", "adaptive"}, "serving")
    policies = [str(p) for p in as_list(d.get("policy", list(ServingSpec.policies)))]
    if not policies:
        raise UserError("serving.policy: empty")
    for p in policies:
        if p not in POLICIES:
            raise UserError(f"serving.policy: unknown {p!r} (expected one of {', '.join(POLICIES)})")
    opt = lambda k: None if d.get(k) is None else num(d[k], f"serving.{k}", positive=True, integer=True)  # noqa: E731
    return ServingSpec(policies=tuple(dict.fromkeys(policies)),
                       max_batch=num(d.get("max_batch", 1), "serving.max_batch", positive=True, integer=True),
                       max_running=opt("max_running"), prefill_chunk=opt("prefill_chunk"),
                       slo=_slo(d.get("slo")), adaptive=_adaptive(d.get("adaptive"), base))
