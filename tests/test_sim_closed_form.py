"""DESIGN §2's closed form on the ideal setting: equal stages, free links, a free module."""
import pytest
import yaml

from spdsim.engine import simulate_point
from spdsim.metrics import ideal_spd_speedup
from spdsim.scenario import Point, parse_scenario
from spdsim import acceptance as acc

NEW_TOKENS = 1024


def ideal(n_tokens=NEW_TOKENS, **over):
    d = {
        "hardware": {"gpu": {"name": "ideal", "mem_gb": 1000, "hbm_gbps": 1000, "bf16_tflops": 1000},
                     "count": 8, "topology": {"kind": "full", "latency_us": 0, "gbps": 1.0e9}},
        "model": {"name": "toy", "layers": 32, "hidden": 4096, "ffn": 11008, "heads": 32, "kv_heads": 32,
                  "vocab": 32000},
        "costs": {"layer_ms": 1.0, "embed_ms": 0, "lm_head_ms": 0, "head_ms": 0},
        "workload": {"prompt_tokens": 16, "new_tokens": n_tokens},
        "sweep": {"stages": [1, 2, 4, 8], "partition": ["uniform"], "acceptance": [0.5], "schemes": ["pp", "spd"]},
    }
    d.update(over)
    return parse_scenario(yaml.safe_dump(d))


def evenly(alpha, length=1000):
    """An accept/reject sequence with exactly the fraction alpha of accepts, spread evenly."""
    return [int((i + 1) * alpha) - int(i * alpha) for i in range(length)]


@pytest.fixture(scope="module")
def scen():
    return ideal()


@pytest.fixture(scope="module")
def pp_rate(scen):
    return {n: simulate_point(scen, Point("pp", n, "uniform", None)).metrics for n in (1, 2, 4, 8)}


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_spd_speedup_matches_closed_form(scen, pp_rate, n, alpha):
    spec = acc.replay(sequence=evenly(alpha)) if 0 < alpha < 1 else acc.iid(alpha)
    m = simulate_point(scen, Point("spd", n, "uniform", spec)).metrics
    got = m.tokens_per_s / pp_rate[n].tokens_per_s
    want = ideal_spd_speedup(n, alpha)
    assert got == pytest.approx(want, rel=0.01)
    assert m.acceptance_rate == pytest.approx(alpha, abs=0.01)


def test_iid_speedup_matches_closed_form_at_realised_rate(scen, pp_rate):
    m = simulate_point(scen, Point("spd", 4, "uniform", acc.iid(0.7))).metrics
    assert m.acceptance_rate == pytest.approx(0.7, abs=0.05)          # ~5 sigma for ~1.3k draws
    got = m.tokens_per_s / pp_rate[4].tokens_per_s
    assert got == pytest.approx(ideal_spd_speedup(4, m.acceptance_rate), rel=0.01)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_pp_bubble_is_n_minus_1_over_n(pp_rate, n):
    m = pp_rate[n]
    assert m.bubble_ratio == pytest.approx((n - 1) / n, abs=0.02)
    # every token costs the whole model: 32 layers × 1 ms
    assert m.ms_per_token == pytest.approx(32.0, rel=0.01)


def test_spd_at_full_acceptance_keeps_every_stage_busy(scen):
    m = simulate_point(scen, Point("spd", 8, "uniform", acc.iid(1.0))).metrics
    assert m.bubble_ratio < 0.01 and m.waste_ratio == 0.0
    # α = 0: every draft wasted; each token costs a full round trip like PP, the rest is waste
    m0 = simulate_point(scen, Point("spd", 8, "uniform", acc.iid(0.0))).metrics
    assert m0.waste_ratio == pytest.approx(1 - 1 / 8 - m0.bubble_ratio, abs=0.02)


def test_ar_on_one_device():
    s = ideal(n_tokens=64, sweep={"stages": [1], "partition": ["uniform"], "acceptance": [0.5], "schemes": ["ar"]})
    m = simulate_point(s, Point("ar", 1, "uniform", None)).metrics
    assert m.ms_per_token == pytest.approx(32.0, rel=1e-6) and m.bubble_ratio == pytest.approx(0.0, abs=1e-9)
