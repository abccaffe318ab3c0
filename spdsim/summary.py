"""What a sweep's results say, in a few rows: the fastest configuration per acceptance rate α and the
baselines it is measured against. Pure pandas: `spdsim run` prints it, the HTML report shows it,
the plots use the same split into baselines (α-free) and speculative rows."""
from __future__ import annotations

import math

import pandas as pd

from spdsim.textable import align, cell

BASELINE_SCHEMES = ("ar", "pp")


def is_baseline(df: pd.DataFrame) -> pd.Series:
    """AR and PP, and any row without an acceptance rate: nothing about them depends on α."""
    return df["scheme"].isin(BASELINE_SCHEMES) | df["acceptance"].isna()


def speculative(df: pd.DataFrame) -> pd.DataFrame:
    return df[~is_baseline(df)]


def baselines(df: pd.DataFrame) -> pd.DataFrame:
    return df[is_baseline(df)]


def best_per_alpha(df: pd.DataFrame) -> pd.DataFrame:
    """For every α swept, the fastest configuration of all (α-free baselines compete at every α)."""
    base_mask = is_baseline(df)
    base, spec = df[base_mask], df[~base_mask]
    rows = []
    for a in sorted(spec["acceptance"].unique()):
        pool = pd.concat([spec[spec["acceptance"] == a], base])
        top = pool.loc[pool["tokens_per_s"].idxmax()].copy()
        top["α"] = a
        rows.append(top)
    return pd.DataFrame(rows)


def _config(r: pd.Series) -> str:
    """'spd n=8 compute_balanced' (+ ' tp=2' where the sweep has TP)."""
    tp = r.get("tp")
    tp_part = f" tp={int(tp)}" if tp is not None and not (isinstance(tp, float) and math.isnan(tp)) and tp > 1 else ""
    if r["stages"] == 1 and not tp_part:
        return f"{r['scheme']} (1 device)"
    return f"{r['scheme']} n={r['stages']}{tp_part} {r['partition']}"


def format_summary(df: pd.DataFrame) -> str:
    """The baselines (fastest row of each α-free scheme), then per α the fastest configuration with its
    speedups. Every row stays in results.csv and index.html."""
    lines = []
    base = baselines(df)
    if len(base):
        parts = []
        for scheme in sorted(base["scheme"].unique()):
            b = base[base["scheme"] == scheme]
            if scheme == "pp" and (b["stages"] > 1).any():
                b = b[b["stages"] > 1]              # PP on one stage is AR
            r = b.loc[b["tokens_per_s"].idxmax()]
            parts.append(f"{_config(r)}: {r['tokens_per_s']:.1f} tok/s")
        lines.append("fastest baseline per scheme: " + "; ".join(parts))
    if len(speculative(df)):
        has_tp = "speedup_vs_tp" in df.columns and df["speedup_vs_tp"].notna().any()
        head = ["α", "best configuration", "tok/s", "ms/tok", "×PP", "×AR"] + (["×TP"] if has_tp else []) + \
               ["bubble", "accept"]
        rows = [head]
        for _, r in best_per_alpha(df).iterrows():
            a = r["α"]
            rows.append([a if isinstance(a, str) else f"{a:g}", _config(r), cell(r["tokens_per_s"], ".1f"),
                         cell(r["ms_per_token"], ".2f"), cell(r["speedup_vs_pp"], ".2f"),
                         cell(r["speedup_vs_ar"], ".2f")] + ([cell(r["speedup_vs_tp"], ".2f")] if has_tp else []) +
                        [cell(r["bubble_ratio"], ".3f"), cell(r["acceptance_rate"], ".3f")])
        lines += ["", "fastest configuration per acceptance rate α (every scheme competes):", align(rows, left=(0, 1))]
    return "\n".join(lines)
