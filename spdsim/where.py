"""Where does SPD pay? The results table reduced to the question users ask (issue 16): for each GPU
count, the best tokens/s of every way to use those GPUs, and SPD's best ÷ tensor parallelism's best.

Families (a row's scheme, stages n and tp):
  AR        ar at tp 1: one GPU
  TP        ar at tp > 1: plain tensor-parallel decoding
  PP        pp with n > 1 (on TP groups when tp > 1)
  SPD       spd / spd_dedicated with n > 1, tp 1
  TP×SPD    spd / spd_dedicated with n > 1, tp > 1 (the hybrid)
  SD on TP  sd / chain at one stage (tp 1: SD on one GPU), what vLLM and SGLang serve
`spd_vs_tp` = the best SPD or TP×SPD point on g GPUs ÷ the fastest plain TP (or AR) on at most g GPUs —
the `speedup_vs_tp` of SPD's best there. AR, TP, PP and chain do not depend on α and appear at every α.
Used by the report (`where_spd_pays.png`, a table in index.html) and by `spdsim compare`.
"""
from __future__ import annotations

import math

import pandas as pd

from spdsim.textable import align, cell

FAMILIES = ("AR", "TP", "PP", "SPD", "TP×SPD", "SD on TP")
SPD_SCHEMES = ("spd", "spd_dedicated")


def family(scheme: str, stages: int, tp: int) -> str | None:
    if scheme == "ar":
        return "AR" if tp == 1 else "TP"
    if scheme == "pp":
        return "PP" if stages > 1 else None
    if scheme in SPD_SCHEMES:
        return None if stages == 1 else ("SPD" if tp == 1 else "TP×SPD")
    if scheme in ("sd", "chain") and stages == 1:
        return "SD on TP"
    return None


def _alpha(v) -> float | None:
    try:
        a = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(a) else a


def applicable(df: pd.DataFrame) -> bool:
    """Is there anything to compare: SPD points and a plain-TP / AR baseline?"""
    if df.empty or "tp" not in df.columns or "gpus" not in df.columns:
        return False
    return bool(df["scheme"].isin(SPD_SCHEMES).any() and (df["scheme"] == "ar").any())


def _config(r: pd.Series) -> str:
    tp = int(r["tp"])
    what = f"{r['scheme']} n={int(r['stages'])}" + (f" tp={tp}" if tp > 1 else "")
    return what


def where_spd_pays(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (scenario, α, GPU count): each family's best tokens/s there, spd_vs_tp, and the
    fastest configuration of all. Empty when the table has no SPD or no AR / TP rows."""
    if not applicable(df):
        return pd.DataFrame()
    df = df.assign(_fam=[family(s, int(n), int(t)) for s, n, t in zip(df["scheme"], df["stages"], df["tp"])],
                   _a=[_alpha(a) for a in df["acceptance"]])
    df = df[df["_fam"].notna()]
    rows = []
    for scenario, sc in df.groupby("scenario", sort=False):
        free = sc[sc["_a"].isna()]                      # α-free rows compete at every α
        base = sc[sc["scheme"] == "ar"]
        for a in sorted(sc["_a"].dropna().unique()):
            pool = pd.concat([sc[sc["_a"] == a], free])
            for g in sorted(pool["gpus"].astype(int).unique()):
                here = pool[pool["gpus"] == g]
                row = {"scenario": scenario, "acceptance": a, "gpus": g}
                for fam in FAMILIES:
                    f = here[here["_fam"] == fam]
                    row[fam] = float(f["tokens_per_s"].max()) if len(f) else math.nan
                spd = here[here["_fam"].isin(("SPD", "TP×SPD"))]
                ref = base[base["gpus"] <= g]
                tp_best = float(ref["tokens_per_s"].max()) if len(ref) else math.nan
                row["tp_best"] = tp_best
                row["spd_best"] = float(spd["tokens_per_s"].max()) if len(spd) else math.nan
                row["spd_vs_tp"] = row["spd_best"] / tp_best if len(spd) and len(ref) else math.nan
                top = here.loc[here["tokens_per_s"].idxmax()]
                row["fastest"] = f"{_config(top)} ({top['_fam']})"
                rows.append(row)
    return pd.DataFrame(rows)


def format_where(table: pd.DataFrame) -> str:
    """The where-SPD-pays table as aligned text (what `spdsim compare` and `spdsim run` print); the
    scenario column only when the table holds several."""
    if table.empty:
        return "where SPD pays: nothing to compare (needs SPD points and an ar / plain-TP baseline)"
    several = table["scenario"].nunique() > 1
    head = (*(("scenario",) if several else ()), "α", "gpus", *FAMILIES, "SPD÷TP", "fastest")
    rows = [head]
    for _, r in table.iterrows():
        rows.append((*((str(r["scenario"]),) if several else ()), cell(r["acceptance"], ".2f"), str(int(r["gpus"])),
                     *(cell(r[f], ".1f") for f in FAMILIES), cell(r["spd_vs_tp"], ".2f"), str(r["fastest"])))
    note = ("tokens/s, the best per family on exactly that many GPUs; SPD÷TP = the best SPD or TP×SPD point "
            "÷ the fastest plain TP / AR on at most that many GPUs")
    left = (0, len(head) - 1) if several else (len(head) - 1,)
    return "where SPD pays (against tensor parallelism)\n" + align(rows, left=left) + "\n" + note
