"""spdsim calibrate: recovers known costs from synthetic executor-like traces, and a calibrated scenario
predicts the timeline those traces came from. No torch here (spdsim must not need it)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spdsim.calibrate import calibrate
from spdsim.calibration_file import CalibratedCosts, load_calibration, write_calibration
from spdsim.cost_choice import cost_model
from spdsim.engine import simulate_point
from spdsim.errors import UserError
from spdsim.metrics import run_metrics
from spdsim.scenario import Point, parse_scenario
from spdsim.trace import TraceEvent, TraceHeader, read_trace, write_trace

# ground truth of the synthetic "executor"
A, B = 1.0e-3, 2.0e-6            # per layer: a + b·ctx
EMBED, LM_HEAD = 1.0e-5, 5.0e-5
KAPPA = 1.5                      # runs compute this much slower than the microbenchmarks
TICK, MSG = 0.4e-3, 0.3e-3       # host time per tick, per message beyond the link
LAT, BW = 50e-6, 1.0e8           # link
ACT_BYTES, RESULT_BYTES = 256, 16
P, N = 20, 12
NS = 1e9


def stage_s(layers: int, ctx: int, first: bool, last: bool, kappa: float = KAPPA) -> float:
    return kappa * (layers * (A + B * ctx) + (EMBED if first else 0) + (LM_HEAD if last else 0))


def ar_trace(kappa: float = KAPPA) -> tuple[TraceHeader, list[TraceEvent]]:
    ev, t = [], 0.0
    for k in range(N):
        q = P - 1 + k
        d = stage_s(8, q + 1, True, True, kappa)
        ev.append(TraceEvent("compute", int(t * NS), int((t + d) * NS), stage=0, device="rank0", position=q))
        ev.append(TraceEvent("commit", int((t + d) * NS), int((t + d) * NS), device="rank0", position=q + 1))
        t += d + TICK
    return TraceHeader("ar", 1, N, source="executor", partition=[[0, 8]], placement=["rank0"], prompt_tokens=P), ev


def pp_trace(kappa: float = KAPPA) -> tuple[TraceHeader, list[TraceEvent]]:
    """PP on two ranks: each message's send call takes 0.1 ms, delivery adds the link + MSG, the receiver
    spends TICK before its forward (AR shows the same TICK between forwards)."""
    ev, t = [], 0.0
    send = 0.1e-3
    for k in range(N):
        q = P - 1 + k
        d0 = stage_s(4, q + 1, True, False, kappa)
        ev.append(TraceEvent("compute", int(t * NS), int((t + d0) * NS), stage=0, device="rank0", position=q))
        s0 = t + d0
        ev.append(TraceEvent("send", int(s0 * NS), int((s0 + send) * NS), stage=0, device="rank0", position=q,
                             bytes=ACT_BYTES, name="act 0->1"))
        t1 = s0 + MSG + LAT + ACT_BYTES / BW + TICK
        d1 = stage_s(4, q + 1, False, True, kappa)
        ev.append(TraceEvent("compute", int(t1 * NS), int((t1 + d1) * NS), stage=1, device="rank1", position=q))
        s1 = t1 + d1
        ev.append(TraceEvent("send", int(s1 * NS), int((s1 + send) * NS), stage=1, device="rank1", position=q,
                             bytes=RESULT_BYTES, name="result 1->0"))
        arrive = s1 + MSG + LAT + RESULT_BYTES / BW
        ev.append(TraceEvent("commit", int(arrive * NS), int(arrive * NS), device="rank0", position=q + 1))
        t = arrive + TICK
    return (TraceHeader("pp", 2, N, source="executor", partition=[[0, 4], [4, 8]], placement=["rank0", "rank1"],
                        prompt_tokens=P), ev)


def make_trace_dir(root: Path, kappa_ar: float = KAPPA, kappa_pp: float = KAPPA) -> Path:
    d = root / "prof"
    layers = [{"layer": i, "ctx": c, "median_s": A + B * c, "samples_s": [A + B * c]}
              for c in (1, 64, 256) for i in range(8)]
    link = [{"src": "rank0", "dst": "rank1", "bytes": b, "send_s": 1e-5, "one_way_s": LAT + b / BW}
            for b in (72, 1096, 65608)]
    d.mkdir(parents=True)
    (d / "profile.json").write_text(json.dumps({"layers": layers, "contexts": [1, 64, 256], "embed_s": EMBED,
                                                "lm_head_s": LM_HEAD, "link": link, "device": "cpu"}))
    for name, (h, ev) in (("ar-n1", ar_trace(kappa_ar)), ("pp-n2", pp_trace(kappa_pp))):
        for r in range(h.stages):
            write_trace(d / "runs" / name / f"rank{r}.jsonl", h, [e for e in ev if e.device == f"rank{r}"])
    return d


SCENARIO = """
name: synth
hardware: {gpu: {name: cpu-core, mem_gb: 4, hbm_gbps: 20, bf16_tflops: 0.1}, count: 2,
           topology: {kind: full, latency_us: 30, gbps: 0.5}}
model: {name: small, layers: 8, hidden: 64, ffn: 128, heads: 4, kv_heads: 2, vocab: 256, dtype_bytes: 4}
workload: {prompt_tokens: %d, new_tokens: %d}
head: {features: false}
sweep: {stages: [1, 2], partition: [uniform], acceptance: [1.0], schemes: [ar, pp, spd]}
calibration: %s
""" % (P, N, "CALIB")


def scenario_text(calib) -> str:
    return SCENARIO.replace("CALIB", str(calib))


def test_calibrate_recovers_the_costs_that_made_the_traces(tmp_path):
    costs, err, lines = calibrate(make_trace_dir(tmp_path))
    assert costs.layer_a_s == pytest.approx(KAPPA * A, rel=1e-3)
    assert costs.layer_b_s == pytest.approx(KAPPA * B, rel=1e-3)
    assert costs.lm_head_s() == pytest.approx(KAPPA * LM_HEAD, rel=1e-3)
    assert costs.contention == pytest.approx(KAPPA, rel=1e-3)
    assert costs.link_latency_s == pytest.approx(LAT, rel=1e-3)
    assert costs.link_bandwidth == pytest.approx(BW, rel=1e-3)
    assert costs.tick_overhead_s == pytest.approx(TICK, rel=1e-2)
    assert costs.msg_overhead_s == pytest.approx(MSG, rel=2e-2)
    assert err["layer"] < 0.1 and err["compute"] < 0.1          # exact synthetic data: (near) zero error
    assert any(line.startswith("tick") for line in lines) and any(line.startswith("message") for line in lines)


def test_calibrated_scenario_predicts_the_synthetic_timeline(tmp_path):
    d = make_trace_dir(tmp_path)
    costs, err, _ = calibrate(d)
    calib = write_calibration(tmp_path / "calib.yaml", costs, err)
    sc = parse_scenario(scenario_text(calib))
    assert isinstance(cost_model(sc), CalibratedCosts)
    for name, scheme, n in (("ar-n1", "ar", 1), ("pp-n2", "pp", 2)):
        tr = read_trace(d / "runs" / name)
        measured = run_metrics(tr.events, scheme, n, N, tr.header.placement)
        predicted = simulate_point(sc, Point(scheme, n, "uniform", None)).metrics
        assert predicted.tokens_per_s == pytest.approx(measured.tokens_per_s, rel=0.01), name
        assert predicted.bubble_ratio == pytest.approx(measured.bubble_ratio, abs=0.01), name
    # and the roofline (no calibration) is nowhere near this "hardware"
    roof = parse_scenario(scenario_text("null"))
    assert simulate_point(roof, Point("pp", 2, "uniform", None)).metrics.tokens_per_s > 2 * measured.tokens_per_s


def test_overheads_matter_a_calibration_without_them_is_off(tmp_path):
    d = make_trace_dir(tmp_path)
    costs, err, _ = calibrate(d)
    costs.tick_overhead_s = costs.msg_overhead_s = 0.0
    calib = write_calibration(tmp_path / "no_overheads.yaml", costs, err)
    sc = parse_scenario(scenario_text(calib))
    tr = read_trace(d / "runs" / "pp-n2")
    measured = run_metrics(tr.events, "pp", 2, N, tr.header.placement)
    predicted = simulate_point(sc, Point("pp", 2, "uniform", None)).metrics
    assert predicted.tokens_per_s > 1.05 * measured.tokens_per_s


def test_calibration_file_round_trip_and_relative_path(tmp_path):
    costs, err, _ = calibrate(make_trace_dir(tmp_path))
    write_calibration(tmp_path / "c.yaml", costs, err)
    again = load_calibration(tmp_path / "c.yaml")
    for f in ("layer_a_s", "layer_b_s", "tick_overhead_s", "msg_overhead_s", "link_latency_s", "link_bandwidth"):
        assert getattr(again, f) == pytest.approx(getattr(costs, f), rel=1e-9)
    scen = tmp_path / "s.yaml"
    scen.write_text(scenario_text("c.yaml"))          # relative to the scenario's directory
    from spdsim.scenario import load_scenario
    assert cost_model(load_scenario(scen)).tick_overhead_s == pytest.approx(TICK, rel=1e-2)


def test_bad_calibration_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        load_calibration(tmp_path / "missing.yaml")
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({"layer": {"a_ms": 1}}))
    with pytest.raises(UserError, match="not a `spdsim calibrate` file"):
        load_calibration(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text(yaml.safe_dump({"kind": "spdsim-calibration", "layer": {"a_ms": 1}}))
    with pytest.raises(UserError, match="malformed"):
        load_calibration(tmp_path / "y.yaml")


def test_calibrate_cli(tmp_path):
    d = make_trace_dir(tmp_path)
    r = subprocess.run([sys.executable, "-m", "spdsim.cli", "calibrate", str(d), "--out", str(tmp_path / "o.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fit error" in r.stdout and (tmp_path / "o.yaml").exists()
    r = subprocess.run([sys.executable, "-m", "spdsim.cli", "calibrate", str(tmp_path), "--out", str(tmp_path / "p.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "profile.json" in r.stderr and "Traceback" not in r.stderr


def test_calibrate_does_not_import_torch():
    code = "import sys, spdsim.calibrate, spdsim.scenario; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_send_block_delays_spd_issues_but_hides_under_pp(tmp_path):
    """The first rank's blocking send: under PP it overlaps the wait for the result, under SPD it delays
    the next issue."""
    costs, err, _ = calibrate(make_trace_dir(tmp_path))
    fast = write_calibration(tmp_path / "fast.yaml", costs, err)
    costs.send_block_s = 2e-3          # < the PP round trip (≈ 12 ms here)
    slow = write_calibration(tmp_path / "slow.yaml", costs, err)
    from spdsim.acceptance import iid
    tps = {}
    for name, calib in (("fast", fast), ("slow", slow)):
        sc = parse_scenario(scenario_text(calib))
        tps[name, "pp"] = simulate_point(sc, Point("pp", 2, "uniform", None)).metrics.tokens_per_s
        tps[name, "spd"] = simulate_point(sc, Point("spd", 2, "uniform", iid(1.0))).metrics.tokens_per_s
    assert tps["slow", "pp"] == pytest.approx(tps["fast", "pp"], rel=1e-3)
    assert tps["slow", "spd"] < 0.95 * tps["fast", "spd"]


def test_compute_regimes_one_rank_versus_a_pipeline(tmp_path):
    """Forwards that run slower in the pipeline than alone (shared cores) get a factor per regime, and
    each simulated point uses its own."""
    d = make_trace_dir(tmp_path, kappa_ar=1.0, kappa_pp=2.0)
    costs, err, _ = calibrate(d)
    assert costs.contention_by["serial"] / costs.contention_by["single"] == pytest.approx(2.0, rel=1e-3)
    calib = write_calibration(tmp_path / "c.yaml", costs, err)
    sc = parse_scenario(scenario_text(calib))
    for name, scheme, n in (("ar-n1", "ar", 1), ("pp-n2", "pp", 2)):
        tr = read_trace(d / "runs" / name)
        measured = run_metrics(tr.events, scheme, n, N, tr.header.placement)
        predicted = simulate_point(sc, Point(scheme, n, "uniform", None)).metrics
        assert predicted.tokens_per_s == pytest.approx(measured.tokens_per_s, rel=0.01), name


def test_simulated_forwards_cost_the_calibrated_mean(tmp_path):
    """Without forward-to-forward variability (these synthetic traces have none, so the fitted jitter has
    sd 0) every simulated compute of a stage costs exactly its calibrated mean for its context (a quantile
    draw with a long tail once biased SPD predictions by ~9%; tests/test_jitter.py checks that the jitter
    drawn now keeps the mean). Old files with jitter quantiles load."""
    from spdsim.acceptance import iid
    costs, err, _ = calibrate(make_trace_dir(tmp_path))
    calib = write_calibration(tmp_path / "c.yaml", costs, err)
    sc = parse_scenario(scenario_text(calib))
    r = simulate_point(sc, Point("spd", 2, "uniform", iid(1.0)), keep_events=True)
    point_costs = load_calibration(calib).for_point("spd", 2)
    layers = sc.model.layers
    checked = 0
    for e in r.events:
        if e.kind == "compute" and e.phase == "decode":
            first, last = e.stage == 0, e.stage == 1
            lo, hi = (0, layers // 2) if first else (layers // 2, layers)
            want = point_costs.stage_s(e.stage, lo, hi, e.position + 1, first, last)
            assert (e.end_ns - e.start_ns) * 1e-9 == pytest.approx(want, rel=1e-6, abs=2e-9)
            checked += 1
    assert checked > 10
    old = yaml.safe_load(calib.read_text())
    old["jitter_quantiles"] = {"overlapped:first": [0.5 + i * 0.05 for i in range(21)]}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    again = simulate_point(parse_scenario(scenario_text(tmp_path / "old.yaml")), Point("spd", 2, "uniform", iid(1.0)))
    assert again.metrics.tokens_per_s == pytest.approx(r.metrics.tokens_per_s, rel=1e-9)


def test_in_sample_charges_the_trained_module_its_draft_time(tmp_path):
    """`spdsim calibrate`'s in-sample check predicts a head run with the module's calibrated draft time
    (it once planned no drafter, so head runs were predicted as free oracle drafts)."""
    from dataclasses import replace
    from spdsim.replay import in_sample
    d = make_trace_dir(tmp_path)
    prof = json.loads((d / "profile.json").read_text())
    prof["model"] = {"layers": 8, "dim": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "vocab": 256, "dtype_bytes": 4}
    (d / "profile.json").write_text(json.dumps(prof))
    h, ev = pp_trace()
    for draft in ("oracle:1", "head:module.safetensors"):
        spd = replace(h, scheme="spd", extra={"draft": draft, "accepts": [1] * N})
        for r in range(2):
            write_trace(d / "runs" / f"spd-n2-{draft[:4]}" / f"rank{r}.jsonl", spd,
                        [e for e in ev if e.device == f"rank{r}"])
    costs, err, _ = calibrate(d)
    costs = replace(costs, head_s_by_kind={"oracle": 1e-5, "head": 20e-3})
    calib = write_calibration(tmp_path / "calib.yaml", costs, err)
    pred = {line.split()[2].split(":")[0]: float(line.split("predicted ")[1].split()[0])
            for line in in_sample(d, calib) if line.startswith("in-sample spd")}
    assert set(pred) == {"oracle", "head"}
    assert pred["head"] < 0.5 * pred["oracle"]          # a 20 ms draft on the first rank dominates its tick


def test_concurrent_ns_equals_comparing_every_pair():
    """calibrate's overlap per forward (how long other ranks computed beside it), from sorted starts,
    equals the all-pairs sum it replaced, also for intervals of one device that overlap each other."""
    import random
    from spdsim.calibrate import concurrent_ns
    rng = random.Random(0)
    for trial in range(30):
        evs = []
        for d in range(rng.randint(1, 4)):
            t = rng.randint(0, 50)
            for _ in range(rng.randint(0, 25)):
                start = t + rng.randint(-30 if trial % 3 == 0 else 0, 20)    # every third trial: self-overlap
                dur = rng.randint(1, 60)
                evs.append(TraceEvent("compute", start, start + dur, device=f"rank{d}"))
                t = start + dur
        want = [sum(max(0, min(e.end_ns, o.end_ns) - max(e.start_ns, o.start_ns)) for o in evs if o.device != e.device)
                for e in evs]
        assert concurrent_ns(evs) == want


def test_first_rank_gaps_start_at_its_own_work_or_the_result_whichever_is_later():
    """SPD's first rank: each sample runs from the later of its own send + draft and the last RESULT's
    arrival to its next forward (here 40 µs both times: once the RESULT comes last, once its own work)."""
    from spdsim.calibrate import first_rank_gaps
    us = 1000

    def ev(kind, dev, t0, t1, name="", q=0):
        return TraceEvent(kind, t0 * us, t1 * us, stage=0 if dev == "rank0" else 1, device=dev, position=q, name=name)
    events = [ev("compute", "rank0", 0, 1000), ev("send", "rank0", 1010, 1060, "act 0->1"), ev("head", "rank0", 1065, 1068),
              ev("send", "rank1", 1080, 1100, "result 1->0"),           # arrives after the first rank's own work
              ev("compute", "rank0", 1140, 2140, q=1), ev("send", "rank0", 2150, 2200, "act 0->1", 1),
              ev("send", "rank1", 2170, 2180, "result 1->0", 1),         # arrives before it
              ev("head", "rank0", 2205, 2208, q=1), ev("compute", "rank0", 2248, 3248, q=2)]
    h = TraceHeader("spd", 2, 3, source="executor", partition=[[0, 4], [4, 8]], placement=["rank0", "rank1"],
                    prompt_tokens=P)
    from spdsim.trace import Trace
    assert first_rank_gaps(Trace(h, events)) == pytest.approx([40e-6, 40e-6])
    assert first_rank_gaps(Trace(dataclasses.replace(h, scheme="pp"), events)) == []


def test_spd_first_rank_pays_its_own_tick_and_the_other_ranks_theirs(tmp_path):
    """tick_by['overlapped:first'] is charged before each of the first rank's forwards under SPD, the
    regime's tick before the other ranks' (a calibration fitted on SPD runs has both)."""
    from spdsim.acceptance import iid
    costs, err, _ = calibrate(make_trace_dir(tmp_path))
    costs.send_block_s = 0.0
    costs.tick_by = {"overlapped": 0.0, "overlapped:first": 0.25e-3}
    calib = write_calibration(tmp_path / "c.yaml", costs, err)
    sc = parse_scenario(scenario_text(calib))
    r = simulate_point(sc, Point("spd", 2, "uniform", iid(1.0)), keep_events=True)
    gaps = {}
    for s in (0, 1):
        comp = sorted((e for e in r.events if e.kind == "compute" and e.stage == s and e.phase == "decode"),
                      key=lambda e: e.start_ns)
        gaps[s] = [b.start_ns - a.end_ns for a, b in zip(comp, comp[1:])]
    assert min(gaps[0]) == pytest.approx(0.25e6, abs=1)        # ns: the first rank's tick, nothing else
    assert min(gaps[1]) < 0.25e6 - 1
    assert load_calibration(calib).for_point("spd", 2).first_tick_overhead_s == pytest.approx(0.25e-3)
    assert load_calibration(calib).for_point("pp", 2).first_tick_overhead_s is None


def test_serving_fcfs_charges_the_first_rank_tick_as_the_single_request_engine(tmp_path):
    from spdsim import acceptance as acc
    costs, err, _ = calibrate(make_trace_dir(tmp_path))
    costs.tick_by = {"overlapped": 0.1e-3, "overlapped:first": 0.25e-3}
    calib = write_calibration(tmp_path / "c.yaml", costs, err)
    a = acc.replay(sequence=[1, 1, 0, 1, 0, 0, 1, 1])
    one = simulate_point(parse_scenario(scenario_text(calib).replace(f"prompt_tokens: {P}", "prompt_tokens: 1")),
                         Point("spd", 2, "uniform", a)).metrics
    (tmp_path / "r.csv").write_text("arrival_s,prompt_tokens,new_tokens\n" + "".join(f"{t},1,{N}\n" for t in (0, 5)))
    text = scenario_text(calib).replace(f"workload: {{prompt_tokens: {P}, new_tokens: {N}}}",
                                        "workload: {arrivals: {kind: trace, file: r.csv}}\nserving: {policy: fcfs}")
    (tmp_path / "s.yaml").write_text(text)
    from spdsim.scenario import load_scenario
    serv = load_scenario(tmp_path / "s.yaml")
    r = simulate_point(serv, Point("spd", 2, "uniform", a, policy="fcfs", load=None))
    for rec in r.requests:
        assert (rec.finish_s - rec.start_s) * 1e9 == pytest.approx(one.window_ns, abs=1.0)
