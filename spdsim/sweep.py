"""Sweeps: simulate every point of a scenario, in one or several processes, and `spdsim run`.

Public API (used by `executor validate` and `spdsim plan` too):
  run_sweep(scenario, jobs=1, progress=None, dask=None) -> pandas.DataFrame   one row per point, DESIGN §4 columns first
  sweep_results(scenario, jobs=1, progress=None, dask=None) -> list[PointResult]
  results_frame(scenario, results) -> pandas.DataFrame
  run_scenarios(scenarios, jobs=1, ...) -> pandas.DataFrame    every scenario of a file, one table

Columns beyond DESIGN §4's: `tp` (GPUs per stage), `gpus` (GPUs the point occupies: tp × stages, + a
dedicated device), `speedup_vs_tp` (÷ the fastest plain TP, scheme ar at one stage, on at most as many
GPUs; empty when the sweep has none: sweep.tp must hold the needed tp values), `allreduce_share` (the
TP collectives' share of the stages' compute time; empty without TP).
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from spdsim.engine import PointResult, plan_point, simulate_point
from spdsim.errors import UserError
from spdsim.metrics import speedup
from spdsim.parallel import progress_bar, run_tasks
from spdsim.partition import Plan
from spdsim.scenario import Point, Scenario, load_scenarios
from spdsim.serving_metrics import write_requests_csv
from spdsim.serving_results import SERVING_COLUMNS, all_request_rows, format_serving_summary, serving_row
from spdsim.summary import format_summary
from spdsim.textable import align, cell
from spdsim.trace import Trace, write_chrome_trace, write_trace

COLUMNS = ["scenario", "scheme", "stages", "tp", "gpus", "partition", "acceptance", "tokens_per_s", "ms_per_token",
           "speedup_vs_pp", "speedup_vs_ar", "speedup_vs_tp", "bubble_ratio", "waste_ratio", "acceptance_rate"]
EXTRA = ["accepted", "rejected", "new_tokens", "window_ns", "acceptance_kind", "placement", "layers",
         "head_device", "point_id", "allreduce_share"]
# Per-cycle breakdown (spd_dedicated: a synchronous cycle; sd / chain: a draft-and-verify step); empty for
# the other schemes. theoretical_speedup = n × committed tokens per cycle (spd_dedicated only).
BREAKDOWN = ["cycle_ms", "draft_ms", "slowest_stage_ms", "fixed_ms", "tokens_per_cycle", "theoretical_speedup",
             "acceptance_by_depth"]


def plans_for(scenario: Scenario, points: Iterable[Point]) -> dict[tuple[int, str, int], Plan]:
    """One plan per (stages, partition, tp): PP and SPD rows share it, so speedup_vs_pp compares like
    with like."""
    plans: dict[tuple[int, str, int], Plan] = {}
    for p in points:
        key = (p.stages, p.partition, p.tp)
        if key not in plans:
            plans[key] = plan_point(scenario, p)
    return plans


def _simulate_task(scenario: Scenario, point: Point, plan: Plan) -> PointResult:
    return simulate_point(scenario, point, plan=plan)


def sweep_results(scenario: Scenario, jobs: int = 1,
                  progress: Callable[[int, int], None] | None = None,
                  dask: str | None = None) -> list[PointResult]:
    """Every point of the sweep, in the order of `scenario.points()` (independent of `jobs` and of
    where the points ran: in this process, in `jobs` local processes or on a Dask cluster)."""
    return run_tasks(_simulate_task, _tasks(scenario), jobs=jobs, dask=dask, progress=progress)


def _tasks(scenario: Scenario) -> list[tuple[Scenario, Point, Plan]]:
    points = scenario.points()
    plans = plans_for(scenario, points)
    return [(scenario, p, plans[(p.stages, p.partition, p.tp)]) for p in points]


def fastest_tp(tp_rates: dict[int, float], gpus: int) -> float | None:
    """tokens/s of the fastest plain TP (scheme ar, one stage) on at most `gpus` GPUs; None if none."""
    rates = [v for t, v in tp_rates.items() if t <= gpus]
    return max(rates) if rates else None


def _baseline_policy(p: Point) -> str | None:
    """The policy of the PP / AR / TP point a serving point compares with: spd_first and adaptive change
    only how drafts enter, so the baselines' interleave stands for them (None: not serving)."""
    return p.policy if p.policy in (None, "fcfs", "interleave") else "interleave"


def results_frame(scenario: Scenario, results: list[PointResult]) -> pd.DataFrame:
    # serving points compare with baselines at the same policy and load (both None otherwise)
    pp = {(r.point.stages, r.point.partition, r.point.tp, r.point.policy, r.point.load): r.metrics.tokens_per_s
          for r in results if r.point.scheme == "pp"}
    ar = {(r.point.policy, r.point.load): r.metrics.tokens_per_s
          for r in reversed(results) if r.point.scheme == "ar" and r.point.tp == 1}
    tp_rates: dict[tuple, dict[int, float]] = {}
    for r in results:
        if r.point.scheme == "ar":
            tp_rates.setdefault((r.point.policy, r.point.load), {})[r.point.tp] = r.metrics.tokens_per_s
    serving = scenario.workload.serving
    rows = []
    for r in results:
        m, p = r.metrics, r.point
        gpus = r.plan.gpus
        row = {
            "scenario": scenario.name, "scheme": p.scheme, "stages": p.stages, "tp": p.tp, "gpus": gpus,
            "partition": p.partition,
            "acceptance": p.acceptance.value if p.acceptance is not None else None,
            "tokens_per_s": m.tokens_per_s, "ms_per_token": m.ms_per_token,
            "speedup_vs_pp": speedup(m.tokens_per_s, pp.get((p.stages, p.partition, p.tp, _baseline_policy(p), p.load))),
            "speedup_vs_ar": speedup(m.tokens_per_s, ar.get((_baseline_policy(p), p.load))),
            "speedup_vs_tp": speedup(m.tokens_per_s, fastest_tp(tp_rates.get((_baseline_policy(p), p.load), {}), gpus)),
            "bubble_ratio": m.bubble_ratio, "waste_ratio": m.waste_ratio, "acceptance_rate": m.acceptance_rate,
            "accepted": m.accepted, "rejected": m.rejected, "new_tokens": m.new_tokens, "window_ns": m.window_ns,
            "acceptance_kind": p.acceptance.kind if p.acceptance is not None else None,
            "placement": r.plan.placement_str(), "layers": r.plan.layers_str(),
            "head_device": r.plan.head_device, "point_id": p.point_id, "allreduce_share": m.allreduce_share,
        }
        row.update({k: r.extra.get(k) for k in BREAKDOWN})
        if serving:
            row.update(serving_row(scenario, r))
        for s, u in enumerate(m.utilization):
            row[f"utilization_{s}"] = u
        rows.append(row)
    df = pd.DataFrame(rows)
    util = sorted((c for c in df.columns if c.startswith("utilization_")), key=lambda c: int(c.split("_")[1]))
    return df[COLUMNS + EXTRA + BREAKDOWN + (SERVING_COLUMNS if serving else []) + util]


def run_sweep(scenario: Scenario, jobs: int = 1, progress: Callable[[int, int], None] | None = None,
              dask: str | None = None) -> pd.DataFrame:
    return results_frame(scenario, sweep_results(scenario, jobs, progress, dask))


# --- --trace selection ----------------------------------------------------------------------------

def select_points(df: pd.DataFrame, select: str) -> list[str]:
    """point_ids for --trace: 'all', 'best' (fastest SPD point) or 'key=value,...' filters on columns."""
    select = select.strip()
    if select == "all":
        return list(df["point_id"])
    if select == "best":
        spd = df[df["scheme"] == "spd"]
        pool = spd if len(spd) else df
        return [pool.loc[pool["tokens_per_s"].idxmax(), "point_id"]]
    mask = pd.Series(True, index=df.index)
    for part in select.split(","):
        if "=" not in part:
            raise UserError(f"--trace: {part!r} is not key=value (or use 'all' / 'best')")
        key, value = (x.strip() for x in part.split("=", 1))
        if key not in df.columns:
            raise UserError(f"--trace: unknown column {key!r}")

        def match(v, value=value) -> bool:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return value in ("", "none")
            try:
                return math.isclose(float(v), float(value))
            except (TypeError, ValueError):
                return str(v) == value
        mask &= df[key].map(match)
    ids = list(df.loc[mask, "point_id"])
    if not ids:
        raise UserError(f"--trace: no point matches {select!r}")
    return ids


def write_timelines(scenario: Scenario, out: Path, point_ids: list[str], prefix: str = "") -> list[Path]:
    by_id = {p.point_id: p for p in scenario.points()}
    written = []
    for pid in point_ids:
        r = simulate_point(scenario, by_id[pid], keep_events=True)   # deterministic: same as the sweep's
        name = prefix + pid
        jsonl = write_trace(out / "timelines" / f"{name}.jsonl", r.header, r.events or [])
        write_chrome_trace(out / f"timeline_{name}.json", Trace(r.header, r.events or []))
        written.append(jsonl)
    return written


def run_scenarios(scenarios: list[Scenario], jobs: int = 1, progress: Callable[[int, int], None] | None = None,
                  dask: str | None = None, requests: list | None = None) -> pd.DataFrame:
    """Every scenario of a file, one after another; their rows in one table (the `scenario` column
    tells them apart, and every speedup is taken within its own scenario). `requests` (a list): gets
    the requests.csv rows of every serving point."""
    if len(scenarios) == 1:
        results = sweep_results(scenarios[0], jobs, progress, dask)
        if requests is not None:
            requests += all_request_rows(results)
        return results_frame(scenarios[0], results)
    tasks, spans = [], []
    for sc in scenarios:           # one pool for all of them
        more = _tasks(sc)
        spans.append((len(tasks), len(tasks) + len(more)))
        tasks += more
    results = run_tasks(_simulate_task, tasks, jobs=jobs, dask=dask, progress=progress)
    if requests is not None:
        requests += all_request_rows(results)
    return pd.concat([results_frame(sc, results[a:b]) for sc, (a, b) in zip(scenarios, spans)], ignore_index=True)


# --- the table -----------------------------------------------------------------------------------------

def format_table(df: pd.DataFrame) -> str:
    """Every point (`spdsim run --full`); tp, GPUs and ×TP where the sweep has TP."""
    tp = "tp" in df.columns and (df["tp"] > 1).any()
    rows = [("scheme", "n", *(("tp", "gpus") if tp else ()), "partition", "α", "tok/s", "ms/tok", "×PP", "×AR",
             *(("×TP",) if tp else ()), "bubble", "waste", "accept", "placement")]
    for _, r in df.iterrows():
        acc = r["acceptance"]
        rows.append((r["scheme"], str(r["stages"]), *((str(r["tp"]), str(r["gpus"])) if tp else ()), r["partition"],
                     acc if isinstance(acc, str) else cell(acc, ".2f"),
                     cell(r["tokens_per_s"], ".1f"), cell(r["ms_per_token"], ".2f"), cell(r["speedup_vs_pp"], ".2f"),
                     cell(r["speedup_vs_ar"], ".2f"), *((cell(r["speedup_vs_tp"], ".2f"),) if tp else ()),
                     cell(r["bubble_ratio"], ".3f"), cell(r["waste_ratio"], ".3f"), cell(r["acceptance_rate"], ".3f"),
                     r["placement"] if r["partition"] == "comm_aware" or (tp and r["tp"] > 1) else ""))
    return align(rows, left=(0, 4 if tp else 2, len(rows[0]) - 1))


def serving_headline(scenario: Scenario) -> str:
    """'serving-h100: llama-3-8b on 8 × h100-sxm (nvswitch), poisson arrivals, 200 requests per point, ...'"""
    w, sv, hw = scenario.workload, scenario.serving, scenario.hardware

    def length(n: int, dist) -> str:
        return f"{dist.dist} mean {dist.mean:g}" if dist is not None else f"{n}"
    slo = [f"{k.split('_')[0].upper()} p99 ≤ {v:g} ms" for k, v in
           (("ttft_p99_ms", sv.slo.ttft_p99_ms), ("tpot_p99_ms", sv.slo.tpot_p99_ms)) if v is not None]
    tp = f", tp {'/'.join(map(str, scenario.sweep.tp))}" if scenario.sweep.tp != [1] else ""
    return (f"{scenario.name}: {scenario.model.name} on {hw.count} × {hw.gpu.name} ({hw.topology.kind}), "
            f"{w.arrivals.kind} arrivals, {w.requests} requests per point, prompt {length(w.prompt_tokens, w.prompt_dist)} "
            f"+ {length(w.new_tokens, w.new_dist)} new tokens, max batch {sv.max_batch}{tp}"
            + (f"; SLO {', '.join(slo)}" if slo else "") + "\n")


def run_command(args: argparse.Namespace) -> int:
    """`spdsim run SCENARIO.yaml [--out DIR] [--jobs N] [--quiet] [--no-plots] [--trace SELECT]`"""
    scenarios = load_scenarios(args.scenario)
    if args.jobs < 1:
        raise UserError("--jobs: must be ≥ 1")
    out = Path(args.out) if args.out else Path("reports") / Path(args.scenario).stem
    quiet = bool(args.quiet)
    for scenario in scenarios:
        who = f"{scenario.name}: " if len(scenarios) > 1 else ""
        for note in scenario.notes:
            if not quiet:
                print(f"spdsim: note: {who}{note}", file=sys.stderr)
        if scenario.calibration and not quiet:
            from spdsim.gpu_calibration import is_gpu_calibration
            what = ("the roofline with a GPU's fitted parameters" if is_gpu_calibration(scenario.calibration_path())
                    else "not the roofline")
            print(f"spdsim: note: {who}costs from calibration {scenario.calibration!r} ({what})", file=sys.stderr)
    request_rows: list[dict] = []
    df = run_scenarios(scenarios, args.jobs, progress_bar("simulating", quiet), getattr(args, "dask", None),
                       requests=request_rows)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    if any(sc.workload.serving for sc in scenarios):
        write_requests_csv(out / "requests.csv", request_rows)
    src = Path(args.scenario)
    try:
        shutil.copyfile(src, out / "scenario.yaml")
    except shutil.SameFileError:
        pass
    if getattr(args, "trace", None):
        written = []
        if len(scenarios) == 1:
            written = write_timelines(scenarios[0], out, select_points(df, args.trace))
        else:       # per scenario; a filter only has to match somewhere
            for sc in scenarios:
                try:
                    ids = select_points(df[df["scenario"] == sc.name], args.trace)
                except UserError:
                    continue
                written += write_timelines(sc, out, ids, prefix=f"{sc.name}-")
            if not written:
                raise UserError(f"--trace: no point matches {args.trace!r}")
        if not quiet:
            print(f"spdsim: wrote {len(written)} timeline(s) under {out}/timelines/", file=sys.stderr)
    if not quiet:
        if getattr(args, "full", False):
            print(format_table(df) + "\n")
        for i, scenario in enumerate(scenarios):     # a file of several scenarios: one summary each
            hw = scenario.hardware
            tp = f", tp {'/'.join(map(str, scenario.sweep.tp))}" if scenario.sweep.tp != [1] else ""
            mine = df[df["scenario"] == scenario.name] if len(scenarios) > 1 else df
            if scenario.workload.serving:
                print(("\n" if i else "") + serving_headline(scenario))
                print(format_serving_summary(mine))
                continue
            print(("\n" if i else "") +
                  f"{scenario.name}: {scenario.model.name} on {hw.count} × {hw.gpu.name} ({hw.topology.kind}), "
                  f"{scenario.workload.prompt_tokens} prompt + {scenario.workload.new_tokens} new tokens, batch 1{tp}")
            print(format_summary(mine))
            if max(scenario.sweep.tp) > 1:           # TP beside SPD: the where-SPD-pays table
                from spdsim.where import format_where, where_spd_pays
                where = where_spd_pays(mine)
                if not where.empty:
                    print("\n" + format_where(where))
        print(f"\nwrote {out / 'results.csv'} ({len(df)} points; every one is in the table there and in "
              f"index.html{'' if getattr(args, 'full', False) else ', or print them with --full'})")
    if not getattr(args, "no_plots", False):
        try:
            from spdsim.report import write_report
        except ModuleNotFoundError as e:
            if e.name != "spdsim.report":
                raise
            if not quiet:
                print("spdsim: note: spdsim.report is not available; no plots written", file=sys.stderr)
        else:
            write_report(out)
    return 0
