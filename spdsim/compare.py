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
Writes OUT/compare.csv and OUT/results.csv (default OUT: reports/<scenario>/).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from spdsim.errors import UserError
from spdsim.scenario import load_scenario
from spdsim.sweep import results_frame, sweep_results
from spdsim.textable import align, cell

ORDER = {"ar": 0, "pp": 1, "chain": 2, "sd": 3, "spd": 4, "spd_dedicated": 5}


def comparison(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (scheme, n, α): the fastest partition, with the comparison columns."""
    df = df.copy()
    df["acc_key"] = df["acceptance"].map(lambda a: "" if a is None or (isinstance(a, float) and math.isnan(a)) else str(a))
    best = df.loc[df.groupby(["scheme", "stages", "acc_key"], sort=False)["tokens_per_s"].idxmax()]
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
            "scheme": r["scheme"], "stages": int(r["stages"]), "acceptance": r["acceptance"],
            "partition": r["partition"], "gpus": len(devs),
            "parallelism": r["stages"] * (1 - r["bubble_ratio"]), "accept_by_depth": depth,
            "tokens_per_cycle": r.get("tokens_per_cycle"), "bubble_ratio": r["bubble_ratio"],
            "speedup_vs_pp": r["speedup_vs_pp"], "speedup_vs_ar": r["speedup_vs_ar"],
            "ms_per_token": r["ms_per_token"], "theoretical_speedup": r.get("theoretical_speedup")})
    out = pd.DataFrame(rows)
    out["_o"] = out["scheme"].map(lambda s: ORDER.get(s, 9))
    return out.sort_values(["acceptance", "stages", "_o"], na_position="first", kind="stable").drop(columns="_o")


def format_comparison(cmp: pd.DataFrame) -> str:
    head = ("scheme", "n", "α", "partition", "gpus", "parallel", "accept/depth", "tok/cycle", "bubble",
            "×PP", "×AR", "ms/tok", "theory×PP")
    rows = [head]
    for _, r in cmp.iterrows():
        a = r["acceptance"]
        rows.append((r["scheme"], str(r["stages"]), a if isinstance(a, str) else cell(a, ".2f"), r["partition"],
                     str(r["gpus"]), cell(r["parallelism"], ".2f"), r["accept_by_depth"],
                     cell(r["tokens_per_cycle"], ".2f"), cell(r["bubble_ratio"], ".3f"), cell(r["speedup_vs_pp"], ".2f"),
                     cell(r["speedup_vs_ar"], ".2f"), cell(r["ms_per_token"], ".3f"), cell(r["theoretical_speedup"], ".2f")))
    return align(rows, left=(0, 3, 6))


def compare_command(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    if args.jobs < 1:
        raise UserError("--jobs: must be ≥ 1")
    if not {"sd", "chain"} & set(scenario.sweep.schemes) or not {"spd", "spd_dedicated"} & set(scenario.sweep.schemes):
        raise UserError("sweep.schemes: compare needs an SPD scheme (spd, spd_dedicated) and a traditional "
                        "one (sd, chain) in the same scenario")
    df = results_frame(scenario, sweep_results(scenario, args.jobs))
    out = Path(args.out) if args.out else Path("reports") / Path(args.scenario).stem
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    cmp = comparison(df)
    cmp.to_csv(out / "compare.csv", index=False)
    print(format_comparison(cmp))
    print(f"\nwrote {out / 'compare.csv'} ({len(cmp)} rows)")
    return 0
