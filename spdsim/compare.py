"""`spdsim compare SCENARIO`: SPD against traditional speculative decoding, measured on one scenario.

Runs the scenario's sweep (every scheme it lists; add sd / chain / spd_dedicated to its `schemes` to
see them) and prints, for every (n, α), the fastest partition of each scheme with:
  gpus          devices the point occupies (stages + a dedicated module / rank 0)
  parallelism   mean number of busy stages, n × (1 − bubble_ratio): SPD keeps the pipeline full,
                PP and SD on the pipeline keep one stage busy
  accept/depth  SPD: the measured acceptance of its one-ahead drafts (n in flight); sd / chain: the
                fraction of steps whose k-th draft was accepted, k = 1..γ
  tok/cycle     committed tokens per cycle (spd_dedicated) or per draft-and-verify step (sd, chain)
  bubble, ×PP, ×AR, ms/tok   as in results.csv
then, where the sweep has SPD and plain-TP (ar) points, the report's where-SPD-pays table
(`spdsim.where`: per GPU count the best of AR, TP, PP, SPD, TP×SPD, SD on TP, and SPD÷TP).
A file of several scenarios (YAML documents) is compared scenario by scenario.
Writes OUT/compare.csv, OUT/where_spd_pays.csv and OUT/results.csv (default OUT: reports/<scenario>/).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from spdsim.errors import UserError
from spdsim.scenario import load_scenarios
from spdsim.sweep import run_scenarios
from spdsim.textable import align, cell
from spdsim.where import format_where, where_spd_pays

ORDER = {"ar": 0, "pp": 1, "chain": 2, "sd": 3, "spd": 4, "spd_dedicated": 5}


def comparison(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (scheme, n, α): the fastest partition, with the comparison columns."""
    df = df.copy()
    df["acc_key"] = df["acceptance"].map(lambda a: "" if a is None or (isinstance(a, float) and math.isnan(a)) else str(a))
    if "tp" not in df.columns:
        df["tp"] = 1
    best = df.loc[df.groupby(["scheme", "stages", "tp", "acc_key"], sort=False)["tokens_per_s"].idxmax()]
    rows = []
    for _, r in best.iterrows():
        devs = set(str(r["placement"]).split(","))
        if isinstance(r["head_device"], str):
            devs.add(r["head_device"])
        if r["scheme"] in ("ar", "chain") or (r["scheme"] == "sd" and r["stages"] == 1):
            devs = {str(r["placement"]).split(",")[0]}
        depth = r.get("acceptance_by_depth")
        if not isinstance(depth, str):
            depth = "" if pd.isna(r["acceptance_rate"]) else f"{r['acceptance_rate']:.3f}"
        rows.append({
            "scheme": r["scheme"], "stages": int(r["stages"]), "tp": int(r["tp"]), "acceptance": r["acceptance"],
            "partition": r["partition"], "gpus": int(r["gpus"]) if "gpus" in r.index else len(devs),
            "parallelism": r["stages"] * (1 - r["bubble_ratio"]), "accept_by_depth": depth,
            "tokens_per_cycle": r.get("tokens_per_cycle"), "bubble_ratio": r["bubble_ratio"],
            "speedup_vs_pp": r["speedup_vs_pp"], "speedup_vs_ar": r["speedup_vs_ar"],
            "speedup_vs_tp": r.get("speedup_vs_tp"),
            "ms_per_token": r["ms_per_token"], "theoretical_speedup": r.get("theoretical_speedup")})
    out = pd.DataFrame(rows)
    out["_o"] = out["scheme"].map(lambda s: ORDER.get(s, 9))
    return out.sort_values(["acceptance", "tp", "stages", "_o"], na_position="first", kind="stable").drop(columns="_o")


def format_comparison(cmp: pd.DataFrame) -> str:
    head = ("scheme", "n", "tp", "α", "partition", "gpus", "parallel", "accept/depth", "tok/cycle", "bubble",
            "×PP", "×AR", "×TP", "ms/tok", "theory×PP")
    rows = [head]
    for _, r in cmp.iterrows():
        a = r["acceptance"]
        rows.append((r["scheme"], str(r["stages"]), str(r["tp"]), a if isinstance(a, str) else cell(a, ".2f"),
                     r["partition"], str(r["gpus"]), cell(r["parallelism"], ".2f"), r["accept_by_depth"],
                     cell(r["tokens_per_cycle"], ".2f"), cell(r["bubble_ratio"], ".3f"), cell(r["speedup_vs_pp"], ".2f"),
                     cell(r["speedup_vs_ar"], ".2f"), cell(r["speedup_vs_tp"], ".2f"), cell(r["ms_per_token"], ".3f"),
                     cell(r["theoretical_speedup"], ".2f")))
    if "scenario" in cmp.columns and cmp["scenario"].nunique() > 1:   # several scenarios: say which
        rows = [("scenario", *rows[0])] + [(sc, *r) for sc, r in zip(cmp["scenario"], rows[1:])]
        return align(rows, left=(0, 1, 5, 8))
    return align(rows, left=(0, 4, 7))


def compare_command(args: argparse.Namespace) -> int:
    scenarios = load_scenarios(args.scenario)
    if args.jobs < 1:
        raise UserError("--jobs: must be ≥ 1")
    for sc in scenarios:
        schemes = set(sc.sweep.schemes)
        traditional = {"sd", "chain"} & schemes or ("ar" in schemes and max(sc.sweep.tp) > 1)
        if not {"spd", "spd_dedicated"} & schemes or not traditional:
            raise UserError("sweep.schemes: compare needs an SPD scheme (spd, spd_dedicated) and a traditional "
                            "one (sd, chain, or ar with sweep.tp > 1) in the same scenario")
    df = run_scenarios(scenarios, args.jobs)
    out = Path(args.out) if args.out else Path("reports") / Path(args.scenario).stem
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    cmp = pd.concat([comparison(df[df["scenario"] == sc.name]).assign(scenario=sc.name) for sc in scenarios],
                    ignore_index=True) if len(scenarios) > 1 else comparison(df)
    cmp.to_csv(out / "compare.csv", index=False)
    print(format_comparison(cmp))
    where = where_spd_pays(df)
    if not where.empty:
        where.to_csv(out / "where_spd_pays.csv", index=False)
        print()
        print(format_where(where))
    print(f"\nwrote {out / 'compare.csv'} ({len(cmp)} rows)")
    return 0
