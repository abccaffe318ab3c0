"""Serving points in results.csv and on the terminal: the serving columns of a row, requests.csv, and
what `spdsim run` prints for a serving scenario. Pure pandas (the plots are in spdsim.plots_serving).

A serving row is still a sweep point (scheme × stages × partition × acceptance × policy × load): the
DESIGN §4 columns keep their meaning over the whole run (tokens_per_s = throughput over all requests,
bubble and waste over [first arrival, last finish]), and the serving columns follow them.
"""
from __future__ import annotations

import math

import pandas as pd

from spdsim.serving_metrics import SERVING_METRIC_COLUMNS, request_rows
from spdsim.textable import align, cell

SERVING_COLUMNS = (["policy", "arrivals", "load", "offered_rate_per_s", "requests", "max_batch", "mean_in_system",
                    "peak_running"] + SERVING_METRIC_COLUMNS)


def serving_row(scenario, result) -> dict:
    """The serving columns of one point (spdsim.engine.PointResult with `requests`)."""
    recs = result.requests
    arrivals = sorted(r.arrival_s for r in recs)
    span = arrivals[-1] - arrivals[0]
    row = {"policy": result.point.policy, "arrivals": scenario.workload.arrivals.kind, "load": result.point.load,
           "offered_rate_per_s": (len(recs) - 1) / span if span > 0 else math.nan, "requests": len(recs),
           "max_batch": scenario.serving.max_batch}
    row.update({k: result.extra.get(k) for k in SERVING_COLUMNS if k not in row})
    return row


def all_request_rows(results) -> list[dict]:
    return [row for r in results if r.requests is not None for row in request_rows(r.point.point_id, r.requests)]


# --- the printout -------------------------------------------------------------------------------------

def with_series(df: pd.DataFrame) -> pd.DataFrame:
    """`series`: scheme/policy (and α where several are swept), what one line of the plots stands for;
    `x`: the load (rate or users), or the offered rate where there is none (a trace)."""
    alphas = df["acceptance"].dropna().unique()
    several = len(alphas) > 1

    def label(r) -> str:
        a = r["acceptance"]
        tail = f" α={a:g}" if several and isinstance(a, float) and not math.isnan(a) else ""
        tp = int(r["tp"]) if "tp" in r and r["tp"] == r["tp"] else 1
        scheme = r["scheme"] if tp == 1 else ("tp" if r["scheme"] == "ar" else f"{r['scheme']}×tp") + str(tp)
        return f"{scheme}/{r['policy']}{tail}"
    x = df["load"] if df["load"].notna().all() else df["offered_rate_per_s"]
    return df.assign(series=[label(r) for _, r in df.iterrows()], x=x)


def best_per_series(df: pd.DataFrame, metric: str = "tpot_p99_ms") -> pd.DataFrame:
    """Per (series, load): the configuration (stages, partition) with the lowest `metric`."""
    s = with_series(df).dropna(subset=[metric])
    if s.empty:
        return s
    return s.sort_values(metric, kind="stable").drop_duplicates(["series", "x"]).sort_values(["series", "x"])


def _load_label(df: pd.DataFrame) -> str:
    kind = df["arrivals"].iloc[0]
    return {"poisson": "rate/s", "closed": "users"}.get(kind, "offered/s")


def _config(r) -> str:
    """'pp/interleave n=8 compute_balanced', 'tp8/fcfs (8 GPUs)': the series and where it runs."""
    if r["stages"] == 1:
        gpus = int(r["gpus"]) if "gpus" in r and r["gpus"] == r["gpus"] else 1
        return f"{r['series']} ({gpus} GPU{'s' if gpus > 1 else ''})"
    return f"{r['series']} n={r['stages']} {r['partition']}"


def _pivot_table(best: pd.DataFrame, metric: str, title: str, xlabel: str) -> str:
    series = list(dict.fromkeys(best.sort_values("series")["series"]))
    xs = sorted(best["x"].unique())
    rows = [[xlabel] + series]
    for x in xs:
        at = best[best["x"] == x].set_index("series")[metric]
        rows.append([f"{x:g}"] + [cell(at.get(s), ".1f") for s in series])
    return f"{title}\n" + align(rows)


def best_per_load(df: pd.DataFrame) -> pd.DataFrame:
    """Per load, the configuration that serves it best: with an SLO, the lowest TPOT p99 among the
    points meeting it (if any does); without, the lowest end-to-end p99. One row per load, sorted."""
    s = with_series(df)
    has_slo = s["meets_slo"].notna().any()
    rows = []
    for x in sorted(s["x"].unique()):
        at = s[s["x"] == x].dropna(subset=["tpot_p99_ms", "e2e_p99_ms"])
        if at.empty:
            continue
        if has_slo:
            ok = at[at["meets_slo"] == True]                    # noqa: E712 (bools and None)
            pool, key = (ok, "tpot_p99_ms") if len(ok) else (at, "e2e_p99_ms")
        else:
            pool, key = at, "e2e_p99_ms"
        rows.append(pool.loc[pool[key].idxmin()])
    return pd.DataFrame(rows)


def crossover(best: pd.DataFrame) -> str:
    """Which scheme/policy serves each load best (best_per_load), as runs over the loads:
    'spd/fcfs at 0.5–1; pp/interleave at 2–8' — where speculation stops paying."""
    runs: list[list] = []
    for _, r in best.iterrows():
        if runs and runs[-1][0] == r["series"]:
            runs[-1][2] = r["x"]
        else:
            runs.append([r["series"], r["x"], r["x"]])
    return "; ".join(f"{w} at {a:g}" if a == b else f"{w} at {a:g}–{b:g}" for w, a, b in runs)


def format_serving_summary(df: pd.DataFrame) -> str:
    """TPOT p99 and TTFT p99 against load, per scheme/policy (best stages and partition), the crossover,
    and per load the configuration with the lowest TPOT p99 among those meeting the SLO."""
    xlabel = _load_label(df)
    lines = []
    tpot = best_per_series(df, "tpot_p99_ms")
    if not tpot.empty:
        lines += [_pivot_table(tpot, "tpot_p99_ms", "TPOT p99 (ms) against load, best stages × partition per "
                               "scheme/policy:", xlabel)]
    ttft = best_per_series(df, "ttft_p99_ms")
    if not ttft.empty:
        lines += ["", _pivot_table(ttft, "ttft_p99_ms", "TTFT p99 (ms) against load:", xlabel)]
    best = best_per_load(df)
    if best.empty:
        return "\n".join(lines)
    has_slo = best["meets_slo"].notna().any()
    rule = "lowest TPOT p99 meeting the SLO" if has_slo else "lowest end-to-end p99"
    rows = [[xlabel, f"best ({rule})", "tok/s", "TTFT p99", "TPOT p50", "TPOT p99", "e2e p99"]
            + (["goodput/s", "SLO met"] if has_slo else [])]
    for _, r in best.iterrows():
        rows.append([f"{r['x']:g}", _config(r), cell(r["tokens_per_s"], ".1f"), cell(r["ttft_p99_ms"], ".0f"),
                     cell(r["tpot_p50_ms"], ".1f"), cell(r["tpot_p99_ms"], ".1f"), cell(r["e2e_p99_ms"], ".0f")]
                    + ([cell(r["goodput_requests_per_s"], ".2f"), "yes" if r["meets_slo"] == True else "no"]  # noqa: E712
                       if has_slo else []))
    lines += ["", "per load, the best configuration:", align(rows, left=(1,)), f"crossover: {crossover(best)}"]
    return "\n".join(lines)
