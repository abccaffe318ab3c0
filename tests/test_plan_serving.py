"""spdsim plan by SLO (--qps / --max-qps): the SLO option, the capacity bound the rate search relies
on, the cheapest configuration really meeting the SLO, and the highest rate really within it."""
from __future__ import annotations

import argparse
import math

import pandas as pd
import pytest

from spdsim.cli import main
from spdsim.engine import simulate_point
from spdsim.errors import UserError
from spdsim.plan import Config, request_from_args
from spdsim.plan_serving import ServingPlan, capacity_bound, parse_slo, serving_scenario
from spdsim.plan import assess

BASE = ["--model", "tiny", "--gpu", "h100", "--max-gpus", "4", "--prompt-tokens", "16", "--new-tokens", "8",
        "--requests", "30", "--quiet"]


def _plan(tmp_path, *extra):
    rc = main(["plan", "--out", str(tmp_path), *BASE, *extra])
    return rc, pd.read_csv(tmp_path / "plan_serving.csv")


def test_parse_slo():
    s = parse_slo("tpot_p99=40ms, ttft_p99=1s")
    assert (s.ttft_p99_ms, s.tpot_p99_ms) == (1000.0, 40.0)
    assert parse_slo("tpot_p99=0.5").tpot_p99_ms == 0.5 and parse_slo("tpot_p99=0.5").ttft_p99_ms is None
    for bad in ("", "tpot_p90=4ms", "tpot_p99=-1ms", "tpot_p99=fast"):
        with pytest.raises(UserError, match="--slo"):
            parse_slo(bad)


@pytest.mark.parametrize("extra,key", [(["--qps", "2"], "--slo"), (["--qps", "2", "--max-qps", "--slo", "tpot_p99=1ms"], "--qps"),
                                       (["--qps", "2", "--target-tokens-per-s", "5", "--slo", "tpot_p99=1ms"],
                                        "--target-tokens-per-s"),
                                       (["--qps", "2", "--slo", "tpot_p99=1ms", "--policies", "lifo"], "--policies")])
def test_bad_options_exit_2(tmp_path, capsys, extra, key):
    assert main(["plan", "--out", str(tmp_path), *BASE, *extra]) == 2
    assert key in capsys.readouterr().err


def _serving_plan(qps=None, slo="tpot_p99=2ms,ttft_p99=20ms"):
    ns = argparse.Namespace(model="tiny", gpu="h100", max_gpus=4, target_tokens_per_s=None, qps=qps, max_qps=qps is None,
                            topology=None, schemes="ar,pp,spd", partition=None, headroom=0.1, prompt_tokens=16,
                            new_tokens=8, acceptance="0.8", price=None, seed=0)
    return ServingPlan(request_from_args(ns), parse_slo(slo), qps, requests=30)


@pytest.mark.parametrize("scheme,stages,policy", [("pp", 4, "interleave"), ("spd", 4, "interleave"), ("ar", 1, "fcfs")])
def test_no_run_sustains_more_than_the_capacity_bound(scheme, stages, policy):
    sp = _serving_plan()
    c = Config("h100-sxm", stages, scheme, stages, "colocated" if scheme == "spd" else "", "compute_balanced")
    a = assess(sp.base, c)
    bound = capacity_bound(sp, c, a.plan)
    s, p = serving_scenario(sp, c, policy, 4 * bound)         # far past saturation: the pipeline's own pace
    r = simulate_point(s, p, plan=a.plan)
    assert r.extra["throughput_requests_per_s"] <= bound * 1.001


def test_qps_plan_picks_the_cheapest_configuration_meeting_the_slo(tmp_path):
    rc, df = _plan(tmp_path, "--qps", "800", "--slo", "tpot_p99=1ms,ttft_p99=20ms")
    ok = df[df["status"] == "meets SLO"]
    assert rc == 0 and len(ok)
    best = ok.iloc[0]
    cheaper = df[df["usd_per_hour"] < best["usd_per_hour"]]
    assert len(cheaper) and set(cheaper["status"]) <= {"over capacity", "misses SLO"}   # one GPU cannot
    assert (df[df["usd_per_hour"] > best["usd_per_hour"]]["status"] == "pruned").all()
    # the simulator confirms it
    sp = _serving_plan(qps=800.0, slo="tpot_p99=1ms,ttft_p99=20ms")
    c = Config(best["gpu"], int(best["gpus"]), best["scheme"], int(best["stages"]),
               "colocated" if best["scheme"] == "spd" and best["stages"] > 1 else "", best["partition"])
    s, p = serving_scenario(sp, c, best["policy"], 800.0)
    r = simulate_point(s, p)
    assert r.extra["meets_slo"] and r.extra["tpot_p99_ms"] == pytest.approx(best["tpot_p99_ms"])


def test_max_qps_is_within_the_slo_and_below_the_bound(tmp_path):
    rc, df = _plan(tmp_path, "--max-qps", "--slo", "tpot_p99=2ms,ttft_p99=20ms", "--schemes", "pp,spd",
                   "--policies", "fcfs,interleave", "--max-gpus", "2", "--search-steps", "4")
    assert rc == 0
    sp = _serving_plan()
    for _, row in df[df["status"] == "meets SLO"].iterrows():
        assert 0 < row["qps"] <= row["capacity_bound_qps"]
        assert row["simulated_runs"] == 1 + 4
        c = Config(row["gpu"], int(row["gpus"]), row["scheme"], int(row["stages"]),
                   "colocated" if row["scheme"] == "spd" else "", row["partition"])
        s, p = serving_scenario(sp, c, row["policy"], row["qps"])
        assert simulate_point(s, p).extra["meets_slo"]
    assert math.isfinite(df["qps_per_usd_hour"].dropna().iloc[0])
    assert (tmp_path / "pareto_serving.png").stat().st_size > 1000
