"""What the executor's serving runs are measured and predicted with (issue 19): `spdsim.metrics.
window_metrics` over a serving trace gives the simulator's own serving figures, and `spdsim.replay_serving`
replaying a simulated run's arrivals, lengths and per-request verdicts reproduces that run exactly."""
from __future__ import annotations

import pytest
import yaml

from spdsim.engine import simulate_point
from spdsim.metrics import window_metrics
from spdsim.replay_serving import MeasuredRequest, replay_serving
from spdsim.scenario import parse_scenario

BASE = {
    "hardware": {"gpu": "h100-sxm", "count": 4, "topology": "nvswitch"},
    "model": {"name": "llama-3-8b"},
    "head": {"features": False},
    "workload": {"prompt_tokens": {"dist": "uniform", "low": 8, "high": 40}, "new_tokens": {"dist": "uniform", "low": 4, "high": 12},
                 "requests": 12, "arrivals": {"kind": "poisson", "rate_per_s": 150}},
    "serving": {"policy": ["fcfs", "interleave", "spd_first"], "max_running": 3},
    "sweep": {"stages": [3], "partition": ["uniform"], "acceptance": [0.6], "schemes": ["pp", "spd"]},
}


def points():
    sc = parse_scenario(yaml.safe_dump(BASE))
    return sc, list(sc.points())


POINTS = [p.point_id for p in points()[1]]


def point(pid):
    sc, pts = points()
    return sc, next(p for p in pts if p.point_id == pid)


def _sim(sc, p):
    return simulate_point(sc, p, keep_events=True)


@pytest.mark.parametrize("pid", POINTS)
def test_window_metrics_over_a_serving_trace_are_the_simulators_figures(pid):
    sc, p = point(pid)
    r = _sim(sc, p)
    recs = r.requests
    t0, t1 = round(min(x.arrival_s for x in recs) * 1e9), round(max(x.finish_s for x in recs) * 1e9)
    m = window_metrics(r.events, p.scheme, p.stages, t0, t1, sum(x.new_tokens for x in recs), list(r.plan.placement),
                       phases=("prefill", "decode"))
    assert m.tokens_per_s == pytest.approx(r.metrics.tokens_per_s, rel=1e-6)
    assert m.bubble_ratio == pytest.approx(r.metrics.bubble_ratio, abs=1e-6)
    assert m.waste_ratio == pytest.approx(r.metrics.waste_ratio, abs=1e-6)
    assert (m.accepted, m.rejected) == (r.metrics.accepted, r.metrics.rejected)


def _measured(r):
    """A simulated run as the executor reports one: arrivals, lengths, each request's verdicts in order."""
    out = []
    for x in r.requests:
        verdicts = [int(e.accepted) for e in r.events if e.kind == "verify" and e.request == x.request]   # in order
        out.append(MeasuredRequest(x.arrival_s, x.prompt_tokens, x.new_tokens, tuple(verdicts)))
    return out


@pytest.mark.parametrize("pid", POINTS)
def test_replaying_a_runs_arrivals_lengths_and_verdicts_reproduces_it(pid):
    sc, p = point(pid)
    r = _sim(sc, p)
    out = replay_serving(sc, p.scheme, p.stages, p.policy, 3, _measured(r), seed=sc.seed)
    for a, b in zip(r.requests, out.records):
        assert (b.start_s, b.first_token_s, b.finish_s) == pytest.approx((a.start_s, a.first_token_s, a.finish_s),
                                                                         rel=1e-9, abs=1e-12)
    assert out.metrics.bubble_ratio == pytest.approx(r.metrics.bubble_ratio, abs=1e-9)
    assert (out.metrics.accepted, out.metrics.rejected) == (r.metrics.accepted, r.metrics.rejected)
    assert out.extra["tpot_p90_ms"] == pytest.approx(r.extra["tpot_p90_ms"])


def test_the_replay_follows_the_verdicts_it_is_given():
    """All accepted vs all rejected: the same arrivals, different predictions (it does read them)."""
    sc, pts = points()
    p = next(q for q in pts if q.scheme == "spd" and q.policy == "interleave")
    r = _sim(sc, p)
    runs = {}
    for v in (0, 1):
        reqs = [MeasuredRequest(m.arrival_s, m.prompt_tokens, m.new_tokens, (v,) * 50) for m in _measured(r)]
        runs[v] = replay_serving(sc, "spd", 3, "interleave", 3, reqs)
    assert runs[1].metrics.rejected == 0 and runs[0].metrics.accepted == 0
    assert runs[1].extra["tpot_p50_ms"] < runs[0].extra["tpot_p50_ms"]
