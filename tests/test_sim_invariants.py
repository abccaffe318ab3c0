"""Invariants of the simulator on random small scenarios (hypothesis), determinism and monotonicity."""
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spdsim import acceptance as acc
from spdsim.engine import simulate_point
from spdsim.scenario import Point, parse_scenario


def scenario(layers=8, new_tokens=24, latency_us=10.0, gbps=50.0, layer_ms=None, head="colocated",
             features=True, topology="full", count=6, head_ms=None):
    costs = {}
    if layer_ms is not None:
        costs["layer_ms"] = layer_ms
    if head_ms is not None:
        costs["head_ms"] = head_ms
    d = {
        "hardware": {"gpu": "a100-80gb-sxm", "count": count,
                     "topology": {"kind": topology, "latency_us": latency_us, "gbps": gbps}},
        "model": {"name": "small", "layers": layers, "hidden": 1024, "ffn": 2816, "heads": 8, "kv_heads": 8,
                  "vocab": 32000},
        "workload": {"prompt_tokens": 32, "new_tokens": new_tokens},
        "head": {"placement": head, "features": features},
        "costs": costs,
        "sweep": {"stages": [1], "partition": ["uniform"], "acceptance": [0.5], "schemes": ["ar", "pp", "spd"]},
    }
    return parse_scenario(yaml.safe_dump(d))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), alpha=st.floats(0, 1), layers=st.integers(4, 10), new_tokens=st.integers(2, 40),
       latency=st.sampled_from([0.0, 5.0, 200.0]), head=st.sampled_from(["colocated", "dedicated"]),
       features=st.booleans(), part=st.sampled_from(["uniform", "compute_balanced", "comm_aware"]),
       topo=st.sampled_from(["full", "ring", "nvswitch", "pcie-tree"]))
def test_invariants(n, alpha, layers, new_tokens, latency, head, features, part, topo):
    s = scenario(layers=layers, new_tokens=new_tokens, latency_us=latency, head=head, features=features,
                 topology=topo)
    spd = simulate_point(s, Point("spd", n, part, acc.iid(alpha)), keep_events=True)
    pp = simulate_point(s, Point("pp", n, part, None))
    for m in (spd.metrics, pp.metrics):
        assert 0.0 <= m.bubble_ratio <= 1.0
        assert 0.0 <= m.waste_ratio <= 1.0 - m.bubble_ratio + 1e-9
        assert m.new_tokens == new_tokens
    commits = [e for e in spd.events if e.kind == "commit"]
    assert len(commits) == new_tokens
    assert sorted(e.position for e in commits) == list(range(32, 32 + new_tokens))   # each token once
    assert spd.metrics.tokens_per_s / pp.metrics.tokens_per_s <= n + 1e-9
    assert pp.metrics.waste_ratio == 0.0 and pp.metrics.acceptance_rate is None
    again = simulate_point(s, Point("spd", n, part, acc.iid(alpha)))
    assert again.metrics == spd.metrics                                   # same seed → identical


def test_stale_compute_is_marked_discarded():
    s = scenario(new_tokens=40)
    r = simulate_point(s, Point("spd", 4, "uniform", acc.iid(0.5)), keep_events=True)
    flushes = [e for e in r.events if e.kind == "flush"]
    wasted = [e for e in r.events if e.kind == "compute" and e.discarded]
    assert flushes and wasted
    committed = {e.position for e in r.events if e.kind == "commit"}
    # a discarded compute never belongs to the epoch whose result committed its successor
    useful = [e for e in r.events if e.kind == "compute" and not e.discarded]
    assert {e.position + 1 for e in useful} <= committed
    assert r.metrics.rejected == len(flushes)


def test_seed_changes_verdicts_and_same_seed_repeats():
    s1, s2 = scenario(new_tokens=60), scenario(new_tokens=60)
    s2.seed = 7
    p = Point("spd", 3, "uniform", acc.iid(0.6))
    a, b, c = (simulate_point(s, p).metrics for s in (s1, s1, s2))
    assert a == b
    assert (a.accepted, a.window_ns) != (c.accepted, c.window_ns)


SEQ = [1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1]


@pytest.mark.parametrize("scheme,n", [("pp", 3), ("spd", 3), ("spd", 4)])
@pytest.mark.parametrize("head", ["colocated", "dedicated"])
def test_slower_link_never_faster(scheme, n, head):
    rates = []
    for lat in (0.0, 20.0, 500.0):
        for gbps in (100.0, 0.01):
            s = scenario(latency_us=lat, gbps=gbps, head=head, new_tokens=30)
            a = acc.replay(sequence=SEQ) if scheme == "spd" else None
            rates.append((lat, gbps, simulate_point(s, Point(scheme, n, "uniform", a)).metrics.tokens_per_s))
    for lat, gbps, r in rates:
        for lat2, gbps2, r2 in rates:
            if lat2 >= lat and gbps2 <= gbps:
                assert r2 <= r * (1 + 1e-9), (lat, gbps, lat2, gbps2)


@pytest.mark.parametrize("scheme", ["ar", "pp", "spd"])
def test_slower_stage_never_faster(scheme):
    n = 1 if scheme == "ar" else 3
    rates = []
    for layer_ms in (0.1, 0.5, 2.0):
        s = scenario(layer_ms=layer_ms, head_ms=0.05, new_tokens=30)
        a = acc.replay(sequence=SEQ) if scheme == "spd" else None
        rates.append(simulate_point(s, Point(scheme, n, "uniform", a)).metrics.tokens_per_s)
    assert rates[0] > rates[1] > rates[2]


def test_slower_head_never_faster():
    rates = []
    for head_ms in (0.0, 0.2, 1.0):
        s = scenario(layer_ms=0.5, head_ms=head_ms, new_tokens=30)
        rates.append(simulate_point(s, Point("spd", 3, "uniform", acc.replay(sequence=SEQ))).metrics.tokens_per_s)
    assert rates[0] >= rates[1] >= rates[2] and rates[0] > rates[2]


@pytest.mark.parametrize("features", [False, True])
def test_a_slow_colocated_module_still_speculates_every_position(features):
    """The first device reads its messages only when it cannot issue, as the executor's first rank does:
    a RESULT that arrives while the module drafts (here a draft takes 1.5 stages' time) waits, the next
    position goes in with its draft and is verified. Reading it first had issued the true token instead:
    no verification at all, and α changed nothing."""
    s = scenario(layer_ms=1.0, head_ms=6.0, features=features)      # 8 layers: 4 ms per stage at n = 2
    N = s.workload.new_tokens
    rates = []
    for a in (0.0, 0.5, 1.0):
        m = simulate_point(s, Point("spd", 2, "uniform", acc.iid(a))).metrics
        assert m.accepted + m.rejected == N - 1
        rates.append(m.tokens_per_s)
    assert rates[0] < rates[1] < rates[2]
