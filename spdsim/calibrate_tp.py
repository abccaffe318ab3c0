"""The `tp:` section of a calibration (spdsim/calibration_file.py documents its keys), fitted from what
`executor profile --tp T` measured:

  allreduce, allgather   latency + bytes / bandwidth, least squares on relative errors over the
                 collective microbenchmark (profile.json `allreduce` / `allgather`: medians per size over the
                 runs' transport); then the latency gains the in-run excess Δ = mean traced collective −
                 the fit at its bytes, over the TP run traces (runs_tp/): inside a decode a collective also
                 waits for the slower rank of its group and competes for the cores, which a benchmark on
                 idle ranks does not see. Δ is per call (a wait), so it goes into the latency, not the
                 bytes term; every decode collective of the tiny model has the same size, so the runs alone
                 could not fit the bytes term.
  layer_scale[T] a TP stage's forward without its collectives, ÷ the same forward's TP = 1 cost (the
                 layer fit, κ and the run's regime factor: what CalibratedCosts charges at TP 1) over
                 every decode forward of the TP runs at that T; the embedding is replicated, so it is
                 charged unscaled.
  Runs with more ranks than the host has cores (profile.json `cpu_count`) are left out of both in-run
  fits: oversubscribed ranks wait for time slices, which the simulator does not model (validate skips
  such points too).

Calibration runs only: the TP runs are the profile's, never a validation's measured ones. No torch."""
from __future__ import annotations

import bisect
from dataclasses import replace

import numpy as np

from spdsim.calibration_file import CalibratedCosts, TpCalibration, _micro_stage_s, stage_role
from spdsim.trace import Trace


def fit_latency_bandwidth(sizes: list[float], seconds: list[float]) -> tuple[float, float, float]:
    """(latency s, bandwidth B/s, relative RMS error %) of seconds ≈ latency + bytes / bandwidth, least
    squares on relative errors (small messages count as much as large ones), both terms ≥ 0."""
    x, y = np.asarray(sizes, float), np.asarray(seconds, float)
    w = 1.0 / y
    (lat, inv_bw), *_ = np.linalg.lstsq(np.stack([w, x * w], 1), np.ones_like(y), rcond=None)
    if inv_bw <= 0:                         # no bytes term in the data: a constant
        lat, inv_bw = float(np.sum(w) / np.sum(w * w)), 1e-15
    elif lat < 0:                           # no latency term: through the origin
        lat, inv_bw = 0.0, float(np.sum(x * w * w) / np.sum((x * w) ** 2))
    pred = lat + x * inv_bw
    err = 100.0 * float(np.sqrt(np.mean(((pred - y) / y) ** 2)))
    return float(lat), 1.0 / float(inv_bw), err


def _nested(compute: list, collectives: list) -> list[list]:
    """For each compute event, the collective events of its rank that lie inside it."""
    by_dev: dict[str, list] = {}
    for c in collectives:
        by_dev.setdefault(c.device, []).append(c)
    starts = {d: [c.start_ns for c in v] for d, v in by_dev.items()}
    for d in by_dev:
        order = sorted(range(len(by_dev[d])), key=lambda i: by_dev[d][i].start_ns)
        by_dev[d] = [by_dev[d][i] for i in order]
        starts[d] = [c.start_ns for c in by_dev[d]]
    out = []
    for e in compute:
        evs, st = by_dev.get(e.device, []), starts.get(e.device, [])
        i = bisect.bisect_left(st, e.start_ns)
        inside = []
        while i < len(evs) and evs[i].start_ns < e.end_ns:
            if evs[i].end_ns <= e.end_ns:
                inside.append(evs[i])
            i += 1
        out.append(inside)
    return out


def fit_tp(prof: dict, tp_runs: list[Trace], costs: CalibratedCosts) -> tuple[TpCalibration | None, dict, list[str]]:
    """The tp section from the profile's collective microbenchmarks and TP run traces (None without the
    microbenchmark); fit error % per component; report lines."""
    if not prof.get("allreduce"):
        return None, {}, []
    lines, err = [], {}
    ar = prof["allreduce"]
    ag = prof.get("allgather") or ar
    ar_lat, ar_bw, err["tp_allreduce"] = fit_latency_bandwidth(ar["sizes"], ar["seconds"])
    ag_lat, ag_bw, err["tp_allgather"] = fit_latency_bandwidth(ag["sizes"], ag["seconds"])
    lines.append(f"tp        all-reduce on {ar['tp']} ranks ({ar.get('transport')}, {ar.get('algorithm')}): "
                 f"{ar_lat * 1e6:.1f} µs + bytes / {ar_bw / 1e9:.3f} GB/s   fit error {err['tp_allreduce']:.1f}%;  "
                 f"all-gather {ag_lat * 1e6:.1f} µs + bytes / {ag_bw / 1e9:.3f} GB/s   fit error {err['tp_allgather']:.1f}%")
    cores = prof.get("cpu_count") if prof.get("device", "cpu") == "cpu" else None
    fitted = [tr for tr in tp_runs if tr.header.tp > 1 and (not cores or tr.header.tp * tr.header.stages <= cores)]
    meas = {"ar": 0.0, "ag": 0.0}
    pred = {"ar": 0.0, "ag": 0.0}
    calls = {"ar": 0, "ag": 0}
    scale_num: dict[int, float] = {}
    scale_den: dict[int, float] = {}
    a, b, embed, lm_head = costs.layer_a_s, costs.layer_b_s, costs.embed_s_, costs.lm_head_s_
    for tr in fitted:
        h = tr.header
        t, n = h.tp, h.stages
        decode = [e for e in tr.events if e.phase == "decode"]
        comps = [e for e in decode if e.kind == "compute"]
        colls = [e for e in decode if e.kind == "allreduce"]
        for c in colls:
            gather = c.name == "allgather"
            k = "ag" if gather else "ar"
            meas[k] += c.duration_ns * 1e-9
            pred[k] += (ag_lat + c.bytes / ag_bw) if gather else (ar_lat + c.bytes / ar_bw)
            calls[k] += 1
        bound = costs.for_point(h.scheme, n)          # TP 1 costs of this run's regime
        for e, inside in zip(comps, _nested(comps, colls)):
            first, last = e.stage == 0, e.stage == n - 1
            r = bound.role_scale.get(stage_role(first, last), bound.scale)
            fwd = (e.duration_ns - sum(c.duration_ns for c in inside)) * 1e-9
            layers = tuple(h.partition[e.stage])
            scalable = _micro_stage_s(a, b, 0.0, lm_head, layers, e.position + 1, first, last)
            scale_num[t] = scale_num.get(t, 0.0) + fwd / r - (embed if first else 0.0)
            scale_den[t] = scale_den.get(t, 0.0) + scalable
    excess = {k: max((meas[k] - pred[k]) / calls[k], 0.0) if calls[k] else 0.0 for k in meas}
    layer_scale = {t: max(scale_num[t] / scale_den[t], 1e-3) for t in sorted(scale_den) if scale_den[t] > 0}
    left_out = len(tp_runs) - len(fitted)
    if fitted:
        lines.append(f"tp        in-run excess per collective over the benchmark: all-reduce "
                     f"{excess['ar'] * 1e6:.1f} µs ({calls['ar']} calls), all-gather {excess['ag'] * 1e6:.1f} µs "
                     f"({calls['ag']}), added to the latency;  layer_scale "
                     + ", ".join(f"TP {t}: {k:.3f}" for t, k in layer_scale.items())
                     + f" (forward without collectives ÷ its TP 1 cost; {len(fitted)} TP runs"
                     + (f", {left_out} oversubscribed left out" if left_out else "") + ")")
    else:
        lines.append("tp        no TP run traces within the host's cores (runs_tp/): collectives as benchmarked, "
                     "no layer_scale (a TP point then needs one: `executor profile --tp T` with T ≤ cores)")
    tp = TpCalibration(allreduce_latency_s=ar_lat + excess["ar"], allreduce_bandwidth=ar_bw,
                       allgather_latency_s=ag_lat + excess["ag"], allgather_bandwidth=ag_bw,
                       layer_scale=layer_scale)
    return tp, err, lines


def with_tp_section(costs: CalibratedCosts, tp: TpCalibration | None) -> CalibratedCosts:
    return costs if tp is None else replace(costs, tp_calibration=tp)
