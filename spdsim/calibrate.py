"""`spdsim calibrate TRACE_DIR --out CALIB.yaml`: fit the simulator's cost model to executor traces.
The fitted model, `CalibratedCosts`, and its file live in `spdsim.calibration_file`; replaying traced
runs (the in-sample check, the spread fit) in `spdsim.replay`.

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
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from spdsim.calibrate_tp import fit_tp, with_tp_section
from spdsim.calibration_file import (CalibratedCosts, _micro_stage_s, regime_of, stage_role,
                                     write_calibration)
from spdsim.errors import UserError
from spdsim.jitter import Jitter, estimate as estimate_jitter, overlapping
from spdsim.replay import _replay_scenario, draft_kind, fit_jitter_scale, in_sample, load_runs
from spdsim.trace import Trace, TraceEvent


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


def fit_prefill(rows: list[dict] | None) -> tuple[tuple[float, float, float, float], float] | None:
    """((a, b, embed a, embed b), error %) of a prompt chunk of T tokens: a + b·T per layer and the
    chunk's embedding ea + eb·T (`executor profile`'s prefill sweep); None without one."""
    if not rows:
        return None
    a, b, err = fit_layer([{"ctx": r["tokens"], "median_s": r["median_s"]} for r in rows])
    ea, eb, _ = fit_layer([{"ctx": r["tokens"], "median_s": r.get("embed_s", 0.0)} for r in rows])
    return (a, b, ea, eb), err


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


def first_rank_gaps(trace: Trace) -> list[float]:
    """The SPD first rank's own host time per tick (seconds): from the later of the end of its own work
    after a forward (the ACT send, the draft: charged separately, as send_block and head) and the arrival
    of the last RESULT before its next forward, to that forward's start. Why apart from the other ranks'
    'tick': their gap holds their own (non-blocking) RESULT send, which on the first rank is the
    separately charged blocking ACT send; charging both overstated SPD's idle time (issue 15, runs 18-19:
    0.15 ms against 0.04 ms measured here)."""
    h, ev = trace.header, trace.events
    if h.scheme != "spd" or h.stages < 2 or h.tp > 1:     # TP runs are fitted apart (calibrate_tp)
        return []
    comp = _decode(ev, "compute", "rank0")
    own = sorted(_decode(ev, "send", "rank0") + _decode(ev, "head", "rank0"), key=lambda e: e.start_ns)
    own_starts = [e.start_ns for e in own]
    arrivals = sorted(e.end_ns for e in _decode(ev, "send", f"rank{h.stages - 1}", f"result {h.stages - 1}->0"))
    out = []
    for a, b in zip(comp, comp[1:]):
        ready = a.end_ns
        for e in own[bisect.bisect_left(own_starts, a.end_ns):]:
            if e.start_ns >= b.start_ns:
                break
            ready = max(ready, e.end_ns)
        k = bisect.bisect_right(arrivals, b.start_ns) - 1
        if k >= 0:
            ready = max(ready, arrivals[k])
        out.append((b.start_ns - ready) * 1e-9)
    return out


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
            kind = draft_kind(tr)
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
            if first := first_rank_gaps(tr):     # the first rank's own tick: not in the regime's mean
                ticks_by.setdefault(f"{regime}:first", []).extend(first)
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
        regime_pred = [contention_by[f"{regime_of(t.header.scheme, t.header.stages, draft_kind(t))}:"
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
    prefill = fit_prefill(prof.get("prefill"))        # serving's prompt chunks (None: not profiled)
    if prefill:
        (pa, pb, pea, peb), err["prefill"] = prefill
        prefill = (pa * kappa, pb * kappa, pea * kappa, peb * kappa)
        lines.append(f"prefill   a = {pa * 1e3:.4f} ms + b = {pb * 1e6:.4f} µs/token per layer, embedding "
                     f"{pea * 1e3:.4f} ms + {peb * 1e6:.4f} µs/token   fit error {err['prefill']:.1f}%")
    costs = CalibratedCosts(layer_a_s=a * kappa, layer_b_s=b * kappa, embed_s_=embed * kappa,
                            lm_head_s_=lm_head * kappa, head_s_by_kind=head_by_kind, link_latency_s=lat,
                            link_bandwidth=bw, tick_overhead_s=tick, msg_overhead_s=msg, send_block_s=send_block,
                            contention=kappa, contention_by=contention_by, tick_by=tick_by, msg_by=msg_by,
                            jitter_by=jitter_by, prefill=prefill,
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
    tp, tp_err, tp_lines = fit_tp(prof, load_runs(trace_dir, "runs_tp"), costs)
    err.update(tp_err)
    return with_tp_section(costs, tp), err, lines + tp_lines


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
