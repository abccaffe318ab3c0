"""spdsim calibrate's tp section: recovers the collectives and the TP layer factor that made synthetic
TP traces, leaves oversubscribed runs out, and a calibrated TP point predicts the timeline they came
from. No torch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from spdsim.calibrate import calibrate
from spdsim.calibrate_tp import fit_latency_bandwidth
from spdsim.calibration_file import write_calibration
from spdsim.cost_choice import cost_model
from spdsim.engine import simulate_point
from spdsim.metrics import run_metrics
from spdsim.scenario import Point, parse_scenario
from spdsim.trace import TraceEvent, TraceHeader, write_trace

from test_calibrate import BW, EMBED, KAPPA, LAT, LM_HEAD, MSG, NS, N, P, TICK, make_trace_dir, scenario_text

AR_LAT, AR_BW = 60e-6, 2.0e8            # the all-reduce benchmark: latency + bytes / bandwidth
WAIT = 40e-6                            # in-run excess per collective (waiting for the peer)
K = 0.6                                 # a layer at TP 2 takes 0.6 of its TP 1 time
HIDDEN_BYTES, LOGITS_BYTES = 64 * 4, 256 * 4


def tp_ar_trace(tp: int = 2) -> tuple[TraceHeader, list[TraceEvent]]:
    """AR on one TP group of `tp` ranks, as the protocol runs it (spdsim/protocol.py, "Tensor-parallel
    stages"): rank 0 sends each issue (a 72-byte header) to its peer, which starts when it arrives (the
    first all-reduce holds rank 0 until then); each forward = K × the TP 1 layers + embed (replicated) +
    K × LM head, all × κ, plus 2 all-reduces per layer and the logits all-gather, nested in the compute."""
    ev, t = [], 0.0
    issue = MSG + LAT + 72 / BW
    coll = AR_LAT + WAIT + HIDDEN_BYTES / AR_BW
    gather = AR_LAT + WAIT + LOGITS_BYTES / AR_BW
    for k in range(N):
        q = P - 1 + k
        base = KAPPA * (K * (8 * (1e-3 + 2.0e-6 * (q + 1)) + LM_HEAD) + EMBED)
        d = base + 16 * coll + gather
        for r in range(tp):
            dev = f"rank{r}"
            ev.append(TraceEvent("compute", int(t * NS), int((t + d) * NS), stage=0, device=dev, position=q, tp_rank=r))
            c0 = t + base / 2
            for i in range(16):
                ev.append(TraceEvent("allreduce", int((c0 + i * coll) * NS), int((c0 + (i + 1) * coll) * NS), stage=0,
                                     device=dev, position=q, bytes=HIDDEN_BYTES, tp_rank=r,
                                     name="attention" if i % 2 == 0 else "mlp"))
            g0 = t + d - gather
            ev.append(TraceEvent("allreduce", int(g0 * NS), int((t + d) * NS), stage=0, device=dev, position=q,
                                 bytes=LOGITS_BYTES, tp_rank=r, name="allgather"))
        ev.append(TraceEvent("commit", int((t + d) * NS), int((t + d) * NS), device="rank0", position=q + 1))
        t += d + TICK + issue
    h = TraceHeader("ar", 1, N, source="executor", partition=[[0, 8]], placement=["rank0"], prompt_tokens=P, tp=tp)
    return h, ev


def make_tp_dir(root: Path, oversubscribed: bool = False) -> Path:
    d = make_trace_dir(root)
    prof = json.loads((d / "profile.json").read_text())
    sizes = [256, 4096, 65536, 1048576]
    prof.update(cpu_count=2, model={"layers": 8, "dim": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "vocab": 256},
                allreduce={"tp": 2, "transport": "local", "algorithm": "direct", "sizes": sizes,
                           "seconds": [AR_LAT + s / AR_BW for s in sizes]},
                allgather={"tp": 2, "transport": "local", "sizes": sizes, "seconds": [AR_LAT + s / AR_BW for s in sizes]})
    (d / "profile.json").write_text(json.dumps(prof))
    h, ev = tp_ar_trace()
    for r in range(2):
        write_trace(d / "runs_tp" / "ar-n1-tp2" / f"rank{r}.jsonl", h, [e for e in ev if e.device == f"rank{r}"])
    if oversubscribed:              # a 4-rank run on 2 cores, 3× slower: must not enter the fit
        h2, ev2 = tp_ar_trace()
        h2 = TraceHeader("pp", 2, N, source="executor", partition=[[0, 4], [4, 8]], placement=["rank0", "rank2"],
                         prompt_tokens=P, tp=2)
        slow = [TraceEvent(e.kind, 3 * e.start_ns, 3 * e.end_ns, e.stage, e.device, e.position, e.bytes,
                           tp_rank=e.tp_rank, name=e.name) for e in ev2]
        write_trace(d / "runs_tp" / "pp-n2-tp2" / "rank0.jsonl", h2, slow)
    return d


def test_fit_latency_bandwidth_recovers_both_terms():
    sizes = [64, 1024, 16384, 262144]
    lat, bw, err = fit_latency_bandwidth(sizes, [5e-6 + s / 3e9 for s in sizes])
    assert lat == pytest.approx(5e-6, rel=1e-6) and bw == pytest.approx(3e9, rel=1e-6) and err < 1e-6
    lat, bw, _ = fit_latency_bandwidth(sizes, [7e-6] * 4)          # no bytes term: a constant, never negative
    assert lat == pytest.approx(7e-6) and bw > 1e12


@pytest.mark.parametrize("oversubscribed", [False, True])
def test_tp_section_recovers_the_costs_that_made_the_traces(tmp_path, oversubscribed):
    costs, err, lines = calibrate(make_tp_dir(tmp_path, oversubscribed))
    tp = costs.tp_calibration
    assert tp is not None
    assert tp.allreduce_bandwidth == pytest.approx(AR_BW, rel=1e-3)
    assert tp.allreduce_latency_s == pytest.approx(AR_LAT + WAIT, rel=1e-3)   # the benchmark + the in-run wait
    assert tp.layer_scale[2] == pytest.approx(K, rel=0.02)
    assert any(l.startswith("tp ") for l in lines)
    assert ("oversubscribed left out" in " ".join(lines)) == oversubscribed


def test_a_calibrated_tp_point_predicts_the_synthetic_timeline(tmp_path):
    d = make_tp_dir(tmp_path)
    costs, err, _ = calibrate(d)
    calib = write_calibration(tmp_path / "calib.yaml", costs, err)
    text = scenario_text(calib).replace("sweep: {stages: [1, 2],", "sweep: {stages: [1, 2], tp: [1, 2],")
    sc = parse_scenario(text)
    assert cost_model(sc).tp_calibration.layer_scale[2] == pytest.approx(K, rel=0.02)
    pred = simulate_point(sc, Point("ar", 1, "uniform", None, tp=2)).metrics
    h, ev = tp_ar_trace()
    meas = run_metrics(ev, "ar", 1, N, ["rank0"])
    assert pred.tokens_per_s == pytest.approx(meas.tokens_per_s, rel=0.03)
    assert pred.allreduce_share == pytest.approx(meas.allreduce_share, rel=0.1)
