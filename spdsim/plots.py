"""The sweep plots of a report, drawn from the results table (one row per simulated point).

Each function takes the validated results DataFrame (see `spdsim.report.load_results`) and a path,
draws one PNG and returns its path, or None when the table has nothing to draw for it. Figures are
built with `matplotlib.figure.Figure` (Agg canvas, no pyplot state), at a fixed size and DPI, so a
PNG's pixel size is known in advance.

Baseline schemes are AR, PP and any rows without an acceptance rate; every other scheme (SPD, and later
SD, chain, ...) is drawn as one line per α. Where several rows share
(scheme, n, partition, α) — other sweep dimensions such as placement — the fastest one is drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from spdsim.metrics import ideal_spd_speedup
from spdsim.summary import BASELINE_SCHEMES, baselines, is_baseline, speculative  # noqa: F401

DPI = 100
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
BASELINE_STYLE = {"pp": dict(color="black", marker="o"),
                  "ar": dict(color="dimgray", marker="*", ms=11, zorder=3)}
MAX_PANELS = 6   # more partitioners than this are collapsed into one "best partition" panel


def best(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The fastest row per key (ties: the first in table order), sorted by the keys."""
    if df.empty:
        return df
    fastest = df.sort_values("tokens_per_s", ascending=False, kind="stable")
    return fastest.drop_duplicates(list(keys)).sort_values(list(keys), kind="stable")


def with_series(spec: pd.DataFrame) -> pd.DataFrame:
    """Add `series`, the acceptance setting a line stands for: "α = 0.8", "markov α = 0.8", or "α table"
    (a per-stage-count table: its α changes with n, so it is one line, not one point per α)."""
    kinds = spec["acceptance_kind"] if "acceptance_kind" in spec.columns else pd.Series("", index=spec.index)
    labels = []
    for kind, a in zip(kinds.fillna("").astype(str), spec["acceptance"]):
        if kind == "table":
            labels.append("α table")
        else:
            labels.append(("" if kind in ("", "iid") else f"{kind} ") + f"α = {a:g}")
    return spec.assign(series=labels)


def series_order(spec: pd.DataFrame) -> list[str]:
    """Series labels by mean α, then label."""
    means = spec.groupby("series")["acceptance"].mean()
    return sorted(means.index, key=lambda lab: (means[lab], lab))


def series_colors(series: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    k = len(series)
    return {lab: cmap(0.85 * i / max(k - 1, 1)) for i, lab in enumerate(series)}


def ideal_curve(spec_series: pd.DataFrame, n_max: int) -> tuple[np.ndarray, list[float]]:
    """The closed form of DESIGN §2 for one series: a smooth curve for one α, points for a table."""
    alphas = spec_series.groupby("stages")["acceptance"].first()
    if alphas.nunique() == 1:
        n = np.linspace(1, n_max, 200)
        return n, [ideal_spd_speedup(float(x), float(alphas.iloc[0])) for x in n]
    return alphas.index.to_numpy(dtype=float), [ideal_spd_speedup(int(n), float(a)) for n, a in alphas.items()]


def scheme_markers(schemes: Sequence[str]) -> dict[str, str]:
    return {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(sorted(schemes))}


def _stage_ticks(ax, stages: Sequence[int]) -> None:
    ticks = sorted({int(s) for s in stages})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xlim(min(ticks) - 0.3, max(ticks) + 0.3)


def _baseline_style(scheme: str) -> dict:
    return BASELINE_STYLE.get(scheme, dict(color="tab:brown", marker="x"))


def _title(df: pd.DataFrame, what: str) -> str:
    names = sorted({str(s) for s in df["scenario"].dropna().unique()})
    return f"{what} — {', '.join(names)}" if names else what


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _legend_handles(series, colors, markers, extra: list) -> list:
    handles = [Line2D([], [], color=colors[lab], lw=2, label=lab) for lab in series]
    if len(markers) > 1:
        handles += [Line2D([], [], color="gray", marker=m, ls="none", label=s) for s, m in markers.items()]
    return handles + extra


# --- speedup_vs_n.png --------------------------------------------------------------------------

def plot_speedup_vs_n(df: pd.DataFrame, path: Path) -> Path | None:
    """Speedup over PP (top row) and over AR (bottom row) against n, one panel per partitioner."""
    spec = speculative(df)
    if spec.empty:
        return None
    spec = with_series(spec)
    partitions = sorted(spec["partition"].unique())
    collapse = len(partitions) > MAX_PANELS
    if collapse:
        partitions = ["best partition"]
    series = series_order(spec)
    colors, markers = series_colors(series), scheme_markers(spec["scheme"].unique())
    base = baselines(df)
    has_ar = df["speedup_vs_ar"].notna().any()
    n_max = int(df["stages"].max())

    cols = len(partitions)
    fig = Figure(figsize=(4.2 * cols + 2.2, 7.5), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False, sharey="row")
    rows = (("speedup_vs_pp", "speedup over PP (×)"), ("speedup_vs_ar", "speedup over AR, 1 device (×)"))
    for c, part in enumerate(partitions):
        sub = spec if collapse else spec[spec["partition"] == part]
        sub_base = base if collapse else base[(base["partition"] == part) | (base["scheme"] == "ar")]
        for r, (col, ylabel) in enumerate(rows):
            ax = axes[r][c]
            if col == "speedup_vs_ar" and not has_ar:
                ax.text(0.5, 0.5, "no AR baseline\n(the model does not fit one device)",
                        ha="center", va="center", transform=ax.transAxes, color="gray")
            for lab in series:
                # The closed form of DESIGN §2 (free links and head, equal stages): the ceiling to compare to.
                ax.plot(*ideal_curve(spec[spec["series"] == lab], n_max), ls="--", lw=1, color=colors[lab], alpha=0.7)
                for scheme, m in markers.items():
                    pts = best(sub[(sub["series"] == lab) & (sub["scheme"] == scheme)].dropna(subset=[col]),
                               ["stages"])
                    if not pts.empty:
                        ax.plot(pts["stages"], pts[col], marker=m, color=colors[lab], lw=1.8, ms=5)
            # Baselines: PP's own speedup over PP is 1 by definition; over AR it shows the link overhead.
            for scheme in sorted(sub_base["scheme"].unique()):
                pts = best(sub_base[sub_base["scheme"] == scheme].dropna(subset=[col]), ["stages"])
                if not pts.empty:
                    ax.plot(pts["stages"], pts[col], lw=1.2, **{"ms": 4, **_baseline_style(scheme)})
            ax.axhline(1.0, color="lightgray", lw=0.8, zorder=0)
            ax.grid(True, alpha=0.3)
            _stage_ticks(ax, df["stages"])
            if r == 0:
                ax.set_title(f"partition: {part}")
            if r == 1:
                ax.set_xlabel("pipeline stages n (devices)")
            if c == 0:
                ax.set_ylabel(ylabel)
    extra = [Line2D([], [], color="gray", ls="--", lw=1, label="ideal n/(1+(1−α)(n−1))")]
    extra += [Line2D([], [], lw=1.2, label=s.upper(), **_baseline_style(s)) for s in sorted(base["scheme"].unique())]
    fig.legend(handles=_legend_handles(series, colors, markers, extra), loc="outside right center")
    fig.suptitle(_title(df, "Speedup vs pipeline stages (fastest placement per point)"))
    return _save(fig, path)


# --- bubble_vs_n.png ---------------------------------------------------------------------------

def plot_bubble_vs_n(df: pd.DataFrame, path: Path) -> Path | None:
    """Bubble ratio and waste ratio against n, for the fastest partition of each (scheme, n, α)."""
    if df.empty:
        return None
    spec, base = with_series(speculative(df)), baselines(df)
    series = series_order(spec)
    colors, markers = series_colors(series), scheme_markers(spec["scheme"].unique())
    n_grid = np.linspace(1, int(df["stages"].max()), 200)

    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, col, label in ((axes[0], "bubble_ratio", "bubble ratio (idle share of stage-time)"),
                           (axes[1], "waste_ratio", "waste ratio (discarded share of stage-time)")):
        if col == "bubble_ratio":
            ax.plot(n_grid, (n_grid - 1) / n_grid, ls=":", color="black", lw=1)
        for lab in series:
            for scheme, m in markers.items():
                pts = best(spec[(spec["series"] == lab) & (spec["scheme"] == scheme)].dropna(subset=[col]),
                           ["stages"])
                if not pts.empty:
                    ax.plot(pts["stages"], pts[col], marker=m, color=colors[lab], lw=1.8, ms=5)
        for scheme in sorted(base["scheme"].unique()):
            pts = best(base[base["scheme"] == scheme].dropna(subset=[col]), ["stages"])
            if not pts.empty:
                ax.plot(pts["stages"], pts[col], lw=1.2, **{"ms": 4, **_baseline_style(scheme)})
        ax.set_ylim(-0.02, 1.0)
        ax.set_xlabel("pipeline stages n (devices)")
        ax.set_ylabel(f"{label}, fraction")
        ax.set_title(col.replace("_", " "))
        ax.grid(True, alpha=0.3)
        _stage_ticks(ax, df["stages"])
    extra = [Line2D([], [], color="black", ls=":", lw=1, label="PP ideal bubble (n−1)/n")]
    extra += [Line2D([], [], lw=1.2, label=s.upper(), **_baseline_style(s)) for s in sorted(base["scheme"].unique())]
    fig.legend(handles=_legend_handles(series, colors, markers, extra), loc="outside right center")
    fig.suptitle(_title(df, "Bubble and waste vs pipeline stages (fastest partition per point)"))
    return _save(fig, path)


# --- tokens_per_s.png --------------------------------------------------------------------------

def plot_tokens_per_s(df: pd.DataFrame, path: Path) -> Path | None:
    """Absolute decode speed per scheme against n (fastest partition per point)."""
    if df.empty:
        return None
    spec, base = with_series(speculative(df)), baselines(df)
    series = series_order(spec)
    colors, markers = series_colors(series), scheme_markers(spec["scheme"].unique())

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    for lab in series:
        for scheme, m in markers.items():
            pts = best(spec[(spec["series"] == lab) & (spec["scheme"] == scheme)], ["stages"])
            ax.plot(pts["stages"], pts["tokens_per_s"], marker=m, color=colors[lab], lw=1.8, ms=5)
    for scheme in sorted(base["scheme"].unique()):
        pts = best(base[base["scheme"] == scheme], ["stages"])
        style = _baseline_style(scheme)
        ax.plot(pts["stages"], pts["tokens_per_s"], lw=1.2, **{"ms": 6, **style})
        if len(pts) == 1:   # AR runs on one device: carry its speed across as a reference line
            ax.axhline(float(pts["tokens_per_s"].iloc[0]), color=style["color"], ls=":", lw=1)
    ax.set_xlabel("pipeline stages n (devices)")
    ax.set_ylabel("decode speed (tokens/s, batch 1)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    _stage_ticks(ax, df["stages"])
    extra = [Line2D([], [], lw=1.2, label=s.upper(), **_baseline_style(s)) for s in sorted(base["scheme"].unique())]
    fig.legend(handles=_legend_handles(series, colors, markers, extra), loc="outside right center")
    ax.set_title(_title(df, "Decode speed per scheme (fastest partition per point)"))
    return _save(fig, path)


# --- utilization.png ---------------------------------------------------------------------------

def utilization_columns(df: pd.DataFrame) -> list[str]:
    cols = [c for c in df.columns if c.startswith("utilization_") and c[len("utilization_"):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len("utilization_"):]))


def chosen_configurations(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the heatmap shows: the fastest per (scheme, n) for baselines, per (scheme, n, α) otherwise."""
    parts = [best(baselines(df), ["scheme", "stages"]),
             best(with_series(speculative(df)), ["scheme", "stages", "series"])]
    return pd.concat([p for p in parts if not p.empty]) if any(not p.empty for p in parts) else df.iloc[:0]


def plot_utilization(df: pd.DataFrame, path: Path) -> Path | None:
    """Per-stage utilization (busy / T) heatmap of the chosen configurations."""
    cols = utilization_columns(df)
    if not cols:
        return None
    rows = chosen_configurations(df.dropna(subset=cols, how="all"))
    rows = rows[rows["stages"] > 1] if (rows["stages"] > 1).any() else rows   # n = 1 has one cell: noise
    if rows.empty:
        return None
    data = rows[cols].to_numpy(dtype=float)
    series = rows["series"] if "series" in rows.columns else pd.Series(np.nan, index=rows.index)
    labels = [f"{r.scheme} n={int(r.stages)}" + (f" {lab}" if isinstance(lab, str) else "") + f" ({r.partition})"
              for r, lab in zip(rows.itertuples(), series)]

    height = 1.6 + 0.32 * len(rows)
    fig = Figure(figsize=(2.8 + 0.9 * len(cols) + 1.5, height), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), [c[len("utilization_"):] for c in cols])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("stage (0-based)")
    if data.size <= 600:
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="utilization (busy time / decode window)")
    ax.set_title(_title(df, "Per-stage utilization (fastest partition per row)"), fontsize=10)
    return _save(fig, path)


# --- where_spd_pays.png ------------------------------------------------------------------------

def plot_where_spd_pays(df: pd.DataFrame, path: Path) -> Path | None:
    """SPD's best ÷ plain TP's best (`spdsim.where`) against the GPU count, one line per α, one panel
    per scenario; None when the table has no SPD or no AR / TP rows."""
    from spdsim.where import where_spd_pays
    table = where_spd_pays(df)
    if table.empty or table["spd_vs_tp"].notna().sum() == 0:
        return None
    scenarios = list(dict.fromkeys(table["scenario"]))
    alphas = sorted(table["acceptance"].unique())
    colors = series_colors([f"α = {a:g}" for a in alphas])
    cols = min(len(scenarios), 3)
    rows = -(-len(scenarios) // cols)
    fig = Figure(figsize=(4.6 * cols + 1.8, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for i, sc in enumerate(scenarios):
        ax = axes[i // cols][i % cols]
        sub = table[table["scenario"] == sc]
        for a in alphas:
            pts = sub[(sub["acceptance"] == a)].dropna(subset=["spd_vs_tp"])
            if not pts.empty:
                ax.plot(pts["gpus"], pts["spd_vs_tp"], marker="o", lw=1.8, ms=5, color=colors[f"α = {a:g}"])
        ax.axhline(1.0, color="black", lw=0.9, ls="--")
        ax.set_title(str(sc), fontsize=10)
        ax.set_xlabel("GPUs")
        ax.grid(True, alpha=0.3)
        ax.set_xticks(sorted(sub.dropna(subset=["spd_vs_tp"])["gpus"].unique()))
        if i % cols == 0:
            ax.set_ylabel("best SPD ÷ best plain TP (×)")
    for j in range(len(scenarios), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    handles = [Line2D([], [], color=colors[f"α = {a:g}"], lw=2, label=f"α = {a:g}") for a in alphas]
    handles.append(Line2D([], [], color="black", ls="--", lw=0.9, label="TP is as fast"))
    fig.legend(handles=handles, loc="outside right center")
    fig.suptitle("Where SPD pays: its best point (SPD or TP×SPD) against the fastest plain TP on ≤ as many GPUs")
    return _save(fig, path)


PLOTS = (("speedup_vs_n.png", plot_speedup_vs_n), ("bubble_vs_n.png", plot_bubble_vs_n),
         ("tokens_per_s.png", plot_tokens_per_s), ("utilization.png", plot_utilization),
         ("where_spd_pays.png", plot_where_spd_pays))
