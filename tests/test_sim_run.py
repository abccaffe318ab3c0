"""`spdsim run` end to end on a small scenario, the sweep API, acceptance processes."""
import argparse
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from spdsim import acceptance as acc
from spdsim.sweep import COLUMNS, run_command, run_sweep, select_points
from spdsim.scenario import parse_scenario
from spdsim.trace import read_trace

SMALL = {
    "name": "small",
    "hardware": {"gpu": "a100-80gb-sxm", "count": 4, "topology": "nvswitch"},
    "model": {"name": "tiny"},
    "workload": {"prompt_tokens": 16, "new_tokens": 24},
    "sweep": {"stages": [1, 2, 4], "partition": ["uniform", "comm_aware"], "acceptance": [0.6, 0.9],
              "schemes": ["ar", "pp", "spd"]},
}


def args(path, out, **kw):
    base = dict(scenario=path, out=out, jobs=1, quiet=True, no_plots=True, trace=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_run_writes_results_and_timelines(tmp_path):
    p = tmp_path / "small.yaml"
    p.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    assert run_command(args(p, out, trace="best")) == 0
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns[:len(COLUMNS)]) == COLUMNS
    assert (out / "scenario.yaml").read_text() == p.read_text()
    assert len(df) == 1 + 2 * 3 * 2 + 3 * 2      # ar + spd(n,partition,α) + pp(n,partition)
    spd = df[(df.scheme == "spd") & (df.stages > 1)]
    assert (spd.speedup_vs_pp > 1).all() and spd.acceptance_rate.notna().all()
    assert (df[df.scheme == "pp"].speedup_vs_pp == 1).all()
    best = df[df.scheme == "spd"].sort_values("tokens_per_s").iloc[-1].point_id
    tr = read_trace(out / "timelines" / f"{best}.jsonl")
    assert {e.kind for e in tr.events} >= {"compute", "send", "head", "verify", "commit"}
    chrome = json.loads((out / f"timeline_{best}.json").read_text())
    assert chrome["traceEvents"]


def test_jobs_do_not_change_results():
    s = parse_scenario(yaml.safe_dump(SMALL))
    a, b = run_sweep(s, jobs=1), run_sweep(s, jobs=2)
    pd.testing.assert_frame_equal(a, b)


def test_trace_filter():
    s = parse_scenario(yaml.safe_dump(SMALL))
    df = run_sweep(s)
    ids = select_points(df, "scheme=spd,stages=4,partition=uniform,acceptance=0.9")
    assert ids == ["spd-n4-uniform-a0.9"]
    assert len(select_points(df, "all")) == len(df)


def test_markov_mean_and_run_length():
    spec = acc.markov(0.8, 3.0)
    draw = acc.sampler(spec, np.random.default_rng(1))
    xs = np.array([draw() for _ in range(60000)])
    assert xs.mean() == pytest.approx(0.8, abs=0.02)
    runs, cur = [], 0
    for x in xs:
        if not x:
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    assert np.mean(runs) == pytest.approx(3.0, rel=0.08)


def test_replay_wraps_in_order():
    draw = acc.sampler(acc.replay(sequence="1 0 0"), np.random.default_rng(0))
    assert [draw() for _ in range(7)] == [True, False, False, True, False, False, True]


def test_iid_points_are_simulated_at_the_alpha_asked_for():
    """A run of N tokens verifies N - 1 drafts; exactly round(α(N-1)) of them accept, at every n."""
    s = parse_scenario(yaml.safe_dump(SMALL))
    df = run_sweep(s)
    spd = df[(df["scheme"] == "spd") & (df["stages"] > 1)]     # n = 1 does not speculate
    verdicts = spd["accepted"] + spd["rejected"]
    assert (verdicts == s.workload.new_tokens - 1).all()
    for a, rows in spd.groupby("acceptance"):
        assert (rows["accepted"] == round(a * (s.workload.new_tokens - 1))).all(), a


def test_exact_count_sampler_then_iid():
    draw = acc.sampler(acc.iid(0.3), np.random.default_rng(5), exact_over=40)
    head = [draw() for _ in range(40)]
    assert sum(head) == 12
    tail = [draw() for _ in range(20000)]          # past the exact part: i.i.d. at α
    assert np.mean(tail) == pytest.approx(0.3, abs=0.02)
    # the same seed gives the same sequence; another seed another order
    again = acc.sampler(acc.iid(0.3), np.random.default_rng(5), exact_over=40)
    other = acc.sampler(acc.iid(0.3), np.random.default_rng(6), exact_over=40)
    assert [again() for _ in range(40)] == head
    assert [other() for _ in range(40)] != head

