"""The serving plots of a report (results.csv with serving columns, and requests.csv).

  serving_vs_load.png      TPOT p50 / p99, TTFT p99 and throughput against the load, one line per
                           scheme/policy (its best stages × partition at each load): where SPD's lower
                           TPOT at light load gives way to plain pipelining's throughput (the crossover)
  serving_latency_cdf.png  per-request TTFT, TPOT and end-to-end latency CDFs at a light, a middle and
                           the heaviest load, one line per scheme/policy (the same configurations)
Like spdsim.plots: `matplotlib.figure.Figure`, no pyplot state, fixed size and DPI; each function
returns the PNG's path or None when there is nothing to draw.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from spdsim.serving_results import best_per_series, with_series

DPI = 100
POLICY_STYLE = {"fcfs": "-", "interleave": "--", "spd_first": "-.", "adaptive": ":"}
SCHEME_COLOR = {"ar": "dimgray", "pp": "black", "spd": "tab:blue"}
TP_COLOR = "tab:red"          # plain tensor parallelism (scheme ar on a TP group)


def is_serving(df: pd.DataFrame) -> bool:
    return "policy" in df.columns and df["policy"].notna().any()


def _styles(series: list[str]) -> dict[str, dict]:
    from matplotlib import colormaps
    spare = iter(colormaps["tab10"](np.linspace(0, 1, 10)))
    colors: dict[str, object] = {}
    out = {}
    for s in series:
        scheme, _, rest = s.partition("/")
        policy = rest.split(" ")[0]
        key = scheme + rest[len(policy):]          # scheme (+ α): one colour, one line style per policy
        if key not in colors:
            colors[key] = SCHEME_COLOR.get(key, None) or (TP_COLOR if scheme.startswith("tp") else next(spare))
        out[s] = dict(color=colors[key], ls=POLICY_STYLE.get(policy, "-"))
    return out


def _xlabel(df: pd.DataFrame) -> str:
    kind = df["arrivals"].dropna().iloc[0] if "arrivals" in df.columns and df["arrivals"].notna().any() else ""
    return {"poisson": "arrival rate (requests/s)", "closed": "closed-loop users"}.get(kind, "offered rate (requests/s)")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_serving_vs_load(df: pd.DataFrame, path: Path) -> Path | None:
    best = best_per_series(df, "tpot_p99_ms")
    if best.empty or best["x"].nunique() < 1:
        return None
    series = sorted(best["series"].unique())
    styles = _styles(series)
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for s in series:
        pts = best[best["series"] == s].sort_values("x")
        st = styles[s]
        axes[0].plot(pts["x"], pts["tpot_p99_ms"], marker="o", ms=4, lw=1.8, **st)
        axes[0].plot(pts["x"], pts["tpot_p50_ms"], marker=".", ms=3, lw=0.8, alpha=0.5, color=st["color"], ls=st["ls"])
        axes[1].plot(pts["x"], pts["ttft_p99_ms"], marker="o", ms=4, lw=1.8, **st)
        axes[2].plot(pts["x"], pts["throughput_tokens_per_s"], marker="o", ms=4, lw=1.8, **st)
    titles = ("TPOT (thick: p99, thin: p50)", "TTFT p99", "throughput")
    ylabels = ("ms per output token", "ms", "tokens/s (all requests)")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title)
        ax.set_xlabel(_xlabel(df))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for ax, col in ((axes[0], "tpot_p99_ms"), (axes[1], "ttft_p99_ms")):
        if (best[col] > 0).all() and best[col].max() > 20 * best[col].min():
            ax.set_yscale("log")          # fcfs queues and round robins over many requests span decades
        else:
            ax.set_ylim(bottom=0)
    axes[2].set_ylim(bottom=0)
    xs = best["x"][best["x"] > 0]
    if len(xs) and xs.max() >= 8 * xs.min():
        ticks = sorted(xs.unique())
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
    handles = [Line2D([], [], lw=1.8, label=s, **styles[s]) for s in series]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    names = ", ".join(sorted({str(x) for x in df["scenario"].dropna().unique()}))
    fig.suptitle(f"Serving against load — {names} (best stages × partition per scheme/policy and load)")
    return _save(fig, path)


def _cdf(ax, values: np.ndarray, **style) -> None:
    v = np.sort(values[~np.isnan(values)])
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, lw=1.5, **style)


def plot_latency_cdf(df: pd.DataFrame, requests: pd.DataFrame, path: Path) -> Path | None:
    best = best_per_series(df, "tpot_p99_ms")
    if best.empty or requests is None or requests.empty:
        return None
    xs = sorted(best["x"].unique())
    picks = sorted({xs[0], xs[len(xs) // 2], xs[-1]})
    series = sorted(best["series"].unique())
    styles = _styles(series)
    fig = Figure(figsize=(14, 3.4 * len(picks) + 0.8), layout="constrained")
    axes = fig.subplots(len(picks), 3, squeeze=False)
    by_point = {pid: g for pid, g in requests.groupby("point_id")}
    for i, x in enumerate(picks):
        at = best[best["x"] == x]
        for _, r in at.iterrows():
            reqs = by_point.get(r["point_id"])
            if reqs is None:
                continue
            for j, col in enumerate(("ttft_ms", "tpot_ms", "e2e_ms")):
                _cdf(axes[i][j], reqs[col].to_numpy(dtype=float), **styles[r["series"]])
        for j, label in enumerate(("TTFT (ms)", "TPOT (ms per output token)", "end-to-end latency (ms)")):
            ax = axes[i][j]
            ax.set_xlabel(label)
            ax.set_ylabel("fraction of requests")
            ax.grid(True, alpha=0.3)
            ax.set_title(f"load {x:g}", fontsize=9)
            if j != 1:
                ax.set_xscale("log")
    handles = [Line2D([], [], lw=1.5, label=s, **styles[s]) for s in series]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    fig.suptitle("Per-request latency CDFs at a light, a middle and the heaviest load")
    return _save(fig, path)


def draw_serving_plots(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Both serving plots for a results table (and requests.csv, where it is there)."""
    from spdsim.serving_metrics import read_requests_csv
    req_path = out_dir / "requests.csv"
    requests = read_requests_csv(req_path) if req_path.is_file() else None
    drawn = []
    for name, draw in (("serving_vs_load.png", lambda p: plot_serving_vs_load(df, p)),
                       ("serving_latency_cdf.png", lambda p: plot_latency_cdf(df, requests, p))):
        target = out_dir / name
        if draw(target) is not None:
            drawn.append(target)
        elif target.exists():
            target.unlink()
    return drawn


__all__ = ["draw_serving_plots", "is_serving", "plot_latency_cdf", "plot_serving_vs_load", "with_series"]
