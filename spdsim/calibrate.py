"""`spdsim calibrate TRACE_DIR --out CALIB.yaml`: fit the simulator's cost model to executor traces, and
`CalibratedCosts`, the `CostModel` a scenario gets when it names `calibration: CALIB.yaml`.

TRACE_DIR is what `executor profile` writes: profile.json (microbenchmarks) and runs/<run>/rank<k>.jsonl
(full AR / PP / SPD decode traces, spdsim.trace schema). What is fitted, and from what:

  layer      a + b·ctx per decoder layer: least squares over the per-layer microbenchmark medians
  embed, lm_head   their microbenchmark medians
  contention κ     compute slowdown against the microbenchmarks: Σ measured ÷ Σ predicted stage time over
                   every decode compute event of the run traces, overall and per regime (one rank; PP, one
                   rank computing at a time; SPD, ranks computing at once on shared cores): a simulated
                   point gets its scheme's regime (`CalibratedCosts.for_point`)
  In-run components (κ, tick, message, head) are means, not medians: a prediction of tokens/s needs the
  total time, and on a shared CPU the per-tick times are heavy-tailed (preemption), so a median would
  systematically under-predict.
  link       latency + bytes / bandwidth: least squares over the ping-pong one-way times against size
  tick_overhead    the host-side time a rank spends per tick outside its forward (receive and unpack,
                   send, Python bookkeeping): gaps between consecutive decode computes of a rank whose
                   next input was already waiting (stages ≥ 2, and AR's single rank, which never waits)
  msg_overhead     delivery cost beyond the link fit: for messages that reached an idle rank, (send start →
                   the receiver's compute start) − tick_overhead − link(bytes), median, ≥ 0
  send_block the first rank's blocking ACT send in SPD runs, mean: the executor sends synchronously, and
                   on shared cores waking an idle receiver can cost the sender its core for a while; the
                   simulator charges it on the first device after each ACT (it delays the next issue)
  head       the speculative module's draft time, mean of `head` events, per drafter kind (oracle / head)
  spread     each forward's time ÷ its run's mean, per regime and stage role, p5 / p50 / p95: printed.
  jitter     what the simulator draws (spdsim/jitter.py), per regime: the sd of forward time ÷ run mean
                   (context growth divided out), its lag-1 autocorrelation and the correlation of two
                   ranks' concurrent forwards (paired by time), medians over runs. Each simulated forward costs its mean × (1 + x),
                   x an AR(1) process per stage with those three figures: the mean is kept, and SPD ticks
                   wait for the slower rank as measured ones do. (Means alone left SPD 3-9% fast and its
                   bubble 3-4 pp low; an earlier draw from interpolated quantiles was biased 9% slow by one
                   preemption spike as the top quantile.) For SPD the drawn sd is the traced one times
                   the factor at which the simulated calibration runs idle as much as the traced ones
                   (fit_jitter_scale; 0.63-0.87 with oracle drafts, 0 with the module on this host)
  tick, message and the compute factor are also kept per regime (for_point picks the point's; SPD with a
                   trained module drafting on the first rank is a regime of its own)

Every component's fit error is printed (relative RMS of the fit against the samples it was fitted to).
This module must not import torch.
"""
from __future__ import annotations

import argparse
import bisect
import functools
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from spdsim.errors import UserError
from spdsim.jitter import Jitter, estimate as estimate_jitter, overlapping
from spdsim.trace import Trace, TraceEvent, read_trace

CALIBRATION_KIND = "spdsim-calibration"
VERSION = 1


# --- the calibrated cost model ------------------------------------------------------------------------

@dataclass
class CalibratedCosts:
    """`spdsim.costs.CostModel` from a calibration file. Times in seconds."""
    layer_a_s: float
    layer_b_s: float                      # per token of context
    embed_s_: float
    lm_head_s_: float
    head_s_by_kind: dict[str, float]
    link_latency_s: float
    link_bandwidth: float                 # bytes / s
    tick_overhead_s: float = 0.0
    msg_overhead_s: float = 0.0
    send_block_s: float = 0.0             # the first rank's blocking ACT send (spdsim.engine charges it)
    contention: float = 1.0               # κ, already folded into the figures above
    # Compute slowdown per regime relative to κ: 'single' (one rank), 'serial' (PP: one rank computes at a
    # time), 'overlapped' (SPD: ranks compute at once and share the cores), 'drafting' (SPD beside a trained
    # drafter on the first rank). for_point picks one.
    contention_by: dict[str, float] = field(default_factory=dict)
    scale: float = 1.0                    # the picked regime's factor (applies to every compute cost)
    role_scale: dict[str, float] = field(default_factory=dict)   # ... per stage role, where measured
    tick_by: dict[str, float] = field(default_factory=dict)   # tick_overhead_s per regime, where measured
    msg_by: dict[str, float] = field(default_factory=dict)    # msg_overhead_s per regime, where measured
    jitter_by: dict[str, Jitter] = field(default_factory=dict)   # forward variability per regime
    jitter: Jitter | None = None          # the picked regime's (None: every forward costs its mean)
    head_kind: str = "oracle"             # which drafter head_s stands for
    source: dict = field(default_factory=dict)

    def layer_s(self, layer: int, ctx: int) -> float:
        return self.scale * (self.layer_a_s + self.layer_b_s * ctx)

    def embed_s(self) -> float:
        return self.scale * self.embed_s_

    def lm_head_s(self) -> float:
        return self.scale * self.lm_head_s_

    def head_s(self, ctx: int) -> float:
        by = self.head_s_by_kind
        return by.get(self.head_kind, by.get("oracle", 0.0))

    def verify_s(self) -> float:
        return self.lm_head_s_

    def draft_s(self, ctx: int) -> float:
        return self.head_s(ctx)

    def control_s(self) -> float:      # spd_dedicated's phases: not profiled (the executor runs it, validate does not)
        return 0.0

    def sync_s(self) -> float:
        return 0.0

    def stage_s(self, stage: int, first_layer: int, last_layer: int, ctx: int, first: bool, last: bool) -> float:
        t = _micro_stage_s(self.layer_a_s, self.layer_b_s, self.embed_s_, self.lm_head_s_, (first_layer, last_layer),
                           ctx, first, last)
        return t * self.role_scale.get(stage_role(first, last), self.scale)

    def hop_s(self, u: str, v: str, nbytes: int) -> tuple[float, float]:
        return nbytes / self.link_bandwidth, self.link_latency_s

    def with_head(self, kind: str) -> "CalibratedCosts":
        from dataclasses import replace
        return replace(self, head_kind=kind)

    def for_point(self, scheme: str, stages: int) -> "CalibratedCosts":
        """The costs of one simulated point: the compute regime its scheme runs in on the profiled host."""
        from dataclasses import replace
        regime = regime_of(scheme, stages, self.head_kind)
        if regime == "drafting" and "drafting" not in self.contention_by:
            regime = "overlapped"           # calibrated without a trained drafter: the nearest regime
        roles = {r: self.contention_by[f"{regime}:{r}"] for r in ("only", "first", "middle", "last")
                 if f"{regime}:{r}" in self.contention_by}
        return replace(self, scale=self.contention_by.get(regime, 1.0), role_scale=roles,
                       jitter=self.jitter_by.get(regime),
                       tick_overhead_s=self.tick_by.get(regime, self.tick_overhead_s),
                       msg_overhead_s=self.msg_by.get(regime, self.msg_overhead_s))

    # --- file form ---
    def to_yaml_dict(self, fit_error: dict | None = None) -> dict:
        return {"kind": CALIBRATION_KIND, "version": VERSION,
                "layer": {"a_ms": self.layer_a_s * 1e3, "b_us_per_ctx": self.layer_b_s * 1e6},
                "embed_ms": self.embed_s_ * 1e3, "lm_head_ms": self.lm_head_s_ * 1e3,
                "head_ms": {k: v * 1e3 for k, v in self.head_s_by_kind.items()},
                "link": {"latency_us": self.link_latency_s * 1e6, "gbps": self.link_bandwidth / 1e9},
                "tick_overhead_ms": self.tick_overhead_s * 1e3, "msg_overhead_ms": self.msg_overhead_s * 1e3,
                "send_block_ms": self.send_block_s * 1e3,
                "contention": self.contention, "contention_by": dict(self.contention_by),
                "tick_by_ms": {k: v * 1e3 for k, v in self.tick_by.items()},
                "jitter_by": {k: v.to_dict() for k, v in self.jitter_by.items()},
                "msg_by_ms": {k: v * 1e3 for k, v in self.msg_by.items()},
                "fit_error_pct": fit_error or {}, "source": self.source}

    @classmethod
    def from_yaml_dict(cls, d: dict, where: str = "calibration") -> "CalibratedCosts":
        if not isinstance(d, dict) or d.get("kind") != CALIBRATION_KIND:
            raise UserError(f"{where}: not a `spdsim calibrate` file (kind: {CALIBRATION_KIND} missing)")
        try:
            link = d["link"]
            costs = cls(layer_a_s=float(d["layer"]["a_ms"]) * 1e-3,
                        layer_b_s=float(d["layer"].get("b_us_per_ctx", 0.0)) * 1e-6,
                        embed_s_=float(d.get("embed_ms", 0.0)) * 1e-3,
                        lm_head_s_=float(d.get("lm_head_ms", 0.0)) * 1e-3,
                        head_s_by_kind={str(k): float(v) * 1e-3 for k, v in (d.get("head_ms") or {}).items()},
                        link_latency_s=float(link["latency_us"]) * 1e-6,
                        link_bandwidth=float(link["gbps"]) * 1e9,
                        tick_overhead_s=float(d.get("tick_overhead_ms", 0.0)) * 1e-3,
                        msg_overhead_s=float(d.get("msg_overhead_ms", 0.0)) * 1e-3,
                        send_block_s=float(d.get("send_block_ms", 0.0)) * 1e-3,
                        contention=float(d.get("contention", 1.0)),
                        contention_by={str(k): float(v) for k, v in (d.get("contention_by") or {}).items()},
                        tick_by={str(k): float(v) * 1e-3 for k, v in (d.get("tick_by_ms") or {}).items()},
                        jitter_by={str(k): Jitter.from_dict(v) for k, v in (d.get("jitter_by") or {}).items()},
                        msg_by={str(k): float(v) * 1e-3 for k, v in (d.get("msg_by_ms") or {}).items()},
                        source=dict(d.get("source") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: malformed calibration ({e.__class__.__name__}: {e})") from None
        if costs.link_bandwidth <= 0 or min(costs.layer_a_s, costs.tick_overhead_s, costs.msg_overhead_s,
                                            costs.link_latency_s) < 0:
            raise UserError(f"{where}: negative time or non-positive bandwidth")
        return costs


def load_calibration(path: str | Path, head_kind: str = "oracle") -> CalibratedCosts:
    """The file's cost model, head_s standing for the `head_kind` drafter (oracle | head). Cached per
    file version: a sweep asks for the cost model once per point."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as e:
        raise UserError(f"calibration: cannot read {path} ({e.strerror})") from None
    return _load(str(path.resolve()), mtime).with_head(head_kind)


@functools.lru_cache(maxsize=16)
def _load(path_str: str, mtime: int) -> CalibratedCosts:
    path = Path(path_str)
    try:
        d = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"calibration: cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError:
        raise UserError(f"calibration: {path} is not valid YAML") from None
    return CalibratedCosts.from_yaml_dict(d, f"calibration {path}")


# --- fitting ----------------------------------------------------------------------------------------

def _rel_rms(pred: list[float], meas: list[float]) -> float:
    """Relative RMS error of a fit, in %."""
    r = [(p - m) / m for p, m in zip(pred, meas) if m > 0]
    return 100.0 * math.sqrt(sum(x * x for x in r) / len(r)) if r else float("nan")


def fit_layer(layers: list[dict]) -> tuple[float, float, float]:
    """(a, b, error %) of median_s ≈ a + b·ctx over every (layer, ctx) microbenchmark."""
    ctx = np.array([r["ctx"] for r in layers], float)
    y = np.array([r["median_s"] for r in layers], float)
    if len(set(ctx)) < 2:
        a, b = float(np.median(y)), 0.0
    else:
        (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(ctx), ctx], 1), y, rcond=None)
        if b < 0:                   # noise on a flat curve: no growth with context
            a, b = float(np.mean(y)), 0.0
    return float(a), float(b), _rel_rms(list(a + b * ctx), list(y))


def fit_link(link: list[dict]) -> tuple[float, float, float]:
    """(latency s, bandwidth B/s, error %) of one_way_s ≈ latency + bytes / bandwidth."""
    x = np.array([r["bytes"] for r in link], float)
    y = np.array([r["one_way_s"] for r in link], float)
    (lat, inv_bw), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    if inv_bw <= 0:
        inv_bw = 1e-12
    lat = max(float(lat), 0.0)
    return lat, 1.0 / float(inv_bw), _rel_rms(list(lat + x * inv_bw), list(y))


def _decode(events: list[TraceEvent], kind: str, device: str | None = None, name_prefix: str | None = None):
    out = [e for e in events if e.kind == kind and e.phase == "decode" and (device is None or e.device == device)
           and (name_prefix is None or e.name.startswith(name_prefix))]
    return sorted(out, key=lambda e: e.start_ns)


def run_gaps(trace: Trace) -> dict[str, list[float]]:
    """Host-side overhead samples of one run (seconds): 'tick' gaps of a rank whose next input was waiting,
    'latency' from a message's send start to the compute it fed on an idle rank (with its bytes)."""
    h, ev = trace.header, trace.events
    n = h.stages
    ticks, lat, lat_bytes = [], [], []
    if n == 1:
        comp = _decode(ev, "compute", "rank0")
        ticks += [(b.start_ns - a.end_ns) * 1e-9 for a, b in zip(comp, comp[1:])]
        return {"tick": ticks, "latency": [], "latency_bytes": []}
    for r in range(1, n):
        comp = _decode(ev, "compute", f"rank{r}")
        sends_in = _decode(ev, "send", f"rank{r - 1}", f"act {r - 1}->{r}")
        own_sends = _decode(ev, "send", f"rank{r}")
        if len(comp) != len(sends_in):
            continue                                   # an unexpected trace: skip rather than mis-pair
        own_end = {}
        for s in own_sends:                            # the rank's own send after each compute
            own_end.setdefault(s.position, []).append(s.end_ns)
        for k in range(len(comp)):
            msg, c = sends_in[k], comp[k]
            if k == 0:
                busy_until = 0
            else:
                prev = comp[k - 1]
                after = [t for t in own_end.get(prev.position, []) if t >= prev.end_ns]
                busy_until = min(after) if after else prev.end_ns
            if k > 0 and msg.end_ns <= comp[k - 1].end_ns:
                ticks.append((c.start_ns - comp[k - 1].end_ns) * 1e-9)      # input was waiting
            elif msg.start_ns >= busy_until:
                lat.append((c.start_ns - msg.start_ns) * 1e-9)               # rank was idle
                lat_bytes.append(msg.bytes)
    if h.scheme == "pp":                               # rank 0 waits idle for every RESULT under PP
        comp0 = _decode(ev, "compute", "rank0")
        results = _decode(ev, "send", f"rank{n - 1}", f"result {n - 1}->0")
        for res, nxt in zip(results, comp0[1:]):
            if nxt.start_ns >= res.start_ns:
                lat.append((nxt.start_ns - res.start_ns) * 1e-9)
                lat_bytes.append(res.bytes)
    return {"tick": ticks, "latency": lat, "latency_bytes": lat_bytes}


def _micro_stage_s(a: float, b: float, embed: float, lm_head: float, layers: tuple[int, int], ctx: int,
                   first: bool, last: bool) -> float:
    """A stage's forward from the microbenchmark fits alone (no contention factor): the one formula
    `CalibratedCosts.stage_s` scales and `calibrate` divides run forwards by."""
    return (layers[1] - layers[0]) * (a + b * ctx) + (embed if first else 0.0) + (lm_head if last else 0.0)


def stage_role(first: bool, last: bool) -> str:
    return "only" if first and last else "first" if first else "last" if last else "middle"


def regime_of(scheme: str, stages: int, drafter: str = "oracle") -> str:
    """How a scheme's ranks use the host's cores: one rank, one at a time, several at once, or several at
    once beside a trained drafter (SPD's first rank runs the module between its forwards; on shared cores
    that slows the ranks unevenly: rank 1's forward took 0.4-1.0 ms longer than rank 0's with the module,
    -0.1 to +0.3 ms without, so pooling the two put a false asymmetry into oracle points)."""
    if stages == 1:
        return "single"
    if scheme not in ("spd", "spd_dedicated"):
        return "serial"
    return "drafting" if scheme == "spd" and drafter not in ("", "oracle") else "overlapped"


def concurrent_ns(events: list[TraceEvent]) -> list[int]:
    """For each event, the ns during which events of other devices ran at the same time (summed over
    them). Each device's events sorted by start, with the running maximum of their ends: walking back
    from the last one that starts before an event ends stops at the first whose running end is before
    it starts. O(E · devices · log E) for a rank's non-overlapping forwards, where comparing every pair
    was O(E²) (8 ranks × 1000 tokens: 64M pairs)."""
    by_dev: dict[str, tuple[list[int], list[int], list[TraceEvent]]] = {}
    for e in sorted(events, key=lambda ev: ev.start_ns):
        starts, reach, evs = by_dev.setdefault(e.device, ([], [], []))
        starts.append(e.start_ns)
        reach.append(max(e.end_ns, reach[-1]) if reach else e.end_ns)
        evs.append(e)
    out = []
    for e in events:
        total = 0
        for dev, (starts, reach, evs) in by_dev.items():
            if dev == e.device:
                continue
            k = bisect.bisect_left(starts, e.end_ns)          # dev's events that start before e ends
            while k > 0 and reach[k - 1] > e.start_ns:
                k -= 1
                o = evs[k]
                total += max(0, min(e.end_ns, o.end_ns) - max(e.start_ns, o.start_ns))
        out.append(total)
    return out


def _draft_kind(trace: Trace) -> str:
    """'oracle', 'head', ... from a run's header ('' for schemes that do not draft)."""
    return str(trace.header.extra.get("draft") or "").split(":")[0]


def load_runs(trace_dir: Path) -> list[Trace]:
    runs_dir = trace_dir / "runs"
    if not runs_dir.is_dir():
        return []
    out = []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        try:
            out.append(read_trace(d))
        except ValueError as e:
            raise UserError(f"{d}: {e}") from None
    return out


def calibrate(trace_dir: Path) -> tuple[CalibratedCosts, dict, list[str]]:
    """Fit everything; returns (costs, fit error % per component, printable report lines)."""
    prof_path = trace_dir / "profile.json"
    try:
        prof = json.loads(prof_path.read_text())
    except OSError:
        raise UserError(f"{trace_dir}: no profile.json (run `executor profile --out {trace_dir}` first)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{prof_path}: not JSON ({e.msg})") from None
    if not prof.get("layers"):
        raise UserError(f"{prof_path}: no layer measurements")
    lines, err = [], {}
    a, b, err["layer"] = fit_layer(prof["layers"])
    embed, lm_head = float(prof["embed_s"]), float(prof["lm_head_s"])
    lines.append(f"layer     a = {a * 1e3:.4f} ms + b = {b * 1e6:.4f} µs/ctx   fit error {err['layer']:.1f}% "
                 f"({len(prof['layers'])} medians, contexts {prof.get('contexts')})")
    lines.append(f"embed     {embed * 1e3:.4f} ms;  lm_head {lm_head * 1e3:.4f} ms (microbenchmark medians)")
    if prof.get("link"):
        lat, bw, err["link"] = fit_link(prof["link"])
        lines.append(f"link      latency {lat * 1e6:.1f} µs + bytes / {bw / 1e9:.3f} GB/s   fit error {err['link']:.1f}% "
                     f"({len(prof['link'])} sizes)")
    else:
        lat, bw = 0.0, 1e12
        lines.append("link      no link measurements: free links")
    runs = load_runs(trace_dir)
    kappa = 1.0
    contention_by: dict[str, float] = {}
    jitter_by: dict[str, Jitter] = {}
    tick_by: dict[str, float] = {}
    msg_by: dict[str, float] = {}
    tick = msg = 0.0
    heads: dict[str, list[float]] = {}
    blocks: list[float] = []
    if runs:
        ratios, per_run = [], {}
        by_regime: dict[str, list[tuple[float, float]]] = {}
        within: dict[str, list[float]] = {}
        series_by: dict[str, list[list[np.ndarray]]] = {}   # per regime, per run: each rank's forwards
        concurrent_by: dict[str, list[list[tuple[int, int, int, int]]]] = {}   # ... which ran together
        ticks_by: dict[str, list[float]] = {}
        overlap: list[tuple[float, float]] = []      # (measured ÷ microbenchmark, fraction overlapped)
        ticks: list[float] = []
        lats: list[tuple[float, int]] = []
        lats_by: dict[str, list[tuple[float, int]]] = {}
        for tr in runs:
            h = tr.header
            n = h.stages
            rr = []
            comps = _decode(tr.events, "compute")
            shared = concurrent_ns(comps) if n > 1 else None
            for i, e in enumerate(comps):
                layers = tuple(h.partition[e.stage])
                micro = _micro_stage_s(a, b, embed, lm_head, layers, e.position + 1, e.stage == 0, e.stage == n - 1)
                rr.append((e.duration_ns * 1e-9, micro))
                if shared is not None:       # how much of this forward ran while another rank computed too
                    overlap.append((e.duration_ns * 1e-9 / micro, min(shared[i] / max(e.duration_ns, 1), 1.0)))
            ratios += rr
            kind = _draft_kind(tr)
            regime = regime_of(h.scheme, n, kind)
            by_regime.setdefault(regime, []).extend(rr)
            run_roles: dict[str, list[float]] = {}
            for e, x in zip(comps, rr):   # the first rank also runs the controller: roles differ
                key = f"{regime}:{stage_role(e.stage == 0, e.stage == n - 1)}"
                by_regime.setdefault(key, []).append(x)
                run_roles.setdefault(key, []).append(x[0] / x[1])
            for key, v in run_roles.items():   # variability within this run, around its own level
                mean = statistics.fmean(v)
                within.setdefault(key, []).extend(r / mean for r in v)
            # measured ÷ microbenchmark: context growth divided out before the variability is taken
            series_by.setdefault(regime, []).append(
                [np.array([m / p for e, (m, p) in zip(comps, rr) if e.stage == s]) for s in range(n)])
            concurrent_by.setdefault(regime, []).append(
                overlapping([[(e.start_ns, e.end_ns) for e in comps if e.stage == s] for s in range(n)]))
            per_run[f"{h.scheme}-n{n}:{h.extra.get('draft') or ''}"] = (
                sum(m for m, _ in rr) / sum(p for _, p in rr) if rr else float("nan"))
            g = run_gaps(tr)
            ticks += g["tick"]
            ticks_by.setdefault(regime, []).extend(g["tick"])
            lats += list(zip(g["latency"], g["latency_bytes"]))
            lats_by.setdefault(regime, []).extend(zip(g["latency"], g["latency_bytes"]))
            if h.scheme == "spd" and n > 1:    # where rank 0 has other work to do after sending
                blocks += [e.duration_ns * 1e-9 for e in _decode(tr.events, "send", "rank0", "act 0->1")]
            if kind:
                heads.setdefault(kind, []).extend(e.duration_ns * 1e-9 for e in _decode(tr.events, "head"))
        kappa = sum(m for m, _ in ratios) / sum(p for _, p in ratios)
        contention_by = {k: sum(m for m, _ in v) / sum(p for _, p in v) / kappa for k, v in by_regime.items() if v}
        spread = {k: np.quantile(v, [0.05, 0.5, 0.95]) for k, v in within.items() if len(v) >= 10}
        jitter_by = {k: j for k, v in series_by.items() if (j := estimate_jitter(v, concurrent_by[k])) is not None}
        regime_pred = [contention_by[f"{regime_of(t.header.scheme, t.header.stages, _draft_kind(t))}:"
                                     f"{stage_role(e.stage == 0, e.stage == t.header.stages - 1)}"]
                       for t in runs for e in _decode(t.events, "compute")]
        err["compute"] = _rel_rms([kappa * f * p for f, (_, p) in zip(regime_pred, ratios)], [m for m, _ in ratios])
        lines.append(f"compute   contention κ = {kappa:.3f} (Σ run compute ÷ Σ microbenchmark prediction over "
                     f"{len(ratios)} events)   fit error {err['compute']:.1f}% with a factor per regime and stage role: "
                     + ", ".join(f"{k} ×{v:.2f}" for k, v in contention_by.items()) + ";  κ per run: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in per_run.items()))
        alone = [r for r, f in overlap if f < 0.2]
        shared = [r for r, f in overlap if f > 0.8]
        if alone and shared:
            lines.append(f"sharing   a forward takes {statistics.fmean(shared) / statistics.fmean(alone):.2f}× its time "
                         f"alone while another rank computes ({len(shared)} overlapped vs {len(alone)} alone)")
        if spread:
            lines.append("spread    forward ÷ its run's mean, p5 / p50 / p95: "
                         + ", ".join(f"{k} {a:.2f}/{b:.2f}/{c:.2f}" for k, (a, b, c) in spread.items()))
        if jitter_by:
            lines.append("jitter    simulated per forward (sd of time ÷ run mean, lag-1 autocorrelation, correlation "
                         "across ranks): " + ", ".join(f"{k} {j.sd:.3f}/{j.lag1:.2f}/{j.cross:.2f}"
                                                      for k, j in jitter_by.items()))
        if ticks:
            tick = statistics.fmean(ticks)
            err["tick_overhead"] = _rel_rms([tick] * len(ticks), ticks)
            tick_by = {k: statistics.fmean(v) for k, v in ticks_by.items() if len(v) >= 3}
            lines.append(f"tick      {tick * 1e3:.4f} ms per tick (mean of {len(ticks)} gaps)   spread "
                         f"{err['tick_overhead']:.1f}%;  per regime: "
                         + ", ".join(f"{k} {v * 1e3:.4f} ms" for k, v in tick_by.items()))
        if lats:
            extra = [L - tick - (lat + nb / bw) for L, nb in lats]
            msg = max(statistics.fmean(extra), 0.0)
            pred = [tick + lat + nb / bw + msg for _, nb in lats]
            err["msg_overhead"] = _rel_rms(pred, [L for L, _ in lats])
            for k, v in lats_by.items():       # each regime against its own tick
                if len(v) >= 3:
                    t_k = tick_by.get(k, tick)
                    msg_by[k] = max(statistics.fmean(L - t_k - (lat + nb / bw) for L, nb in v), 0.0)
            lines.append(f"message   {msg * 1e3:.4f} ms per message beyond the link (mean of {len(lats)} "
                         f"idle-receiver deliveries)   delivery fit error {err['msg_overhead']:.1f}%;  per regime: "
                         + ", ".join(f"{k} {v * 1e3:.4f} ms" for k, v in msg_by.items()))
    else:
        lines.append("runs      no run traces: κ = 1, no tick or message overhead")
    send_block = statistics.fmean(blocks) if blocks else 0.0
    if blocks:
        err["send_block"] = _rel_rms([send_block] * len(blocks), blocks)
        lines.append(f"send      {send_block * 1e3:.4f} ms per ACT send on the first rank (mean of {len(blocks)}, SPD "
                     f"runs; the sender blocks, and loses its core when the receiver wakes)   spread {err['send_block']:.1f}%")
    head_by_kind = {k: statistics.fmean(v) for k, v in heads.items() if v}
    for k, v in heads.items():
        if v:
            err[f"head_{k}"] = _rel_rms([head_by_kind[k]] * len(v), v)
            lines.append(f"head      {k}: {head_by_kind[k] * 1e3:.4f} ms per draft (mean of {len(v)})   "
                         f"spread {err[f'head_{k}']:.1f}%")
    head_by_kind.setdefault("oracle", 0.0)
    source = {"trace_dir": str(trace_dir), "device": prof.get("device"), "transport": prof.get("transport"),
              "model": prof.get("model"), "model_path": prof.get("model_path"), "cpu_count": prof.get("cpu_count"),
              "load_avg": prof.get("load_avg"), "prompt_tokens": prof.get("prompt_tokens"),
              "runs": [f"{t.header.scheme}-n{t.header.stages}:{t.header.extra.get('draft') or ''}" for t in runs]}
    costs = CalibratedCosts(layer_a_s=a * kappa, layer_b_s=b * kappa, embed_s_=embed * kappa,
                            lm_head_s_=lm_head * kappa, head_s_by_kind=head_by_kind, link_latency_s=lat,
                            link_bandwidth=bw, tick_overhead_s=tick, msg_overhead_s=msg, send_block_s=send_block,
                            contention=kappa, contention_by=contention_by, tick_by=tick_by, msg_by=msg_by,
                            jitter_by=jitter_by,
                            source=source)
    if runs and prof.get("model"):
        base = _replay_scenario(prof["model"], max(t.header.stages for t in runs))
        for regime in ("overlapped", "drafting"):
            k = fit_jitter_scale(base, runs, costs, regime)
            if k is not None:
                j = costs.jitter_by[regime]
                costs.jitter_by[regime] = Jitter(j.sd * k, j.lag1, j.cross)
                lines.append(f"jitter    {regime}: drawn sd {j.sd * k:.3f} = {k:.2f} × the traced {j.sd:.3f}, the "
                             f"factor at which the simulated runs idle as much as the traced ones (mean bubble)")
    return costs, err, lines


def _replay_scenario(model: dict, stages: int):
    """A scenario to replay traced runs of the profiled model on: one device per rank (the costs come
    from the calibration given to `_replay`, not from this scenario's made-up hardware)."""
    from spdsim.scenario import parse_scenario
    return parse_scenario(yaml.safe_dump({
        "name": "in-sample", "hardware": {"gpu": {"name": "host", "mem_gb": 1000, "hbm_gbps": 100, "bf16_tflops": 1},
                                          "count": stages, "topology": {"kind": "full"}},
        "model": {"name": "profiled", "layers": model["layers"], "hidden": model["dim"], "ffn": model["ffn"],
                  "heads": model["heads"], "kv_heads": model["kv_heads"], "vocab": model["vocab"],
                  "dtype_bytes": model.get("dtype_bytes", 4)},
        # spd in the sweep: the plan places the drafter only for sweeps that draft (engine.plan_inputs)
        "sweep": {"stages": [1], "schemes": ["ar", "pp", "spd"]}}))


def replay_point(scenario, scheme: str, stages: int, prompt_tokens: int, new_tokens: int, accepts: list[int],
                 features: bool, seed: int = 0, costs: CalibratedCosts | None = None, keep_events: bool = False):
    """One simulated decode replaying a measured one (an engine.PointResult): the same scheme, stages,
    lengths and accept/reject verdicts, the module co-located with stage 1 as the executor runs it, and
    jitter draws `seed`. `costs` replaces the scenario's cost model (the calibration being fitted);
    `executor validate`, calibrate's in-sample check and its spread fit all predict through here."""
    from dataclasses import replace as dc_replace
    from spdsim.acceptance import replay
    from spdsim.engine import simulate_point
    from spdsim.scenario import Point, Workload
    acc = replay(sequence=accepts or [1]) if scheme == "spd" and stages > 1 else None
    sc = dc_replace(scenario, seed=seed, workload=Workload(prompt_tokens, new_tokens),
                    head=dc_replace(scenario.head, features=features, placement="colocated"))
    return simulate_point(sc, Point(scheme, stages, "uniform", acc), keep_events=keep_events,
                          costs=None if costs is None else costs.with_head("head" if features else "oracle"))


def _replay(base, tr: Trace, costs: CalibratedCosts, seed: int = 0, keep_events: bool = False):
    """`replay_point` for a traced run."""
    h = tr.header
    return replay_point(base, h.scheme, h.stages, h.prompt_tokens, h.new_tokens, list(h.extra.get("accepts") or []),
                        _draft_kind(tr) not in ("", "oracle"), seed=seed, costs=costs, keep_events=keep_events)


def replay_seeds(runs: list[Trace]) -> list[int]:
    """The jitter seed each traced run is replayed with: its index among the runs of the same scheme,
    stages and drafter (validate draws repeat i of every case with seed i), shared by the spread fit
    and the in-sample check so that both see the same draws."""
    seen: dict[tuple, int] = {}
    out = []
    for t in runs:
        key = (t.header.scheme, t.header.stages, _draft_kind(t))
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out


def fit_jitter_scale(base, runs: list[Trace], costs: CalibratedCosts, regime: str) -> float | None:
    """The factor on the measured forward spread at which the simulated runs of `regime` idle as much as
    the traced ones did (mean bubble ratio; seeds from `replay_seeds`). Why: the simulator draws each
    rank's forwards independently of what the other rank is doing, but on shared cores a rank left alone
    speeds up, so the traced spread overstates the wait for the slower rank (replaying one validation's
    oracle calibration runs: at the full spread 2.3% slow and 1.7 pp too idle, with none 2.7% fast and
    2.6 pp too busy).
    Bisection on [0, 2]; None without runs of the regime or a spread to scale."""
    from spdsim.metrics import run_metrics
    from dataclasses import replace as dc_replace
    mine = [(t, seed) for t, seed in zip(runs, replay_seeds(runs))
            if t.header.scheme == "spd"                                # the engine's SPD: what the draws reach
            and regime_of(t.header.scheme, t.header.stages, _draft_kind(t)) == regime]
    j = costs.jitter_by.get(regime)
    if not mine or j is None or j.sd == 0:
        return None
    measured = statistics.fmean(run_metrics(t.events, t.header.scheme, t.header.stages, t.header.new_tokens,
                                            t.header.placement).bubble_ratio for t, _ in mine)

    def bubble(k: float) -> float:
        c = dc_replace(costs, jitter_by={**costs.jitter_by, regime: Jitter(j.sd * k, j.lag1, j.cross)})
        return statistics.fmean(_replay(base, t, c, seed=seed).metrics.bubble_ratio for t, seed in mine)

    lo, hi = 0.0, 2.0
    if bubble(lo) >= measured:
        return lo
    if bubble(hi) <= measured:
        return hi
    for _ in range(10):           # to 0.002 of the spread: well below run-to-run noise
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bubble(mid) < measured else (lo, mid)
    return (lo + hi) / 2


def in_sample(trace_dir: Path, calib: Path) -> list[str]:
    """Predict every calibration run itself (its own verdicts replayed): how much of the error is the
    model's structure rather than drift between calibration and validation. Not a validation."""
    from spdsim.metrics import run_metrics
    prof = json.loads((trace_dir / "profile.json").read_text())
    runs = load_runs(trace_dir)
    if not prof.get("model") or not runs:
        return []
    base = _replay_scenario(prof["model"], max(t.header.stages for t in runs))
    costs = load_calibration(calib)
    out = []
    for tr, seed in zip(runs, replay_seeds(runs)):
        h = tr.header
        meas = run_metrics(tr.events, h.scheme, h.stages, h.new_tokens, h.placement)
        pred = _replay(base, tr, costs, seed=seed).metrics
        out.append(f"in-sample {h.scheme}-n{h.stages} {h.extra.get('draft') or ''}: tokens/s predicted "
                   f"{pred.tokens_per_s:.2f} vs traced {meas.tokens_per_s:.2f} "
                   f"({100 * (pred.tokens_per_s / meas.tokens_per_s - 1):+.1f}%), "
                   f"bubble {pred.bubble_ratio:.3f} vs {meas.bubble_ratio:.3f}")
    return out


def write_calibration(path: Path, costs: CalibratedCosts, err: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else round(float(v), 3)) for k, v in err.items()}
    path.write_text("# written by `spdsim calibrate`; name it under `calibration:` in a scenario\n"
                    + yaml.safe_dump(costs.to_yaml_dict(clean), sort_keys=False))
    return path


def calibrate_command(args: argparse.Namespace) -> int:
    trace_dir = Path(args.trace_dir)
    if not trace_dir.is_dir():
        raise UserError(f"{trace_dir}: not a directory")
    costs, err, lines = calibrate(trace_dir)
    for line in lines:
        print(line)
    write_calibration(Path(args.out), costs, err)
    for line in in_sample(trace_dir, Path(args.out)):
        print(line)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
