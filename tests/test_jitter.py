"""Forward-to-forward jitter (spdsim/jitter.py): the estimator recovers the process the engine draws, the
draws keep every rank's mean cost, and they add the per-tick gap between ranks that SPD's bubble is made
of while leaving serial PP's throughput alone. No torch here."""
from __future__ import annotations

import dataclasses
import statistics

import numpy as np
import pytest

from spdsim.acceptance import iid
from spdsim.calibrate import calibrate
from spdsim.calibration_file import load_calibration, write_calibration
from spdsim.engine import simulate_point
from spdsim.jitter import Jitter, JitterProcess, estimate
from spdsim.scenario import Point, parse_scenario

from test_calibrate import make_trace_dir, scenario_text


def draw_runs(j: Jitter, runs: int, forwards: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Per run, two ranks' forward times (mean 5 ms) as the engine draws them: stage 0 then stage 1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(runs):
        p = JitterProcess(j, 2, rng)
        pairs = [(p.factor(0), p.factor(1)) for _ in range(forwards)]
        out.append([5e-3 * np.array([a for a, _ in pairs]), 5e-3 * np.array([b for _, b in pairs])])
    return out


@pytest.mark.parametrize("j", [Jitter(0.12, 0.5, 0.3), Jitter(0.08, 0.0, 0.0), Jitter(0.15, 0.8, 0.6)])
def test_estimate_recovers_the_process_the_engine_draws(j):
    got = estimate(draw_runs(j, runs=12, forwards=600))
    assert got.sd == pytest.approx(j.sd, rel=0.12)
    assert got.lag1 == pytest.approx(j.lag1, abs=0.08)
    assert got.cross == pytest.approx(j.cross, abs=0.08)


def test_draws_keep_the_mean():
    factors = np.concatenate([np.concatenate(r) for r in draw_runs(Jitter(0.13, 0.5, 0.3), 10, 2000, seed=3)]) / 5e-3
    assert factors.mean() == pytest.approx(1.0, abs=0.01)
    assert factors.min() > 0.3


def test_too_few_forwards_say_nothing_and_bad_values_are_refused():
    assert estimate([[np.ones(5), np.ones(5)]]) is None
    with pytest.raises(ValueError):
        Jitter(-0.1)
    with pytest.raises(ValueError):
        Jitter(0.1, lag1=1.0)


def test_jitter_widens_the_spd_bubble_keeps_the_mean_and_round_trips(tmp_path):
    costs, err, _ = calibrate(make_trace_dir(tmp_path))
    assert all(j.sd < 1e-6 for j in costs.jitter_by.values())     # the synthetic traces do not vary
    plain = write_calibration(tmp_path / "plain.yaml", costs, err)
    jit = {k: Jitter(0.15, 0.5, 0.2) for k in ("single", "serial", "overlapped")}
    noisy = write_calibration(tmp_path / "noisy.yaml", dataclasses.replace(costs, jitter_by=jit), err)
    assert load_calibration(noisy).jitter_by == jit
    sc = {name: dataclasses.replace(parse_scenario(scenario_text(path)), workload=dataclasses.replace(
          parse_scenario(scenario_text(path)).workload, new_tokens=400)) for name, path in (("plain", plain), ("noisy", noisy))}
    spd = {k: simulate_point(s, Point("spd", 2, "uniform", iid(1.0)), keep_events=True) for k, s in sc.items()}
    pp = {k: simulate_point(s, Point("pp", 2, "uniform", None)).metrics for k, s in sc.items()}
    # each tick waits for the slower rank: the bubble grows and SPD slows, while serial PP only averages
    assert spd["noisy"].metrics.bubble_ratio > spd["plain"].metrics.bubble_ratio + 0.03
    assert spd["noisy"].metrics.tokens_per_s < 0.97 * spd["plain"].metrics.tokens_per_s
    assert pp["noisy"].tokens_per_s == pytest.approx(pp["plain"].tokens_per_s, rel=0.03)
    # the draws keep each forward's mean cost (over 4 seeds × 800 forwards: the sampling error is ~0.5%)
    fwd = {k: statistics.fmean(e.end_ns - e.start_ns
                               for seed in range(4)
                               for e in simulate_point(dataclasses.replace(s, seed=seed), Point("spd", 2, "uniform", iid(1.0)),
                                                       keep_events=True).events
                               if e.kind == "compute" and e.phase == "decode") for k, s in sc.items()}
    assert fwd["noisy"] == pytest.approx(fwd["plain"], rel=0.015)


def test_overlapping_pairs_each_forward_with_the_one_beside_it():
    """In a pipeline rank 1's k-th forward runs beside rank 0's (k+1)-th: concurrent forwards are paired
    by time, not by index (pairing by index read a correlation of 0.12-0.21 where concurrent forwards
    have 0.32-0.38 on this host)."""
    from spdsim.jitter import overlapping
    rank0 = [(10 * k, 10 * k + 9) for k in range(5)]
    rank1 = [(10 * k + 10, 10 * k + 18) for k in range(4)]      # one tick behind
    assert overlapping([rank0, rank1]) == [(0, k + 1, 1, k) for k in range(4)]
    assert overlapping([rank0, [(100, 105)]]) == []             # nothing beside it
    # and the estimator reads the correlation of the paired forwards
    rng = np.random.default_rng(1)
    shared = rng.standard_normal(400)
    x0 = 1 + 0.1 * (0.8 * shared + 0.6 * rng.standard_normal(400))
    x1 = 1 + 0.1 * (0.8 * np.roll(shared, -1) + 0.6 * rng.standard_normal(400))   # x1[k] beside x0[k+1]
    pairs = [(0, k + 1, 1, k) for k in range(399)]
    assert estimate([[x0, x1]], [pairs]).cross == pytest.approx(0.64, abs=0.1)
    assert estimate([[x0, x1]]).cross < 0.2


def test_calibrate_fits_the_drawn_spread_to_the_runs_idle_time(tmp_path):
    """calibrate scales the traced forward spread so that the simulated SPD runs idle as much as the traced
    ones (on shared cores the traced spread overstated the wait for the slower rank). Runs the simulator
    made with a known spread: the fit finds the factor that made them, and leaves regimes without runs."""
    from spdsim.replay import _replay, _replay_scenario, fit_jitter_scale
    from spdsim.trace import Trace, TraceHeader
    costs, _, _ = calibrate(make_trace_dir(tmp_path))          # synthetic: no spread of their own
    base = _replay_scenario({"layers": 8, "dim": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "vocab": 256}, 2)
    traced = Jitter(0.16, 0.5, 0.3)
    accepts = [int(k % 5 != 0) for k in range(300)]
    runs = []
    for i in range(6):
        h = TraceHeader("spd", 2, 80, source="simulator", partition=[[0, 4], [4, 8]], placement=["gpu0", "gpu1"],
                        prompt_tokens=20, extra={"draft": "oracle:0.8", "accepts": accepts})
        made = dataclasses.replace(costs, jitter_by={"overlapped": Jitter(0.16 * 0.6, 0.5, 0.3)})
        runs.append(Trace(h, _replay(base, Trace(h, []), made, seed=i, keep_events=True).events))
    with_spread = dataclasses.replace(costs, jitter_by={"overlapped": traced, "serial": traced})
    assert fit_jitter_scale(base, runs, with_spread, "overlapped") == pytest.approx(0.6, abs=0.08)
    assert fit_jitter_scale(base, runs, with_spread, "drafting") is None        # no runs with a module
    assert fit_jitter_scale(base, runs, with_spread, "serial") is None          # no PP runs
