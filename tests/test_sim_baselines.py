"""Classic speculative decoding (sd) and EAGLE-style chain drafting (chain) in the simulator."""
import pytest
import yaml

from spdsim import acceptance as acc
from spdsim.engine import simulate_point
from spdsim.errors import UserError
from spdsim.scenario import Point, parse_scenario
from spdsim.schemes.chain import conditional


def scenario(n_tokens=60_000, stages=(1,), baselines=None, costs=None, **over):
    d = {
        "hardware": {"gpu": {"name": "ideal", "mem_gb": 1000, "hbm_gbps": 1000, "bf16_tflops": 1000},
                     "count": 8, "topology": {"kind": "full", "latency_us": 0, "gbps": 1.0e9}},
        "model": {"name": "toy", "layers": 32, "hidden": 4096, "ffn": 11008, "heads": 32, "kv_heads": 32,
                  "vocab": 32000},
        "costs": {"layer_ms": 1.0, "embed_ms": 0, "lm_head_ms": 0, "head_ms": 0, **(costs or {})},
        "workload": {"prompt_tokens": 16, "new_tokens": n_tokens},
        "sweep": {"stages": list(stages), "partition": ["uniform"], "acceptance": [0.8],
                  "schemes": ["ar", "pp", "sd", "chain"]},
        "baselines": baselines or {"sd": {"gamma": 4, "cost_ratio": 0}, "chain": {"draft_ms": 0}},
    }
    d.update(over)
    return parse_scenario(yaml.safe_dump(d))


def expected_tokens(alpha, gamma):
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


@pytest.fixture(scope="module")
def ar_rate():
    return simulate_point(scenario(2000), Point("ar", 1, "uniform", None)).metrics.tokens_per_s


@pytest.mark.parametrize("alpha,gamma", [(0.6, 4), (0.8, 4), (0.9, 3), (0.7, 6)])
def test_sd_tokens_per_step_matches_leviathan(alpha, gamma, ar_rate):
    scen = scenario(baselines={"sd": {"gamma": gamma, "cost_ratio": 0}})
    r = simulate_point(scen, Point("sd", 1, "uniform", acc.iid(alpha)))
    want = expected_tokens(alpha, gamma)
    assert r.extra["tokens_per_cycle"] == pytest.approx(want, rel=0.01)
    # free drafting: every step costs one target pass, so the speedup over AR is the tokens per step
    assert r.metrics.tokens_per_s / ar_rate == pytest.approx(want, rel=0.01)
    assert r.metrics.acceptance_rate == pytest.approx(alpha, abs=0.01)


def test_sd_walltime_with_draft_cost(ar_rate):
    alpha, gamma, c = 0.8, 4, 0.1
    scen = scenario(baselines={"sd": {"gamma": gamma, "cost_ratio": c}})
    r = simulate_point(scen, Point("sd", 1, "uniform", acc.iid(alpha)))
    want = (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))
    assert r.metrics.tokens_per_s / ar_rate == pytest.approx(want, rel=0.01)
    # the draft model runs on the device, so it is busy all the time: no bubble on one device
    assert r.metrics.bubble_ratio == pytest.approx(0.0, abs=1e-6)
    assert r.extra["draft_ms"] == pytest.approx(c * 32.0 * gamma, rel=0.02)   # γ drafts of c × 32 ms


@pytest.mark.parametrize("n", [2, 4])
def test_sd_on_the_pipeline_keeps_pp_bubble(n):
    scen = scenario(n_tokens=20_000, stages=(n,))
    r = simulate_point(scen, Point("sd", n, "uniform", acc.iid(0.8)))
    pp = simulate_point(scen, Point("pp", n, "uniform", None)).metrics
    assert r.extra["tokens_per_cycle"] == pytest.approx(expected_tokens(0.8, 4), rel=0.02)
    assert r.metrics.tokens_per_s / pp.tokens_per_s == pytest.approx(expected_tokens(0.8, 4), rel=0.02)
    assert r.metrics.bubble_ratio == pytest.approx((n - 1) / n, abs=1e-3)   # one chunk in flight


def test_sd_link_cost_enters_each_step():
    slow = {"kind": "full", "latency_us": 500, "gbps": 1.0e9}
    fast = scenario(n_tokens=3000, stages=(4,))
    slow_s = scenario(n_tokens=3000, stages=(4,), hardware={**fast_hw(), "topology": slow})
    a = simulate_point(fast, Point("sd", 4, "uniform", acc.iid(0.8))).extra["cycle_ms"]
    b = simulate_point(slow_s, Point("sd", 4, "uniform", acc.iid(0.8))).extra["cycle_ms"]
    assert b - a == pytest.approx(4 * 0.5, rel=0.01)     # 3 activation hops + the result back


def fast_hw():
    return {"gpu": {"name": "ideal", "mem_gb": 1000, "hbm_gbps": 1000, "bf16_tflops": 1000}, "count": 8}


def test_chain_reproduces_its_acceptance_table(ar_rate):
    table = [0.70, 0.37, 0.21, 0.13, 0.08]
    scen = scenario(baselines={"chain": {"acceptance": table, "draft_ms": 0}})
    r = simulate_point(scen, scen.points()[1])
    assert r.point.scheme == "chain"
    measured = [float(x) for x in r.extra["acceptance_by_depth"].split("/")]
    assert measured == pytest.approx(table, abs=0.01)
    assert r.extra["tokens_per_cycle"] == pytest.approx(1 + sum(table), rel=0.01)
    assert r.metrics.tokens_per_s / ar_rate == pytest.approx(1 + sum(table), rel=0.01)


def test_chain_conditional_probabilities():
    assert conditional([0.8, 0.4, 0.1]) == pytest.approx([0.8, 0.5, 0.25])
    assert conditional([0.5, 0.0, 0.0]) == pytest.approx([0.5, 0.0, 0.0])


def test_chain_head_cost_slows_steps(ar_rate):
    scen = scenario(n_tokens=20_000, baselines={"chain": {"acceptance": [0.7, 0.4], "draft_ms": 4.0}})
    r = simulate_point(scen, Point("chain", 1, "uniform", scen.baselines.chain_point_acceptance()))
    # a step = 2 drafts of 4 ms + one 32 ms pass (the last step may draft fewer)
    assert r.extra["cycle_ms"] == pytest.approx(40.0, rel=0.01)
    assert r.metrics.tokens_per_s / ar_rate == pytest.approx(2.1 * 32 / 40, rel=0.02)


def test_points_cover_one_device_and_pipeline():
    scen = scenario(n_tokens=100, stages=(1, 2, 4))
    kinds = {(p.scheme, p.stages) for p in scen.points()}
    assert {("sd", 1), ("sd", 2), ("sd", 4), ("chain", 1)} <= kinds
    assert not any(s == "chain" and n > 1 for s, n in kinds)
    assert sum(1 for p in scen.points() if (p.scheme, p.stages) == ("sd", 1)) == 1


@pytest.mark.parametrize("baselines,key", [
    ({"chain": {"acceptance": [0.3, 0.5]}}, "baselines.chain.acceptance"),
    ({"chain": {"acceptance": [1.3]}}, "baselines.chain.acceptance"),
    ({"sd": {"gamma": 0}}, "baselines.sd.gamma"),
    ({"sd": {"cost_ratio": -1}}, "baselines.sd.cost_ratio"),
    ({"sd": {"speed": 2}}, "baselines.sd.speed"),
    ({"eagle": {}}, "baselines.eagle"),
])
def test_bad_baselines_name_the_key(baselines, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        scenario(n_tokens=10, baselines=baselines)
