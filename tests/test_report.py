"""Reports: plots, timelines and the HTML page, from a synthetic results.csv and a synthetic trace."""
from __future__ import annotations

import csv
import json
import math
import re
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from spdsim import gantt, plots
from spdsim.cli import main
from spdsim.metrics import ideal_spd_speedup
from spdsim.report import load_results, write_report
from spdsim.trace import TraceEvent, TraceHeader, read_trace, write_trace
from spdsim.errors import UserError

ALPHAS = (0.6, 0.8, 0.95)
STAGES = (1, 2, 4, 8)
PARTITIONS = ("uniform", "comm_aware")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def synthetic_rows(ar_fits: bool = True, extra_scheme: str | None = None) -> list[dict]:
    """A sweep shaped like `spdsim run`'s: AR at n=1, PP and SPD per (n, partition[, α])."""
    ar = 100.0
    rows = [dict(scheme="ar", stages=1, partition="", acceptance="", tokens_per_s=ar)]
    for part, overhead in zip(PARTITIONS, (0.03, 0.02)):
        for n in STAGES:
            pp = ar / (1 + overhead * (n - 1))
            rows.append(dict(scheme="pp", stages=n, partition=part, acceptance="", tokens_per_s=pp,
                             bubble_ratio=(n - 1) / n, waste_ratio=0.0))
            for a in ALPHAS:
                for scheme in ("spd",) + ((extra_scheme,) if extra_scheme else ()):
                    spd = pp * ideal_spd_speedup(n, a) * (0.97 if scheme == "spd" else 0.9)
                    rows.append(dict(scheme=scheme, stages=n, partition=part, acceptance=a, tokens_per_s=spd,
                                     bubble_ratio=0.05 * (n - 1) / n, waste_ratio=(1 - a) * (n - 1) / n / 2,
                                     acceptance_rate=a))
    out = []
    for r in rows:
        n = r["stages"]
        pp_speed = next(x["tokens_per_s"] for x in rows
                        if x["scheme"] == "pp" and x["stages"] == n and x["partition"] in (r["partition"], "uniform"))
        row = dict(scenario="synthetic", scheme=r["scheme"], stages=n, partition=r["partition"],
                   acceptance=r["acceptance"], tokens_per_s=r["tokens_per_s"], ms_per_token=1000 / r["tokens_per_s"],
                   speedup_vs_pp=r["tokens_per_s"] / pp_speed,
                   speedup_vs_ar=r["tokens_per_s"] / ar if ar_fits else "",
                   bubble_ratio=r.get("bubble_ratio", 0.0), waste_ratio=r.get("waste_ratio", 0.0),
                   acceptance_rate=r.get("acceptance_rate", ""), placement="colocated")
        busy = 1 - row["bubble_ratio"]
        for s in range(max(STAGES)):
            row[f"utilization_{s}"] = busy if s < n else ""
        out.append(row)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def synthetic_spd_trace(n: int = 4, new_tokens: int = 24, tick: int = 1_000_000, link: int = 100_000,
                        reject_every: int = 5, window: int | None = None) -> tuple[TraceHeader, list[TraceEvent]]:
    """A lock-step SPD pipeline: stage s works on the position issued s ticks ago; every
    `reject_every`-th draft is rejected, discarding the compute of every younger in-flight position.
    window=1 makes it PP (one token in flight, nothing drafted)."""
    window = n if window is None else window
    events: list[TraceEvent] = []
    inflight: list[dict] = []
    next_pos, committed, t = 0, 0, 0
    while committed < new_tokens:
        if len(inflight) < window and next_pos < new_tokens:
            drafted = bool(inflight)
            inflight.append(dict(pos=next_pos, start=t, drafted=drafted, evs=[]))
            if drafted:
                events.append(TraceEvent("head", t * tick, t * tick + tick // 2, device="gpu0", position=next_pos))
            next_pos += 1
        for it in inflight:
            s, t0 = t - it["start"], t * tick
            it["evs"].append(TraceEvent("compute", t0, t0 + tick - link, stage=s, device=f"gpu{s}",
                                        position=it["pos"]))
            if s < n - 1:
                it["evs"].append(TraceEvent("send", t0 + tick - link, t0 + tick, stage=s, device=f"gpu{s}",
                                            position=it["pos"], bytes=8192, name=f"{s}->{s + 1}"))
        t_end = (t + 1) * tick
        done = next((it for it in inflight if t - it["start"] == n - 1), None)
        if done:
            inflight.remove(done)
            events += done["evs"]
            committed += 1
            events.append(TraceEvent("commit", t_end, t_end, position=done["pos"] + 1))
            nxt = next((it for it in inflight if it["pos"] == done["pos"] + 1), None)
            if nxt and nxt["drafted"]:
                ok = (nxt["pos"] % reject_every) != 0
                events.append(TraceEvent("verify", t_end, t_end, position=nxt["pos"], accepted=ok))
                if not ok:
                    events.append(TraceEvent("flush", t_end, t_end, position=done["pos"]))
                    for it in inflight:
                        events += [replace(e, discarded=True) for e in it["evs"]]
                    inflight.clear()
                    next_pos = done["pos"] + 1
        t += 1
    for it in inflight:
        events += it["evs"]
    header = TraceHeader(scheme="spd" if window > 1 else "pp", stages=n, new_tokens=new_tokens,
                         placement=[f"gpu{s}" for s in range(n)])
    return header, sorted(events, key=lambda e: (e.start_ns, e.end_ns))


def make_out_dir(tmp_path: Path) -> Path:
    write_csv(tmp_path / "results.csv", synthetic_rows())
    (tmp_path / "scenario.yaml").write_text("name: synthetic\nsweep: {stages: [1, 2, 4, 8]}\n")
    header, events = synthetic_spd_trace()
    write_trace(tmp_path / "timelines" / "spd_n4_a0.8.jsonl", header, events)
    return tmp_path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return make_out_dir(tmp_path)


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> Path:
    """One report drawn for the read-only checks (drawing takes seconds)."""
    out = make_out_dir(tmp_path_factory.mktemp("report"))
    assert write_report(out) == out / "index.html"
    return out


def test_report_writes_every_output(reported: Path):
    for name in ("speedup_vs_n.png", "bubble_vs_n.png", "tokens_per_s.png", "utilization.png",
                 "gantt_spd_n4_a0.8.png", "timeline_spd_n4_a0.8.json"):
        assert (reported / name).is_file(), name


def test_pngs_decode_with_the_figure_size(reported: Path):
    import matplotlib.image as mpimg
    dpi = plots.DPI
    expected = {
        # two partitioners → two panel columns at 4.2 in each, plus the legend column
        "speedup_vs_n.png": (round((4.2 * len(PARTITIONS) + 2.2) * dpi), round(7.5 * dpi)),
        "bubble_vs_n.png": (12 * dpi, 5 * dpi),
        "tokens_per_s.png": (10 * dpi, round(5.5 * dpi)),
    }
    for name, size in expected.items():
        assert png_size(reported / name) == size, name
        pixels = mpimg.imread(reported / name)
        assert pixels.shape[:2] == (size[1], size[0])
        assert pixels.std() > 0.01, f"{name} is blank"
    w, h = png_size(reported / "gantt_spd_n4_a0.8.png")
    assert w == round(gantt.WIDTH_IN * gantt.DPI)
    assert h > 4 * 0.5 * gantt.DPI          # at least the four stage rows
    # one heatmap row per chosen configuration: grows with the sweep
    assert png_size(reported / "utilization.png")[1] > len(STAGES) * 0.3 * plots.DPI


def test_perfetto_json_has_one_complete_event_per_compute(reported: Path):
    trace = read_trace(reported / "timelines" / "spd_n4_a0.8.jsonl")
    doc = json.loads((reported / "timeline_spd_n4_a0.8.json").read_text())
    evs = doc["traceEvents"]
    computes = [e for e in trace.events if e.kind == "compute"]
    complete = [e for e in evs if e["ph"] == "X" and e["cat"] == "compute"]
    assert len(complete) == len(computes)
    discarded = [e for e in complete if e["args"].get("discarded")]
    assert len(discarded) == sum(e.discarded for e in computes) > 0
    assert all("discarded" in e["name"] for e in discarded)
    assert all("discarded" not in e["name"] for e in complete if e not in discarded)
    # one process per device, named after it; one track per stage / link / module
    processes = {e["pid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    assert {f"gpu{s}" for s in range(4)} | {"interconnect"} <= set(processes.values())
    tracks = {(processes[e["pid"]], e["args"]["name"]) for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {(f"gpu{s}", f"stage {s}") for s in range(4)} <= tracks
    assert ("gpu0", "speculative module") in tracks
    assert {("interconnect", f"link {s}->{s + 1}") for s in range(3)} <= tracks
    sends = [e for e in evs if e["ph"] == "X" and e["cat"] == "send"]
    assert len(sends) == sum(e.kind == "send" for e in trace.events)
    instants = [e for e in evs if e["ph"] == "i"]
    assert any(e["name"] == "flush" for e in instants)
    assert any(e["name"] == "verify reject" for e in instants)
    assert any(e["name"] == "verify accept" for e in instants)
    # times: µs, matching the trace
    first = min(computes, key=lambda e: e.start_ns)
    assert min(e["ts"] for e in complete) == pytest.approx(first.start_ns / 1000)


def test_html_references_every_image_and_shows_the_scenario(reported: Path):
    page = (reported / "index.html").read_text()
    sources = set(re.findall(r'<img src="([^"]+)"', page))
    pngs = {p.name for p in reported.glob("*.png")}
    assert pngs and sources == pngs
    assert all(not s.startswith(("http:", "https:", "/")) for s in sources)   # opens from disk
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "timeline_spd_n4_a0.8.json" in page
    assert "name: synthetic" in page
    assert "Best configuration per acceptance rate" in page
    # two tables: best per α (one row per α) and all results (one row per CSV row), each with a header row
    assert page.count("<tr>") == (1 + len(ALPHAS)) + (1 + len(synthetic_rows()))


def test_best_per_alpha_is_the_fastest_row(out_dir: Path):
    from spdsim.report import best_per_alpha
    df = load_results(out_dir / "results.csv")
    best = best_per_alpha(df)
    assert list(best["α"]) == list(ALPHAS)
    for _, row in best.iterrows():
        pool = df[(df["acceptance"] == row["α"]) | df["acceptance"].isna()]
        assert row["tokens_per_s"] == pool["tokens_per_s"].max()
    # higher acceptance → faster best point, in this sweep
    assert list(best["tokens_per_s"]) == sorted(best["tokens_per_s"])


def test_unknown_schemes_and_no_ar_baseline_still_plot(tmp_path: Path):
    write_csv(tmp_path / "results.csv", synthetic_rows(ar_fits=False, extra_scheme="chain"))
    write_report(tmp_path)
    for name in ("speedup_vs_n.png", "bubble_vs_n.png", "tokens_per_s.png", "utilization.png"):
        assert png_size(tmp_path / name)[0] > 0
    page = (tmp_path / "index.html").read_text()
    assert "chain" in page and "Timelines" not in page and "Scenario" not in page


def test_pp_rows_with_an_acceptance_are_still_baselines(tmp_path: Path):
    from spdsim.report import best_per_alpha
    rows = [dict(r, acceptance=0.8) if r["scheme"] == "pp" else r for r in synthetic_rows()]
    write_csv(tmp_path / "results.csv", rows)
    df = load_results(tmp_path / "results.csv")
    assert set(plots.baselines(df)["scheme"]) == {"ar", "pp"}
    assert set(plots.speculative(df)["scheme"]) == {"spd"}
    assert list(best_per_alpha(df)["α"]) == list(ALPHAS)   # 0.8 once, not twice


def test_acceptance_kinds_are_separate_series(tmp_path: Path):
    """iid and markov at the same α are two lines; a per-n table is one line whose α moves with n."""
    rows = []
    for r in synthetic_rows():
        rows.append(dict(r, acceptance_kind="iid" if r["acceptance"] != "" else ""))
        if r["scheme"] == "spd" and r["acceptance"] == 0.8:
            rows.append(dict(r, acceptance_kind="markov", tokens_per_s=r["tokens_per_s"] * 0.9))
        if r["scheme"] == "spd" and r["partition"] == "uniform" and r["acceptance"] == ALPHAS[STAGES.index(r["stages"]) % 3]:
            rows.append(dict(r, acceptance_kind="table", tokens_per_s=r["tokens_per_s"] * 0.95))
    write_csv(tmp_path / "results.csv", rows)
    df = load_results(tmp_path / "results.csv")
    spec = plots.with_series(plots.speculative(df))
    order = plots.series_order(spec)
    assert set(order) == {f"α = {a:g}" for a in ALPHAS} | {"markov α = 0.8", "α table"}
    assert order.index("α = 0.6") < order.index("α = 0.8") < order.index("α = 0.95")
    n, ideal = plots.ideal_curve(spec[spec["series"] == "α table"], max(STAGES))
    assert list(n) == list(STAGES)   # one point per n, each at its own α
    assert ideal[1] == pytest.approx(ideal_spd_speedup(2, ALPHAS[1]))
    chosen = plots.chosen_configurations(df)
    assert len(chosen[chosen["scheme"] == "spd"]) == len(STAGES) * (len(ALPHAS) + 2)
    write_report(tmp_path)
    assert png_size(tmp_path / "speedup_vs_n.png")[0] > 0


def test_without_utilization_columns_there_is_no_heatmap(tmp_path: Path):
    rows = [{k: v for k, v in r.items() if not k.startswith("utilization_")} for r in synthetic_rows()]
    write_csv(tmp_path / "results.csv", rows)
    (tmp_path / "utilization.png").write_bytes(b"stale")
    write_report(tmp_path)
    assert not (tmp_path / "utilization.png").exists()
    assert "utilization.png" not in (tmp_path / "index.html").read_text()


def test_gantt_window_is_the_first_ticks():
    header, events = synthetic_spd_trace(n=4, new_tokens=40)
    win = gantt.first_ticks(events, 10)
    assert win.start_ns == 0
    # lock-step: stage 0 computes once per tick, so its 10th compute ends in tick 10
    assert win.end_ns == 10 * 1_000_000 - 100_000


def test_gantt_window_under_pp_counts_ticks_not_tokens():
    _, events = synthetic_spd_trace(n=4, new_tokens=40, window=1)
    assert not any(e.kind in ("head", "verify", "flush") for e in events)
    win = gantt.first_ticks(events, 10)
    # stage 0 computes once per 4-tick round trip; the window still spans 10 ticks (compute + send)
    assert win.end_ns - win.start_ns == 10 * 1_000_000


def test_gantt_rows_follow_the_trace(tmp_path: Path):
    from spdsim.trace import Trace
    spd_h, spd = synthetic_spd_trace(n=4)
    pp_h, pp = synthetic_spd_trace(n=4, window=1)
    spd_png = gantt.draw_gantt(Trace(spd_h, spd), tmp_path / "spd.png")
    pp_png = gantt.draw_gantt(Trace(pp_h, pp), tmp_path / "pp.png")
    # PP has neither the speculative module's row nor the verify row: two rows shorter
    assert png_size(spd_png)[1] - png_size(pp_png)[1] == round(2 * 0.55 * gantt.DPI)


def test_cli_report_missing_dir_exits_2(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spdsim: error:") and "nope" in err and "\n" not in err


def test_cli_report_missing_results_exits_2(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.csv" in capsys.readouterr().err


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: [{k: v for k, v in r.items() if k != "bubble_ratio"} for r in rows], "bubble_ratio"),
    (lambda rows: [dict(r, tokens_per_s="fast") if i == 3 else r for i, r in enumerate(rows)], "row 5"),
    (lambda rows: [dict(r, stages="") if i == 0 else r for i, r in enumerate(rows)], "stages"),
])
def test_invalid_results_are_user_errors(tmp_path: Path, mutate, message):
    write_csv(tmp_path / "results.csv", mutate(synthetic_rows()))
    with pytest.raises(UserError, match=message):
        write_report(tmp_path)


def test_cli_report_prints_the_index(out_dir: Path, capsys):
    assert main(["report", str(out_dir)]) == 0
    assert str(out_dir / "index.html") in capsys.readouterr().out


def test_load_results_keeps_empty_as_nan(out_dir: Path):
    df = load_results(out_dir / "results.csv")
    ar = df[df["scheme"] == "ar"].iloc[0]
    assert math.isnan(ar["acceptance"]) and ar["partition"] == "-"
    assert df["stages"].dtype.kind == "i"


def test_spdsim_run_end_to_end_draws_the_report(tmp_path: Path):
    """`spdsim run` on the ideal scenario ends with a full report, timelines included."""
    pytest.importorskip("spdsim.sweep")
    scenario = Path(__file__).resolve().parents[1] / "scenarios" / "ideal.yaml"
    if not scenario.is_file():
        pytest.skip("scenarios/ideal.yaml not present")
    out = tmp_path / "ideal"
    assert main(["run", str(scenario), "--out", str(out), "--trace", "best", "--quiet"]) == 0
    jsonl = sorted((out / "timelines").glob("*.jsonl"))
    assert len(jsonl) == 1
    point = jsonl[0].stem
    page = (out / "index.html").read_text()
    for name in ("speedup_vs_n.png", "bubble_vs_n.png", "tokens_per_s.png", "utilization.png", f"gantt_{point}.png"):
        assert png_size(out / name)[0] > 0 and f'src="{name}"' in page, name
    doc = json.loads((out / f"timeline_{point}.json").read_text())
    computes = sum(e.kind == "compute" for e in read_trace(jsonl[0]).events)
    assert sum(e["ph"] == "X" and e["cat"] == "compute" for e in doc["traceEvents"]) == computes > 0
