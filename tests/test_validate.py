"""executor profile / validate: structure of what they write, which points they run, and that an obviously
wrong calibration is caught. Timing accuracy is not asserted here (a shared CPU); a small random model
and a few tokens keep this file fast."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from executor.profile import CALIBRATION_PROMPT
from executor.validate import (COLUMNS, MIN_ROUNDS, VALIDATION_PROMPT, Case, at_host_speed, compare, failures,
                               interleave, more_repeats, neighbour_speed, neighbours, runnable_cases, summary)
from spdsim.scenario import parse_scenario
from executor_helpers import small_model

SMALL = """
name: small-cpu
hardware:
  gpu: {name: cpu-core, mem_gb: 4, hbm_gbps: 20, bf16_tflops: 0.1}
  count: 4
  topology: {kind: full, latency_us: 30, gbps: 0.5}
model: {name: small, layers: 8, hidden: 64, ffn: 128, heads: 4, kv_heads: 2, vocab: 256, dtype_bytes: 4}
workload: {prompt_tokens: 32, new_tokens: 6}
head: {features: false}
sweep: {stages: STAGES, partition: PARTS, acceptance: [0.5, 1.0], schemes: [ar, pp, spd]}
"""


def scenario_file(tmp_path: Path, stages="[1, 2]", parts="[uniform]", calibration: Path | None = None) -> Path:
    text = SMALL.replace("STAGES", stages).replace("PARTS", parts)
    if calibration:
        text += f"calibration: {calibration}\n"
    p = tmp_path / "small.yaml"
    p.write_text(text)
    return p


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "executor.cli", *args], capture_output=True, text=True, timeout=600)


def test_prompts_differ():
    """Honesty rule: the calibration runs never decode the validation prompt."""
    assert CALIBRATION_PROMPT != VALIDATION_PROMPT
    assert not VALIDATION_PROMPT.startswith(CALIBRATION_PROMPT[:16])


def test_runnable_cases_skip_what_this_machine_cannot_run(tmp_path):
    sc = parse_scenario(scenario_file(tmp_path, "[1, 2, 4]", "[uniform, compute_balanced]").read_text())
    cases, notes = runnable_cases(sc, max_stages=2, head=None)
    assert all(c.stages <= 2 for c in cases)
    assert any("oversubscribed" in n for n in notes) and any("compute_balanced" in n for n in notes)
    assert Case("spd", 2, "oracle:1", "1") in cases and Case("pp", 2, None, "") in cases
    assert len(cases) == len(set(cases))
    # one rank: ar, pp and spd are the same decode in the executor, measured once
    assert [c for c in cases if c.stages == 1] == [Case("ar", 1, None, "")]
    assert any("same one-rank decode" in n for n in notes)
    with_head, _ = runnable_cases(sc, max_stages=2, head="h.safetensors")
    assert Case("spd", 2, "head:h.safetensors", "head") in with_head


def test_compare_and_tolerances():
    pp, spd = Case("pp", 2, None, ""), Case("spd", 2, "oracle:0.8", "0.8")
    measured = {pp: [{"tokens_per_s": 10.0, "bubble_ratio": 0.5}] * 9,
                spd: [{"tokens_per_s": 15.0, "bubble_ratio": 0.20}, {"tokens_per_s": 16.0, "bubble_ratio": 0.22},
                      {"tokens_per_s": 30.0, "bubble_ratio": 0.24}] * 3}
    predicted = {pp: [{"tokens_per_s": 10.2, "bubble_ratio": 0.51}] * 9,
                 spd: [{"tokens_per_s": 18.0, "bubble_ratio": 0.21}] * 9}
    rows = compare([pp, spd], measured, predicted)
    assert {tuple(r) for r in rows} == {tuple(COLUMNS)}
    by = {(r["scheme"], r["metric"]): r for r in rows}
    through = 3 / (1 / 15 + 1 / 16 + 1 / 30)          # total tokens over total time, not the median (16)
    assert by[("spd", "tokens_per_s")]["measured"] == pytest.approx(through)
    assert by[("spd", "speedup_vs_pp")]["measured"] == pytest.approx(through / 10.0)   # over PP's, same rounds
    assert by[("spd", "speedup_vs_pp")]["measured_spread"] == pytest.approx(100 * (3.0 - 1.5) / 2 / (through / 10))
    assert by[("spd", "speedup_vs_pp")]["predicted"] == pytest.approx(18.0 / 10.2)
    assert by[("spd", "bubble_ratio")]["measured"] == pytest.approx(0.22)    # the mean
    assert by[("spd", "bubble_ratio")]["error_pct"] == pytest.approx(-1.0)   # points, absolute
    # −2.5% off, but every third repeat ran at 30 tok/s: the error's interval spans the tolerance
    assert by[("spd", "tokens_per_s")]["verdict"] == "undetermined"
    assert by[("spd", "tokens_per_s")]["error_ci_low"] < -5 < 5 < by[("spd", "tokens_per_s")]["error_ci_high"]
    assert by[("pp", "tokens_per_s")]["verdict"] == "pass"                   # +2%, no spread
    assert failures(rows, tolerance=0.05, bubble_tolerance=0.03) == []
    assert summary(rows)["tokens_per_s"]["max_abs"] == pytest.approx(100 * (1 - 18.0 / through))
    # the same errors measured quietly (every repeat alike) are decided: the worst failure first
    quiet = {pp: measured[pp], spd: [{"tokens_per_s": 16.0, "bubble_ratio": 0.22}] * 9}
    assert all(r["verdict"] == "undetermined" for r in compare([pp, spd], {c: v[:7] for c, v in quiet.items()},
                                                               {c: v[:7] for c, v in predicted.items()}))
    bad = failures(compare([pp, spd], quiet, predicted), tolerance=0.05, bubble_tolerance=0.03)
    assert [(r["scheme"], r["metric"]) for r in bad][:2] == [("spd", "tokens_per_s"), ("spd", "speedup_vs_pp")]


def test_speedup_is_paired_by_round():
    """A machine that slows down between rounds moves both cases of a round: the paired ratio does not."""
    pp, spd = Case("pp", 2, None, ""), Case("spd", 2, "oracle:0.8", "0.8")
    slow = [1.0, 0.6, 0.8]
    measured = {pp: [{"tokens_per_s": 10.0 * f, "bubble_ratio": 0.5} for f in slow],
                spd: [{"tokens_per_s": 14.0 * f, "bubble_ratio": 0.2} for f in slow]}
    predicted = {c: [{"tokens_per_s": 1.0, "bubble_ratio": 0.0}] * 3 for c in (pp, spd)}
    by = {(r["scheme"], r["metric"]): r for r in compare([pp, spd], measured, predicted)}
    assert by[("spd", "speedup_vs_pp")]["measured"] == pytest.approx(1.4)
    assert by[("spd", "speedup_vs_pp")]["measured_spread"] == pytest.approx(0.0)
    assert by[("spd", "tokens_per_s")]["measured_spread"] > 10     # each case alone does move


def test_calibration_decodes_are_spread_among_the_measured_ones():
    cal = [("calib", f"c{j}") for j in range(3)]
    cases = [("case", f"k{j}") for j in range(6)]
    order = interleave(cal, cases)
    assert [w for _, w in order] == ["c0", "k0", "k1", "c1", "k2", "k3", "c2", "k4", "k5"]
    assert interleave([], cases) == cases and [w for _, w in interleave(cal[:1], cases[:1])] == ["c0", "k0"]
    kinds = [("warmup", None)] + order + interleave(cal, cases)          # two repeats in one launch
    by_job = {w: neighbours(kinds, j) for j, (kind, w) in enumerate(kinds) if kind == "case" and j < 10}
    assert by_job == {"k0": ["c0", "c1"], "k1": ["c0", "c1"], "k2": ["c1", "c2"], "k3": ["c1", "c2"],
                      "k4": ["c2", "c0"], "k5": ["c2", "c0"]}
    assert neighbours([("case", "k")], 0) == []                          # a given calibration: none


def test_a_host_that_changes_speed_is_predicted_at_its_neighbours_speed():
    """Every other decode ran on a host twice as slow; the calibration decodes next to each one saw the
    same: predicted at their speed the error is decided (it passes), with one calibration speed for all
    the error is the same on average but undetermined."""
    ar = Case("ar", 1, None, "")
    slow = [1.0, 0.5] * 6
    measured = {ar: [{"tokens_per_s": 100.0 * f, "bubble_ratio": 0.0, "calibration_neighbours": [f"c{i}"]}
                     for i, f in enumerate(slow)]}
    speeds = {f"c{i}": f / (2 / 3) for i, f in enumerate(slow)}       # relative to the mean-cost speed
    base = [{"tokens_per_s": 100.0 * 2 / 3, "bubble_ratio": 0.0}] * len(slow)   # N / mean time
    tracked = [at_host_speed(p, neighbour_speed(r, speeds)) for p, r in zip(base, measured[ar])]
    assert [p["tokens_per_s"] for p in tracked] == pytest.approx([100.0 * f for f in slow])
    assert neighbour_speed({"calibration_neighbours": ["c0", "c1"]}, speeds) == pytest.approx(1.0)   # 1.5, 0.75
    assert neighbour_speed({}, speeds) == 1.0
    by = {r["metric"]: r for r in compare([ar], measured, {ar: tracked})}
    assert by["tokens_per_s"]["error_pct"] == pytest.approx(0.0) and by["tokens_per_s"]["verdict"] == "pass"
    by = {r["metric"]: r for r in compare([ar], measured, {ar: base})}
    assert by["tokens_per_s"]["error_pct"] == pytest.approx(0.0, abs=1e-9)     # throughput: the level is right
    assert by["tokens_per_s"]["verdict"] == "undetermined"


def test_validate_rejects_a_model_that_is_not_the_scenarios(tmp_path):
    ckpt = small_model(tmp_path, layers=4)
    r = run_cli("validate", str(scenario_file(tmp_path)), "--model", str(ckpt), "--out", str(tmp_path / "v"))
    assert r.returncode == 2 and "4 layers" in r.stderr and "Traceback" not in r.stderr


def wrong_calibration(path: Path) -> Path:
    """50 ms per layer and nothing else: ~100× slower than a small model on any CPU."""
    path.write_text(yaml.safe_dump({"kind": "spdsim-calibration", "version": 1, "layer": {"a_ms": 50.0},
                                    "embed_ms": 0, "lm_head_ms": 0, "head_ms": {"oracle": 0},
                                    "link": {"latency_us": 30, "gbps": 1.0}}))
    return path


def test_validate_catches_an_obviously_wrong_calibration(tmp_path):
    ckpt = small_model(tmp_path)
    scen = scenario_file(tmp_path, calibration=wrong_calibration(tmp_path / "wrong.yaml"))
    out = tmp_path / "val"
    r = run_cli("validate", str(scen), "--model", str(ckpt), "--out", str(out), "--repeats", "8",
                "--max-minutes", "0", "--new-tokens", "12")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "worst" in r.stderr and "tokens_per_s" in r.stderr
    rows = list(csv.DictReader(open(out / "validation.csv")))
    assert rows and list(rows[0]) == COLUMNS
    got = {(r["scheme"], r["stages"], r["acceptance"], r["metric"]) for r in rows}
    for metric in ("tokens_per_s", "speedup_vs_pp", "bubble_ratio"):
        assert ("spd", "2", "1", metric) in got and ("pp", "2", "", metric) in got
    tps = [r for r in rows if r["metric"] == "tokens_per_s"]
    assert all(float(r["error_pct"]) < -80 for r in tps)       # predicted far slower than measured
    assert (out / "parity.png").stat().st_size > 0
    meas = json.loads((out / "measured.json").read_text())
    spd = next(c for c in meas["cases"] if c["scheme"] == "spd" and c["stages"] == 2)
    m, p = spd["measured"][0], spd["predicted"][0]
    assert spd["acceptance"] == "0.5" and m["rejected"] > 0 and m["accepted"] > 0   # a mixed sequence to replay
    assert (p["accepted"], p["rejected"]) == (m["accepted"], m["rejected"])   # the replayed verdicts
    assert "median |error|" in r.stdout and "load average" in r.stdout
    assert all(r["verdict"] == "fail" for r in tps)                 # −80% whatever the spread
    assert "round 1: 8 repeats per point" in r.stdout and "verdict: fail" in r.stdout


def test_profile_writes_microbenchmarks_and_run_traces(tmp_path):
    from spdsim.calibrate import calibrate
    from spdsim.trace import read_trace
    ckpt = small_model(tmp_path)
    out = tmp_path / "prof"
    r = run_cli("profile", "--model", str(ckpt), "--stages", "2", "--out", str(out), "--repeats", "2",
                "--contexts", "1,32,256", "--new-tokens", "4", "--alphas", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    prof = json.loads((out / "profile.json").read_text())
    assert {(x["layer"], x["ctx"]) for x in prof["layers"]} == {(i, c) for i in range(8) for c in (1, 32, 256)}
    assert all(x["median_s"] > 0 for x in prof["layers"]) and prof["embed_s"] > 0 and prof["lm_head_s"] > 0
    assert len(prof["link"]) >= 3 and all(x["one_way_s"] > 0 for x in prof["link"])
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["ar-n1", "pp-n2", "spd-n2-a1"]
    tr = read_trace(out / "runs" / "spd-n2-a1")
    assert tr.header.prompt_tokens == len(CALIBRATION_PROMPT.encode())
    assert any(e.kind == "head" for e in tr.events) and any(e.kind == "send" for e in tr.events)
    costs, err, lines = calibrate(out)
    assert costs.layer_a_s > 0 and costs.link_bandwidth > 0 and costs.tick_overhead_s > 0
    assert {"layer", "link", "compute", "prefill"} <= set(err)
    # serving's prompt chunks: measured against their length, fitted, longer chunks cost more
    assert [x["tokens"] for x in prof["prefill"]] == [4, 16, 64] and all(x["median_s"] > 0 for x in prof["prefill"])
    assert costs.prefill_s(0, 0, 4, 64, 0, True, False) > costs.prefill_s(0, 0, 4, 4, 0, True, False) > 0


def test_validate_says_undetermined_when_too_few_repeats_were_allowed(tmp_path):
    """Two repeats and no time for another round: too few for an interval, so no verdict — exit 3, and how
    long more would take."""
    ckpt = small_model(tmp_path)
    scen = scenario_file(tmp_path, stages="[1]", calibration=wrong_calibration(tmp_path / "wrong.yaml"))
    out = tmp_path / "val"
    r = run_cli("validate", str(scen), "--model", str(ckpt), "--out", str(out), "--repeats", "2",
                "--max-minutes", "0", "--new-tokens", "8")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "undetermined" in r.stderr and "more minutes" in r.stderr and "Traceback" not in r.stderr
    rows = list(csv.DictReader(open(out / "validation.csv")))
    assert rows and all(x["verdict"] == "undetermined" for x in rows)


def test_own_calibration_predicts_each_decode_at_its_neighbours_host_speed(tmp_path):
    """End to end with an own calibration: every measured decode names the calibration runs on either
    side of it, those runs exist, and its prediction is the one-speed prediction times their speed."""
    from executor.validate import predict
    from spdsim.calibration_file import load_calibration
    from spdsim.replay import host_speed
    from spdsim.scenario import load_scenario
    ckpt = small_model(tmp_path)
    scen = scenario_file(tmp_path, stages="[2]")
    out = tmp_path / "val"
    r = run_cli("validate", str(scen), "--model", str(ckpt), "--out", str(out), "--repeats", "2",
                "--max-minutes", "0", "--new-tokens", "6")
    assert r.returncode in (0, 1, 3), r.stderr[-2000:]
    meas = json.loads((out / "measured.json").read_text())
    speeds = host_speed(out / "profile", load_calibration(out / "calibration.yaml"))
    assert meas["rounds"] == MIN_ROUNDS                  # --max-minutes 0: the fewest rounds that decide
    repeats = {c["stages"]: len(c["measured"]) for c in meas["cases"]}     # a cheap launch gets more a round
    assert set(speeds) == ({f"ar-n1-r{i}" for i in range(repeats[1])}
                           | {f"{k}-r{i}" for k in ("pp-n2", "spd-n2-a0.6") for i in range(repeats[2])})
    assert all(0.2 < v < 5 for v in speeds.values()), speeds
    sc = load_scenario(scen)
    for c in meas["cases"]:
        case = Case(c["scheme"], c["stages"], c["draft"], c["acceptance"], c["tp"])
        for i, (m, p) in enumerate(zip(c["measured"], c["predicted"])):
            assert 1 <= len(m["calibration_neighbours"]) <= 2 and set(m["calibration_neighbours"]) <= set(speeds)
            one = predict(sc, case, out / "calibration.yaml", m["prompt_tokens"], 6, m["accepts"], seed=i)
            assert p["tokens_per_s"] == pytest.approx(one["tokens_per_s"] * neighbour_speed(m, speeds))
            assert p["bubble_ratio"] == pytest.approx(one["bubble_ratio"])


def test_tp_points_run_where_the_ranks_fit_the_cores(tmp_path):
    text = SMALL.replace("STAGES", "[1, 2], tp: [1, 2]").replace("PARTS", "[uniform]")
    p = tmp_path / "tp.yaml"
    p.write_text(text)
    from spdsim.scenario import load_scenario
    sc = load_scenario(p)
    cases, notes = runnable_cases(sc, max_stages=2, head=None)
    assert Case("ar", 1, None, "", 2) in cases                       # TP 2 on one stage: 2 ranks
    assert not [c for c in cases if c.tp == 2 and c.stages == 2]     # 4 ranks on 2 cores: oversubscribed
    assert any("tp 2" in n and "oversubscribed" in n for n in notes)
    assert Case("ar", 1, None, "", 2).label == "ar n=1 tp=2"


SERVING = """
name: small-serving
hardware:
  gpu: {name: cpu-core, mem_gb: 4, hbm_gbps: 20, bf16_tflops: 0.1}
  count: 4
  topology: {kind: full, latency_us: 30, gbps: 0.5}
model: {name: small, layers: 8, hidden: 64, ffn: 128, heads: 4, kv_heads: 2, vocab: 256, dtype_bytes: 4}
workload: {prompt_tokens: 48, new_tokens: 6, requests: 3, arrivals: {kind: poisson, rate_per_s: [5, 50]}}
serving: {policy: [fcfs, interleave, adaptive]}
head: {features: false}
sweep: {stages: [2], partition: [uniform], acceptance: [0.5], schemes: [pp, spd]}
"""


def test_serving_cases_are_each_point_at_each_concurrency():
    sc = parse_scenario(SERVING)
    cases, notes = runnable_cases(sc, max_stages=2, head=None, concurrency=(2, 3))
    assert all(c.serving and c.stages == 2 for c in cases) and len(cases) == len(set(cases))
    assert Case("spd", 2, "oracle:0.5", "0.5", policy="interleave", concurrency=3, rate=50.0) in cases
    assert Case("pp", 2, None, "", policy="interleave", concurrency=2, rate=5.0) in cases
    assert {c.concurrency for c in cases if c.policy == "fcfs"} == {1}          # one request at a time
    assert not any(c.policy == "adaptive" for c in cases) and any("adaptive" in n for n in notes)
    with_head, _ = runnable_cases(sc, max_stages=2, head="h.safetensors", concurrency=(2,))
    assert Case("spd", 2, "head:h.safetensors", "head", policy="adaptive", concurrency=2, rate=5.0) in with_head


def test_serving_rows_compare_throughput_tpot_and_bubble():
    c = Case("spd", 2, "oracle:0.5", "0.5", policy="interleave", concurrency=2, rate=5.0)
    meas = [{"tokens_per_s": 100.0 + i, "tpot_p50_ms": 5.0, "tpot_p90_ms": 6.0, "bubble_ratio": 0.3} for i in range(9)]
    pred = [{"tokens_per_s": 100.0, "tpot_p50_ms": 10.0, "tpot_p90_ms": 6.0, "bubble_ratio": 0.3}] * 9
    rows = {r["metric"]: r for r in compare([c], {c: meas}, {c: pred})}
    assert set(rows) == {"tokens_per_s", "tpot_p50_ms", "tpot_p90_ms", "bubble_ratio"}
    assert rows["tpot_p50_ms"]["error_pct"] == pytest.approx(100.0) and rows["tpot_p50_ms"]["verdict"] == "fail"
    assert rows["tpot_p90_ms"]["verdict"] == "pass" and rows["bubble_ratio"]["verdict"] == "pass"
    assert all(r["policy"] == "interleave" and r["concurrency"] == 2 and r["rate_per_s"] == 5.0 for r in rows.values())


def test_validate_measures_and_predicts_serving_points(tmp_path):
    """End to end on a serving scenario: executor serving runs measured, replayed in the simulator with an
    own calibration (prefill included); two repeats decide nothing (exit 3), but every row is there."""
    ckpt = small_model(tmp_path)
    scen = tmp_path / "serving.yaml"
    scen.write_text(SERVING.replace("[fcfs, interleave, adaptive]", "[interleave]").replace("[5, 50]", "[50]"))
    out = tmp_path / "val"
    r = run_cli("validate", str(scen), "--model", str(ckpt), "--out", str(out), "--repeats", "2",
                "--max-minutes", "0", "--concurrency", "2")
    assert r.returncode == 3, r.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "validation.csv")))
    assert {(x["scheme"], x["metric"]) for x in rows} == {(s, m) for s in ("pp", "spd") for m in
                                                         ("tokens_per_s", "tpot_p50_ms", "tpot_p90_ms", "bubble_ratio")}
    assert all(x["policy"] == "interleave" and x["concurrency"] == "2" and float(x["predicted"]) > 0 for x in rows)
    meas = json.loads((out / "measured.json").read_text())
    spd = next(c for c in meas["cases"] if c["scheme"] == "spd")
    run = spd["measured"][0]
    assert len(run["requests"]) == 3 and run["matches_reference"]
    assert run["requests"][0]["prompt"] != CALIBRATION_PROMPT          # never the calibration prompt
    assert spd["measured"][0]["requests"][1]["arrival_s"] != spd["measured"][1]["requests"][1]["arrival_s"]
    assert "prefill" in (out / "calibration.yaml").read_text()


def test_only_launches_with_an_open_verdict_get_another_round():
    from executor.validate import open_launches, repeats_label
    rows = [{"stages": 1, "tp": 1, "verdict": "pass"}, {"stages": 1, "tp": 2, "verdict": "pass"},
            {"stages": 2, "tp": 1, "verdict": "pass"}, {"stages": 2, "tp": 1, "verdict": "undetermined"}]
    assert open_launches(rows) == {(2, 1): 1}
    assert open_launches(rows[:3]) == {}
    a, b = Case("ar", 1, None, ""), Case("pp", 2, None, "")
    assert repeats_label({a: [{}] * 8, b: [{}] * 8}) == "8" and repeats_label({a: [{}] * 8, b: [{}] * 24}) == "8-24"


def test_each_open_row_gets_about_the_same_measuring_time():
    from executor.validate import fit_in, round_repeats
    per = {(1, 1): 1.4, (1, 2): 4.4, (2, 1): 8.8}
    assert round_repeats({(1, 1): 1, (2, 1): 5}, 8, {}) == {(1, 1): 8, (2, 1): 8}   # first round: no timings
    # the two-rank launch has 5 open rows, AR and TP 2 one each: each row ~14 s of a 70 s round
    assert round_repeats({(1, 1): 1, (1, 2): 1, (2, 1): 5}, 8, per) == {(1, 1): 10, (1, 2): 8, (2, 1): 8}
    # AR left alone gets the round the two-rank points no longer need, up to 8 × 8
    assert round_repeats({(1, 1): 1}, 8, per) == {(1, 1): 50}
    assert round_repeats({(1, 1): 1}, 8, {(1, 1): 0.01, (2, 1): 9.0}) == {(1, 1): 64}
    # the last round is cut to the time left, or not run when too little is left
    assert fit_in({(1, 1): 10, (2, 1): 8}, per, 1000.0) == {(1, 1): 10, (2, 1): 8}
    assert fit_in({(1, 1): 10, (2, 1): 8}, per, 42.2) == {(1, 1): 5, (2, 1): 4}         # half the 84.4 s
    assert fit_in({(1, 1): 10, (2, 1): 8}, per, 10.0) == {}


def test_more_minutes_are_summed_over_the_launches_that_need_them():
    from executor.validate import more_repeats
    row = lambda n, tp, err, lo, hi, k: {"stages": n, "tp": tp, "metric": "tokens_per_s", "error_pct": err,  # noqa: E731
                                         "error_ci_low": lo, "error_ci_high": hi, "repeats": k,
                                         "verdict": "undetermined"}
    need = more_repeats([row(1, 1, 3.0, -1.0, 7.0, 100), row(2, 1, 1.0, -5.0, 7.0, 16)], 0.05, 0.03)
    assert need == {(1, 1): 300, (2, 1): 20}     # ±4 against a 2-point gap: 4× the 100; ±6 against 4: 2.25× 16
    assert more_repeats([row(1, 1, 5.0, 0.0, 10.0, 16)], 0.05, 0.03) is None   # on the tolerance


def _rounds(offsets: list[float], per_round: int = 8, noise: float = 0.002, seed: int = 0) -> list[dict]:
    """Measured AR decodes of rounds whose host sat at `offsets` (relative) from the prediction of 100
    tok/s, with a little noise within each round."""
    rng = np.random.default_rng(seed)
    return [{"tokens_per_s": 100.0 * (1 + off) * (1 + noise * rng.standard_normal()), "bubble_ratio": 0.01,
             "round": k} for k, off in enumerate(offsets) for _ in range(per_round)]


def test_rounds_that_disagree_leave_the_point_undetermined_where_repeats_alone_would_pass():
    """Three rounds at −6%, 0, +6%: taken as 24 independent repeats the error's interval is narrow around
    0 (pass); resampled by round it spans the rounds' spread (undetermined)."""
    c = Case("ar", 1, None, "")
    meas = _rounds([-0.06, 0.0, 0.06])
    pred = [{"tokens_per_s": 100.0, "bubble_ratio": 0.01}] * len(meas)
    by_round = {r["metric"]: r for r in compare([c], {c: meas}, {c: pred})}["tokens_per_s"]
    untagged = [{k: v for k, v in m.items() if k != "round"} for m in meas]
    by_repeat = {r["metric"]: r for r in compare([c], {c: untagged}, {c: pred})}["tokens_per_s"]
    assert by_repeat["verdict"] == "pass" and by_repeat["rounds"] == len(meas)
    assert by_round["verdict"] == "undetermined" and by_round["rounds"] == 3
    assert by_round["error_ci_high"] - by_round["error_ci_low"] > 3 * (by_repeat["error_ci_high"] - by_repeat["error_ci_low"])


def test_no_verdict_before_the_third_round_and_more_rounds_asked_for():
    """A calibration 20% off, measured steadily: two rounds decide nothing, three fail it."""
    c = Case("ar", 1, None, "")
    for k, want in ((1, "undetermined"), (2, "undetermined"), (MIN_ROUNDS, "fail")):
        meas = _rounds([0.2] * k)
        pred = [{"tokens_per_s": 100.0, "bubble_ratio": 0.01}] * len(meas)
        rows = compare([c], {c: meas}, {c: pred})
        assert {r["metric"]: r["verdict"] for r in rows}["tokens_per_s"] == want, k
        if k < MIN_ROUNDS:      # as many repeats again per missing round
            assert more_repeats(rows, 0.05, 0.03)[(1, 1)] == 8 * (MIN_ROUNDS - k)
