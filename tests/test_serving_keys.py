"""Serving keys (DESIGN §5 ⚑): what parses, and bad workload / serving keys → exit 2 naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spdsim.errors import UserError
from spdsim.scenario import parse_scenario
from spdsim.serving_config import calibrated_bins, mean_acceptance
from spdsim.workload import draw_requests

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "scenarios" / "ideal.yaml").read_text())
SERVING = {"workload": {"prompt_tokens": 16, "new_tokens": 8, "requests": 10,
                        "arrivals": {"kind": "poisson", "rate_per_s": [1, 2]}},
           "serving": {"policy": ["fcfs", "interleave"]}}


def text(**over) -> str:
    d = yaml.safe_load(yaml.safe_dump(BASE))
    d.update(yaml.safe_load(yaml.safe_dump(SERVING)))
    for path, value in over.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return yaml.safe_dump(d)


DELETE = object()


def test_serving_points_are_decode_points_times_policy_and_load():
    s = parse_scenario(text())
    plain = parse_scenario(yaml.safe_dump(BASE))
    # ar, pp (n = 1..8), spd (n = 1..8 × 4 α) × 2 policies × 2 loads; PP and SPD on one stage are AR
    one_stage = [p for p in plain.points() if p.scheme in ("pp", "spd") and p.stages == 1]
    assert one_stage and len(s.points()) == (len(plain.points()) - len(one_stage)) * 2 * 2
    assert {p.policy for p in s.points()} == {"fcfs", "interleave"} and {p.load for p in s.points()} == {1.0, 2.0}
    assert all(p.policy is None and p.load is None for p in plain.points())
    assert [p.point_id for p in plain.points()] == [p.point_id for p in parse_scenario(yaml.safe_dump(BASE)).points()]


def test_requests_are_common_to_every_load():
    s = parse_scenario(text(workload__prompt_tokens={"dist": "lognormal", "mean": 64, "sigma": 0.6},
                            workload__new_tokens={"dist": "uniform", "low": 4, "high": 12}))
    a, b = draw_requests(s.workload, 1.0, 0), draw_requests(s.workload, 4.0, 0)
    assert [(r.prompt_tokens, r.new_tokens) for r in a] == [(r.prompt_tokens, r.new_tokens) for r in b]
    assert [r.arrival_s for r in a] == pytest.approx([4 * r.arrival_s for r in b])
    assert all(1 <= r.prompt_tokens <= 256 and 4 <= r.new_tokens <= 12 for r in a)


def test_calibrated_confidence_bins_have_mean_alpha():
    for alpha in (0.0, 0.3, 0.8, 0.95, 1.0):
        bins = calibrated_bins(alpha)
        assert sum(b.share for b in bins) == pytest.approx(1.0)
        assert mean_acceptance(bins) == pytest.approx(alpha, abs=1e-3)
        # a calibrated drafter: the drafts above a threshold are accepted more often
        if 0 < alpha < 1:
            assert mean_acceptance(bins, 0.5) > alpha


@pytest.mark.parametrize("over,key", [
    (dict(workload__arrivals={"kind": "burst"}), "workload.arrivals.kind"),
    (dict(workload__arrivals={"kind": "poisson"}), "workload.arrivals.rate_per_s"),
    (dict(workload__arrivals={"kind": "poisson", "rate_per_s": -1}), "workload.arrivals.rate_per_s"),
    (dict(workload__arrivals={"kind": "poisson", "rate_per_s": 1, "burst": 2}), "workload.arrivals.burst"),
    (dict(workload__arrivals={"kind": "closed", "users": 0}), "workload.arrivals.users"),
    (dict(workload__arrivals={"kind": "closed", "users": 2, "think_s": -1}), "workload.arrivals.think_s"),
    (dict(workload__arrivals={"kind": "trace", "file": "no-such-file.csv"}), "workload.arrivals.file"),
    (dict(workload__arrivals={"kind": "trace"}), "workload.arrivals.file"),
    (dict(workload__requests=0), "workload.requests"),
    (dict(workload__prompt_tokens={"dist": "zipf"}), "workload.prompt_tokens.dist"),
    (dict(workload__prompt_tokens={"dist": "lognormal", "sigma": 1}), "workload.prompt_tokens.mean"),
    (dict(workload__new_tokens={"dist": "uniform", "low": 9, "high": 3}), "workload.new_tokens.high"),
    (dict(workload__arrivals=DELETE), "workload.requests"),
    (dict(workload__arrivals=DELETE, workload__requests=DELETE), "serving"),
    (dict(serving__policy="lifo"), "serving.policy"),
    (dict(serving__max_batch=0), "serving.max_batch"),
    (dict(serving__max_running=1.5), "serving.max_running"),
    (dict(serving__prefill_chunk=-4), "serving.prefill_chunk"),
    (dict(serving__preempt=True), "serving.preempt"),
    (dict(serving__slo={"ttft_p90_ms": 5}), "serving.slo.ttft_p90_ms"),
    (dict(serving__slo={"tpot_p99_ms": 0}), "serving.slo.tpot_p99_ms"),
    (dict(serving__adaptive={"threshold": 2}), "serving.adaptive.threshold"),
    (dict(serving__adaptive={"bins": [[0, 0.5, 0.5, 0.3], [0.4, 1, 0.5, 0.9]]}), "serving.adaptive.bins"),
    (dict(serving__adaptive={"bins": [[0, 0.5, 0.2, 0.3], [0.5, 1, 0.2, 0.9]]}), "serving.adaptive.bins"),
    (dict(serving__adaptive={"table": "missing.yaml"}), "serving.adaptive.table"),
    (dict(sweep__schemes=["pp", "sd"]), "sweep.schemes"),
    (dict(head={"placement": "dedicated"}), "head.placement"),
])
def test_bad_serving_keys_name_the_key(over, key):
    with pytest.raises(UserError) as e:
        parse_scenario(text(**over))
    assert str(e.value).startswith(key), str(e.value)


def test_bad_key_exits_2_with_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(text(serving__policy="lifo"))
    r = subprocess.run([sys.executable, "-m", "spdsim.cli", "run", str(p), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "serving.policy" in r.stderr


def test_trace_arrivals_read_and_checked(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("arrival_s,prompt_tokens,new_tokens\n0.0,5,3\n0.5,9,2\n0.2,4,4\n")
    with pytest.raises(UserError, match="workload.arrivals.file.*row 4"):
        parse_scenario(text(workload={"arrivals": {"kind": "trace", "file": str(f)}}))
    f.write_text("arrival_s,prompt_tokens,new_tokens\n0.0,5,3\n0.5,9,2\n")
    s = parse_scenario(text(workload={"arrivals": {"kind": "trace", "file": str(f)}}))
    assert [(r.arrival_s, r.prompt_tokens, r.new_tokens) for r in draw_requests(s.workload, None, 0)] == \
        [(0.0, 5, 3), (0.5, 9, 2)]
    assert all(p.load is None for p in s.points())


def test_incomplete_beta_against_closed_forms():
    import math
    from spdsim.serving_config import betainc
    for x in (0.01, 0.3, 0.5, 0.77, 0.999):
        assert betainc(1, 1, x) == pytest.approx(x)
        assert betainc(2, 1, x) == pytest.approx(x * x)
        assert betainc(1, 3, x) == pytest.approx(1 - (1 - x) ** 3)
        assert betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)))
